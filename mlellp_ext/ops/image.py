"""The image op for training pipelines: ``augment_images``, a whole batch of
per-image flips, blurs and colour jitters in one call (``torch.ops.mlellp.augment_images``,
CPU and CUDA kernels; csrc/ops/augment_image.h holds the arithmetic).

torchvision's transforms take one set of parameters per call, so a batch whose
images each get their own costs one Python call per image; this op takes the
parameters of every image at once. The parameters are the caller's to draw
(``mlellp_ext.app.augment.BatchAugment`` draws torchvision's ColorJitter / GaussianBlur
distribution). Not differentiable (it is input augmentation).
"""
from __future__ import annotations

import torch

from ._checks import check_augment_layout

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # jitter operations, as numbered in jitter_order
NO_OP = -1


@torch.library.register_fake("mlellp::augment_images")
def _augment_images_fake(images, flip, blur_sigma, jitter_order, jitter_factors):
    check_augment_layout(images, flip, blur_sigma, jitter_order, jitter_factors)
    dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    return torch.empty_like(images, dtype=dtype, memory_format=torch.contiguous_format)


def augment_images(images: torch.Tensor, flip: torch.Tensor, blur_sigma: torch.Tensor,
                   jitter_order: torch.Tensor, jitter_factors: torch.Tensor) -> torch.Tensor:
    """Augment a batch of RGB images, each with its own parameters.

    Args:
        images: (B, 3, H, W) RGB, uint8 (read as value / 255, giving
            float32; torchvision's ``to_dtype(..., scale=True)`` multiplies by
            float32(1/255), one rounding step apart at most) or
            float32/float64/float16/bfloat16 in [0, 1] (float16/bfloat16 are
            computed in float32); any memory layout.
        flip: (B,) bool; True mirrors the image's columns.
        blur_sigma: (B,) floating, finite and >= 0: a 3x3 Gaussian blur of that
            sigma with reflect padding, 0 for none. Applied after the flip. (A
            side of one pixel, which torchvision refuses, repeats that pixel.)
        jitter_order: (B, 4) int64: the colour operations applied after the
            blur, in this order: ``BRIGHTNESS`` (0), ``CONTRAST`` (1),
            ``SATURATION`` (2), ``HUE`` (3), or ``NO_OP`` (-1); each at most once.
        jitter_factors: (B, 4) floating: brightness, contrast and saturation
            factors (finite, >= 0; 1 leaves the image as is) and the hue shift
            (in [-0.5, 0.5]), used by the operations ``jitter_order`` names.

        The parameters may be on the images' device or on the CPU: for CUDA
        images, CPU parameters are checked on the host and copied through
        pinned memory without waiting for the stream, while parameters on the
        GPU are copied back for the check, which waits for it.

    Returns:
        (B, 3, H, W) contiguous tensor on images' device, of their dtype
        (float32 for uint8): what
        torchvision.transforms.v2.functional's ``horizontal_flip``,
        ``gaussian_blur(img, 3, sigma)`` and ``adjust_brightness`` /
        ``adjust_contrast`` / ``adjust_saturation`` / ``adjust_hue`` give image
        by image (hue to float32 rounding: torchvision computes it in float32).
        Inputs outside [0, 1] are not the contract: each operation clamps its
        result to [0, 1] as torchvision's do, except that hue also clamps where
        torchvision's keeps the value channel.

    Raises:
        ValueError: a shape, dtype or device that does not match, or a value
            outside the ranges above (the message names the argument, the image
            and the value).
    """
    return torch.ops.mlellp.augment_images(images, flip, blur_sigma, jitter_order, jitter_factors)


__all__ = ["augment_images", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "NO_OP"]
