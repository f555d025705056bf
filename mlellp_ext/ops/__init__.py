"""The E-step and the image op as torch ops: what Python adds to the C++/CUDA
kernels (csrc/ops), and the Python API.

One module per op family, each holding that family's fake kernels (shapes for
torch.compile / meta tensors), Autograd kernels, vmap rules and Python API:

* :mod:`.binary`: ``posterior`` (and the ops of its derivatives,
  ``posterior_backward``, ``phi_jvp``);
* :mod:`.weighted`: ``posterior_weighted``, ``log_pmf``;
* :mod:`.multiclass`: ``posterior_multiclass``;
* :mod:`.image`: ``augment_images``.

``_checks`` mirrors the data-free checks of csrc/ops/checks.cpp; ``_dispatch``
holds what the families share to register (Autograd kernels, vmap batching).
Importing this package registers all of it.
"""
from ._checks import DEFAULT_MAX_STATES, MAX_STATES_LIMIT
from .binary import posterior
from .image import augment_images
from .multiclass import posterior_multiclass
from .weighted import log_pmf, posterior_weighted


__all__ = ["DEFAULT_MAX_STATES", "MAX_STATES_LIMIT", "augment_images", "log_pmf", "posterior",
           "posterior_multiclass", "posterior_weighted"]
