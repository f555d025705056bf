"""Network inputs of instances, and each process's minibatches of instances or bags."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bags import offsets_from_sizes
from ..samplers import BagBatchSampler
from .augment import BatchAugment
from .distributed import SINGLE, World, pad_to, all_max, per_rank_batch_size


class _Decode(torch.utils.data.Dataset):
    """Dataset view of an ImageFiles for a DataLoader: item i is image i (3, H, W)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.files.image(i)


class Preprocess:
    """Index -> normalised float batch on the device, augmented when training.

    Augmentation (flips, blur, colour jitter: app.augment.BatchAugment, the
    distribution of torchvision's per-image pipeline as tensor operations on the
    whole batch, on the device) applies to RGB images only and is drawn per image
    from the global torch RNG, which the checkpoints save, so a resumed run sees
    the same draws. A subclass may override :meth:`augment_batch`.

    Images held as files (data.ImageFiles: manifest, family-faces) are decoded
    when needed. Given the coming batches (:meth:`plan`), ``workers`` processes
    of a torch DataLoader decode them ahead, in that order (pinned memory on
    CUDA); a call that does not match the plan decodes its images here. The
    DataLoader draws its seeds from a generator of its own, so the augmentation
    draws, and the results, are those of the same images held in memory.
    """

    def __init__(self, x, is_rgb: bool, augment: bool, device: torch.device, workers: int = 0):
        self.x = x
        self.device = device
        self.workers = int(workers)
        self.lazy = not isinstance(x, torch.Tensor)
        self._coming, self._loader, self._last = [], None, None
        # Flips, blur and colour jitter of the whole batch on the device (app.augment)
        self.augment = BatchAugment() if augment and is_rgb else None

    def _stop(self) -> None:
        """Drop the plan and stop its workers now (waiting for the iterator's garbage
        collection can leave them running while an error is reported)."""
        stop = getattr(self._loader, "_shutdown_workers", None)  # DataLoader's own shutdown, where it has one
        if stop is not None:
            stop()
        self._coming, self._loader, self._last = [], None, None

    def plan(self, batches: list[torch.Tensor]) -> None:
        """The instance indices of the coming calls, in order (for files: decode them ahead)."""
        if not self.lazy:
            return
        self._stop()
        self._coming = [b.reshape(-1) for b in batches]
        if self._coming and self.workers > 0:
            loader = torch.utils.data.DataLoader(
                _Decode(self.x), batch_sampler=[b.tolist() for b in self._coming], num_workers=self.workers,
                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))
            self._loader = iter(loader)

    def _images(self, index: torch.Tensor) -> torch.Tensor:
        if not self.lazy:
            return self.x[index]
        flat = index.reshape(-1)
        if self._coming and torch.equal(self._coming[0], flat):
            self._last = self._coming.pop(0)
            if self._loader is not None:
                try:
                    return next(self._loader)
                except Exception:  # noqa: BLE001  (a worker's error, or a worker killed)
                    # Stop the workers and decode here, which raises the file's own DataError (or succeeds).
                    self._stop()
        elif self._last is not None and torch.equal(self._last, flat):
            pass  # the batch just served, asked again (a second view of it): decode it here, keep the plan
        else:  # not the planned batch: the plan no longer holds
            self._stop()
        return self.x[index]

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> augmented float images in [0, 1] on the device."""
        x = x.to(self.device, non_blocking=True)
        # uint8 goes to the op as it is (it divides by 255 as it reads)
        return self.augment(x if x.dtype == torch.uint8 else x.float())

    def __call__(self, index: torch.Tensor, train: bool) -> torch.Tensor:
        x = self._images(index)
        if train and self.augment is not None:
            x = self.augment_batch(x)
        else:
            x = x.to(self.device, non_blocking=True)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - 0.5) / 0.5
        # channels_last on CUDA, as the network (app.precision)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x


class TrainingInputs:
    """Network inputs of training positions: ``inputs(positions, train)`` is the
    preprocessed batch of the instances ``index[positions]`` (a method sees
    positions in its own bag layout, never the dataset's labels)."""

    def __init__(self, preprocess: Preprocess, index: torch.Tensor):
        self.preprocess, self.index = preprocess, index

    def __call__(self, positions: torch.Tensor, train: bool) -> torch.Tensor:
        return self.preprocess(self.index[positions], train=train)

    def plan(self, batches: list[torch.Tensor]) -> None:
        """The positions of the coming calls, in order (see Preprocess.plan)."""
        self.preprocess.plan([self.index[p] for p in batches])

    def __len__(self) -> int:
        return self.index.numel()


@dataclass
class BagBatch:
    positions: torch.Tensor  # positions into the flat bag layout
    offsets: torch.Tensor    # local offsets of the bags in this batch
    counts: torch.Tensor
    bags: torch.Tensor       # bag numbers


class Batches:
    """Shuffled minibatches of this process's training positions: of instances, or
    of whole bags (mlellp_ext.BagBatchSampler). Under torchrun each rank takes
    ``per_rank_batch_size`` instances per batch and every rank the same number of
    batches per epoch (a short rank repeats batches of a fresh shuffle), so that no
    collective waits for a rank that has finished."""

    def __init__(self, offsets: torch.Tensor, counts: torch.Tensor, batch_size: int, generator: torch.Generator,
                 world: World = SINGLE, on_plan=None):
        self.offsets, self.counts, self.world, self.generator = offsets, counts, world, generator
        self.on_plan = on_plan  # told each epoch's batches of positions, in order (TrainingInputs.plan)
        self.batch_size = per_rank_batch_size(batch_size, world)
        self.num_instances = int(offsets[-1])
        self.sampler = BagBatchSampler(offsets, self.batch_size, generator=generator)

    def _same_number(self, make) -> list:
        out = list(make())
        if not self.world.distributed:
            return out
        return pad_to(out, all_max(self.world, len(out)), make)

    def instances(self) -> list[torch.Tensor]:
        """Minibatches of positions 0..num_instances-1."""
        out = self._same_number(lambda: torch.randperm(self.num_instances, generator=self.generator)
                                .split(self.batch_size))
        if self.on_plan is not None:
            self.on_plan(out)
        return out

    def _bag_epoch(self) -> list[BagBatch]:
        out = []
        for bags in self.sampler.plan_epoch():
            bags = torch.tensor(bags, dtype=torch.int64)
            out.append(BagBatch(self.sampler.positions(bags), offsets_from_sizes(self.sampler.sizes[bags]),
                                self.counts[bags], bags))
        return out

    def bags(self) -> list[BagBatch]:
        """Minibatches of whole bags of about batch_size instances (empty bags left out)."""
        out = self._same_number(self._bag_epoch)
        if self.on_plan is not None:
            self.on_plan([b.positions for b in out])
        return out


@torch.no_grad()
def infer_logits(model, inputs, keys: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``inputs(keys, train=False)`` (a Preprocess and instance indices, or
    TrainingInputs and positions), network in eval mode, no augmentation (CPU tensor)."""
    was_training = model.training
    model.eval()
    chunks = keys.split(batch_size)
    if hasattr(inputs, "plan"):
        inputs.plan(list(chunks))
    out = [model(inputs(chunk, train=False)).float().cpu() for chunk in chunks]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
