"""Attacks on a model: evasion (``evasion``: FGSM, DeepFool, transferability) and Jacobian-based
dataset augmentation (``jbda``). Import from :mod:`stealnb.core` only."""
