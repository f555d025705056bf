"""mlellp_ext: learning from label proportions (MLE-LLP) as a PyTorch library.

The library (this package's top-level modules):

* ops (``posterior``, ``posterior_multiclass``, ``posterior_weighted``, ``log_pmf``):
  the exact E-step as custom ops ``torch.ops.mlellp.*`` on CPU and CUDA, with
  autograd, torch.func and torch.compile support; ``posterior_multiclass_approx``
  (approx) for multi-class bags too large for the exact one;
* ``count_weights``: likelihoods of uncertain counts (intervals, noise, label-DP
  counts) for ``posterior_weighted``, and ``count_weights.privatize``;
* ``EMTargets`` (em): EM's soft targets, for your own training loop;
* ``bag_log_likelihood``, ``dllp_loss`` (losses): the direct likelihood of the
  observed counts, and DLLP's bag-proportion loss;
* ``BagBatchSampler`` (samplers): DataLoader batches of whole bags;
* bags: the ragged bag layout (``offsets_from_sizes``, ``sizes_from_offsets``);
* ``image_ops.augment_images`` (ops.image): a batch's flips, blurs and colour
  jitters, each image with its own parameters, in one op call (CPU and CUDA);
* ``build_info()``: the torch, CUDA and GPU architectures the extension was
  built for, and whether its CUDA kernels are in.

The application (``mlellp_ext.app``: trainer, datasets, methods, the ``mlellp``
command) is built on it; the library never imports it.
"""
import torch  # noqa: F401  (the library links against libtorch)

from ._extension import _C, build_info  # noqa: F401  (loads the extension: registers torch.ops.mlellp.*)
from . import count_weights, image_ops
from .approx import posterior_multiclass_approx
from .bags import offsets_from_sizes, sizes_from_offsets
from .em import EMTargets
from .losses import bag_log_likelihood, dllp_loss
from .ops import log_pmf, posterior, posterior_multiclass, posterior_weighted
from .samplers import BagBatchSampler

__all__ = [
    "BagBatchSampler",
    "EMTargets",
    "bag_log_likelihood",
    "build_info",
    "count_weights",
    "dllp_loss",
    "image_ops",
    "log_pmf",
    "offsets_from_sizes",
    "posterior",
    "posterior_multiclass",
    "posterior_multiclass_approx",
    "posterior_weighted",
    "sizes_from_offsets",
]
__version__ = "0.2.0"
