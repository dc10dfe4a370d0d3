"""stealnb: black-box model extraction of image classifiers, as research notebooks.

Conventions used everywhere in the package:

* images are ``float32`` arrays in ``[0, 1]`` of shape ``N x 32 x 32 x 3`` (NHWC);
* labels are ``int64`` arrays of shape ``(N,)``;
* models output **logits** (no softmax layer);
* randomness comes from an explicit ``seed=`` or ``numpy.random.Generator``.
"""
import os as _os

from .core import _tflog

# TensorFlow's C++ log lines below ERROR (its start-up chatter) stay out of notebooks, the CLI and
# the server; an explicit TF_CPP_MIN_LOG_LEVEL wins. TensorFlow ignores the level for the lines it
# logs while being imported: _tflog holds those to it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_tflog.install()

__version__ = "0.1.0"
