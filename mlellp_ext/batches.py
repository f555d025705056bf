"""Turning instance indices into network inputs, and minibatches of instances or bags."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bags import offsets_from_sizes


class Preprocess:
    """Index -> normalised float batch on the device, augmented when training.

    Augmentation (flips, blur, colour jitter; torchvision.transforms.v2) applies
    to RGB images only and is drawn per image from the global torch RNG, which
    the checkpoints save, so a resumed run sees the same draws.
    """

    def __init__(self, x: torch.Tensor, is_rgb: bool, augment: bool, device: torch.device):
        self.x = x
        self.device = device
        self.augment = None
        if augment and is_rgb:
            from torchvision.transforms import v2

            self.augment = v2.Compose([
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5),
            ])

    def __call__(self, index: torch.Tensor, train: bool) -> torch.Tensor:
        x = self.x[index]
        if train and self.augment is not None:
            x = torch.stack([self.augment(img) for img in x])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return ((x - 0.5) / 0.5).to(self.device, non_blocking=True)


def instance_batches(num: int, batch_size: int, generator: torch.Generator):
    """Shuffled minibatches of positions 0..num-1."""
    return torch.randperm(num, generator=generator).split(batch_size)


@dataclass
class BagBatch:
    positions: torch.Tensor  # positions into the flat bag layout (Bags.index)
    offsets: torch.Tensor    # local offsets of the bags in this batch
    counts: torch.Tensor
    bags: torch.Tensor       # bag numbers


def bag_batches(offsets: torch.Tensor, counts: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled minibatches of whole bags holding about batch_size instances each
    (at least one bag, so a bag larger than batch_size is a batch of its own)."""
    sizes = offsets[1:] - offsets[:-1]
    order = torch.randperm(sizes.numel(), generator=generator)
    batch, total = [], 0
    for b in order.tolist():
        batch.append(b)
        total += int(sizes[b])
        if total >= batch_size:
            yield _bag_batch(batch, offsets, counts, sizes)
            batch, total = [], 0
    if batch:
        yield _bag_batch(batch, offsets, counts, sizes)


def _bag_batch(batch, offsets, counts, sizes):
    bags = torch.tensor(batch, dtype=torch.long)
    positions = torch.cat([torch.arange(int(offsets[b]), int(offsets[b + 1])) for b in batch])
    return BagBatch(positions, offsets_from_sizes(sizes[bags]), counts[bags], bags)


@torch.no_grad()
def infer_logits(model, preprocess: Preprocess, index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of the instances `index`, network in eval mode, no augmentation (CPU tensor)."""
    was_training = model.training
    model.eval()
    out = [model(preprocess(chunk, train=False)).float().cpu() for chunk in index.split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
