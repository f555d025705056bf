"""mlellp_ext: exact, fast E-step ops for learning from label proportions.

Importing this package loads the compiled library, which registers the ops
``torch.ops.mlellp.posterior``, ``torch.ops.mlellp.log_pmf``,
``torch.ops.mlellp.posterior_backward`` and ``torch.ops.mlellp.phi_jvp``;
``ops`` adds their autograd and fake (meta) kernels and the Python functions
below.
"""
import torch  # noqa: F401  (the library links against libtorch)

from . import _C  # noqa: F401  (registers torch.ops.mlellp.*)
from .bags import offsets_from_sizes, sizes_from_offsets
from .ops import bag_log_likelihood, log_pmf, posterior

__all__ = [
    "bag_log_likelihood",
    "log_pmf",
    "offsets_from_sizes",
    "posterior",
    "sizes_from_offsets",
]
__version__ = "0.1.0"
