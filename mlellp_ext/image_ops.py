"""``augment_images``: a batch's flips, blurs and colour jitters, each image with its
own parameters, in one op call (CPU and CUDA). Defined in :mod:`mlellp_ext.ops.image`;
this is its public name."""
from .ops.image import BRIGHTNESS, CONTRAST, HUE, NO_OP, SATURATION, augment_images

__all__ = ["augment_images", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "NO_OP"]
