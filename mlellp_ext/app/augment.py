"""Training augmentation of a whole batch at once, as tensor operations on the batch's device.

:class:`BatchAugment` draws, per image, what torchvision's per-image pipeline

    v2.Compose([v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])

draws (flip with p = 0.5; with p = 0.2 a 3x3 Gaussian blur of sigma ~ U(0.1, 1.0),
reflect padding; with p = 0.5 brightness, contrast and saturation factors ~
U(0.8, 1.2) and a hue shift ~ U(-0.02, 0.02), applied in a random order), and
applies it to float images in [0, 1] with the formulas of torchvision's
``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``
and ``gaussian_blur`` (tests/test_augment.py checks each against them and the
whole against the per-image pipeline's statistics). torchvision's transforms take
one set of parameters per call, hence one Python call per image; here each
operation runs once per batch with per-image parameters.

Parameters are drawn on the CPU from torch's global generator, which the
training checkpoints save, so a resumed run draws the same augmentations.
The trainer's ``batches.Preprocess`` uses it (earlier runs, the documented CIFAR
experiments among them, used the per-image pipeline: the same distribution,
other draws).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLIP_P, BLUR_P, JITTER_P = 0.5, 0.2, 0.5
BLUR_SIGMA = (0.1, 1.0)
BRIGHTNESS = CONTRAST = SATURATION = 0.2
HUE = 0.02
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
GRAY = (0.2989, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(-3)


def adjust_brightness(x, factor):
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x, factor):
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * factor + (1 - factor) * mean).clamp_(0, 1)


def adjust_saturation(x, factor):
    return (x * factor + (1 - factor) * _gray(x)).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV, h in [0, 1) (Pillow's and torchvision's formulas)."""
    r, g, b = x.unbind(-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    span = maxc - minc
    eqc = span == 0
    s = span / torch.where(eqc, torch.ones_like(maxc), maxc)
    inv = 1.0 / torch.where(eqc, torch.ones_like(span), span)
    # (g - b) / span where r is the maximum, 2 + (b - r) / span where g is, 4 + (r - g) / span otherwise
    h = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h = torch.where(eqc, torch.zeros_like(h), h)
    h = (h / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), -3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # sector i -> (r, g, b) among (v, p, q, t)
    vpqt = torch.stack((v, p, q, t), -3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    index = select[:, i].movedim(0, -3)  # (..., 3, H, W)
    return vpqt.gather(-3, index)


def adjust_hue(x, shift):
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(-3)
    h = (h + shift.view(-1, *([1] * (h.dim() - 1)))).remainder(1.0)
    return hsv_to_rgb(torch.stack((h, s, v), -3))


def gaussian_blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a sigma per image, reflect padding (separable, as
    torchvision's gaussian_blur with kernel_size 3)."""
    taps = torch.exp(-1.0 / (2 * sigma.to(x.dtype) ** 2))  # weight of offsets -1 and +1; the centre has 1
    norm = 1 + 2 * taps
    side, centre = (taps / norm).view(-1, 1, 1, 1), (1 / norm).view(-1, 1, 1, 1)
    pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
    rows = side * pad[..., :, :-2] + centre * pad[..., :, 1:-1] + side * pad[..., :, 2:]  # horizontal
    return side * rows[..., :-2, :] + centre * rows[..., 1:-1, :] + side * rows[..., 2:, :]


_JITTERS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class BatchAugment:
    """Callable: float (B, 3, H, W) images in [0, 1] -> augmented images (same shape,
    device and dtype). See the module docstring for the distribution."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return x
        # Every draw on the CPU generator, in a fixed order, whatever the device.
        u = torch.rand(n, 4)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(n)
        factors = 1 - BRIGHTNESS + 2 * BRIGHTNESS * torch.rand(n, 3)
        hue = -HUE + 2 * HUE * torch.rand(n)
        order = torch.rand(n, 4).argsort(1)  # a uniformly random order of the four jitters per image
        flip, blur, jitter = u[:, 0] < FLIP_P, u[:, 1] < BLUR_P, u[:, 2] < JITTER_P
        device = x.device
        x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        if bool(blur.any()):
            which = torch.nonzero(blur).flatten()
            x = x.index_copy(0, which.to(device), gaussian_blur3(x[which.to(device)], sigma[which].to(device)))
        params = (factors[:, 0], factors[:, 1], factors[:, 2], hue)
        for step in range(4):
            for op, fn in enumerate(_JITTERS):
                which = torch.nonzero(jitter & (order[:, step] == op)).flatten()
                if which.numel() == 0:
                    continue
                p = params[op][which].to(device, x.dtype)
                if op < 3:
                    p = p.view(-1, 1, 1, 1)
                wd = which.to(device)
                x = x.index_copy(0, wd, fn(x[wd], p))
        return x
