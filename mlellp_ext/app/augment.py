"""Training augmentation of a whole batch at once, on the batch's device.

:class:`BatchAugment` draws, per image, what torchvision's per-image pipeline

    v2.Compose([v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])

draws (flip with p = 0.5; with p = 0.2 a 3x3 Gaussian blur of sigma ~ U(0.1, 1.0),
reflect padding; with p = 0.5 brightness, contrast and saturation factors ~
U(0.8, 1.2) and a hue shift ~ U(-0.02, 0.02), applied in a random order), and
applies it to float images in [0, 1] with one call of the op
``mlellp_ext.image_ops.augment_images`` (torchvision's formulas; tests/test_augment.py
checks the op against torchvision image by image, and this distribution
against the per-image pipeline's statistics).

Parameters are drawn on the CPU from torch's global generator, which the
training checkpoints save, so a resumed run draws the same augmentations.
The trainer's ``batches.Preprocess`` uses it (earlier runs, the documented CIFAR
experiments among them, used the per-image pipeline: the same distribution,
other draws).
"""
from __future__ import annotations

import torch

from ..image_ops import NO_OP, augment_images

FLIP_P, BLUR_P, JITTER_P = 0.5, 0.2, 0.5
BLUR_SIGMA = (0.1, 1.0)
BRIGHTNESS = CONTRAST = SATURATION = 0.2
HUE = 0.02


class BatchAugment:
    """Callable: (B, 3, H, W) images, uint8 or float in [0, 1] -> augmented float
    images in [0, 1] (same shape and device; float32 for uint8, else the same
    dtype). See the module docstring for the distribution."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # Every draw on the CPU generator, in a fixed order, whatever the device.
        u = torch.rand(n, 4)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(n)
        spread = torch.tensor([BRIGHTNESS, CONTRAST, SATURATION])
        factors = 1 - spread + 2 * spread * torch.rand(n, 3)
        hue = -HUE + 2 * HUE * torch.rand(n)
        order = torch.rand(n, 4).argsort(1)  # a uniformly random order of the four jitters per image
        flip, blur, jitter = u[:, 0] < FLIP_P, u[:, 1] < BLUR_P, u[:, 2] < JITTER_P
        sigma = torch.where(blur, sigma, 0.0)
        order = torch.where(jitter.unsqueeze(1), order, NO_OP)
        # The parameters stay on the CPU: the op checks them there and copies them to
        # the device without waiting for the stream.
        return augment_images(x, flip, sigma, order, torch.cat((factors, hue.unsqueeze(1)), 1))
