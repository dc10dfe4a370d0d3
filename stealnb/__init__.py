"""stealnb: black-box model extraction of image classifiers, as research notebooks.

Conventions used everywhere in the package:

* images are ``float32`` arrays in ``[0, 1]`` of shape ``N x 32 x 32 x 3`` (NHWC);
* labels are ``int64`` arrays of shape ``(N,)``;
* models output **logits** (no softmax layer);
* randomness comes from an explicit ``seed=`` or ``numpy.random.Generator``.
"""
import os as _os

# Keep TensorFlow's C++ start-up chatter out of notebooks and CLI output.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
