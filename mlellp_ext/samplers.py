"""Minibatches of whole bags for ``torch.utils.data.DataLoader``."""
from __future__ import annotations

import torch

from .bags import bag_index, bag_positions, check_bag_values, offsets_from_sizes


class BagBatchSampler(torch.utils.data.Sampler):
    """Batches of whole bags, for ``DataLoader(dataset, batch_sampler=...)``.

    Yields lists of instance positions (indices into a dataset in the bag layout:
    bag b is positions ``offsets[b]:offsets[b + 1]``), bag after bag, each bag's
    positions in order. Bags are taken in a (shuffled) order and a batch closes
    once it holds at least ``batch_size`` instances, so a batch has about
    ``batch_size`` instances and a bag larger than that is a batch of its own.
    Every instance of a non-empty bag appears once per epoch; empty bags, which
    no loss can use, are left out.

    Args:
        offsets: (B + 1,) int64 bag offsets.
        batch_size: instances per batch (at least 1).
        shuffle: a new order of bags every epoch (default), else bag order.
        generator: ``torch.Generator`` for the shuffles (default: torch's global RNG).

    ``len()`` is the number of batches of the coming epoch: called before an
    epoch (as ``DataLoader`` and tqdm do), it draws that epoch's order, which the
    next ``iter()`` then uses; called during an epoch, it is the next one's.

    Use :meth:`bag_layout` to get a batch's local ``offsets`` and ``counts`` for bag
    losses (:func:`mlellp_ext.dllp_loss`, :func:`mlellp_ext.bag_log_likelihood`).
    """

    def __init__(self, offsets: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 generator: torch.Generator | None = None):
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64 \
                or offsets.numel() < 1:
            got = f"dtype {offsets.dtype}, shape {list(offsets.shape)}" if isinstance(offsets, torch.Tensor) \
                else type(offsets).__name__
            raise ValueError(f"BagBatchSampler: offsets must be a 1-D int64 tensor of length num_bags + 1, got {got}")
        offsets = offsets.cpu()
        check_bag_values("BagBatchSampler", int(offsets[-1]), offsets)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BagBatchSampler: batch_size must be a positive integer, got {batch_size!r}")
        self.offsets, self.batch_size, self.shuffle, self.generator = offsets, batch_size, shuffle, generator
        self.sizes = offsets.diff()
        self._bag_of = bag_index(offsets, int(offsets[-1]))
        self._planned = None

    def plan_epoch(self) -> list[list[int]]:
        """A fresh epoch's batches as lists of bag numbers (draws a new order when shuffling)."""
        num_bags = self.sizes.numel()
        order = torch.randperm(num_bags, generator=self.generator) if self.shuffle else torch.arange(num_bags)
        batches, batch, total = [], [], 0
        for b, n in zip(order.tolist(), self.sizes[order].tolist()):
            if n == 0:
                continue
            batch.append(b)
            total += n
            if total >= self.batch_size:
                batches.append(batch)
                batch, total = [], 0
        if batch:
            batches.append(batch)
        return batches

    def positions(self, bags) -> torch.Tensor:
        """The positions of these bags, bag after bag, each bag's in order (int64)."""
        return bag_positions(self.offsets, bags)

    def __len__(self) -> int:
        if self._planned is None:
            self._planned = self.plan_epoch()
        return len(self._planned)

    def __iter__(self):
        if self._planned is None:
            self._planned = self.plan_epoch()
        batches, self._planned = self._planned, None
        for bags in batches:
            yield self.positions(bags).tolist()

    def bag_layout(self, positions, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local ``(offsets, counts)`` of the bags in a batch, from its positions.

        Args:
            positions: the batch's positions in the order the sampler yielded them (as
                a ``DataLoader`` returns them: 1-D integer tensor or list).
            counts: (B,) int64 counts of all bags, or (B, C) count vectors.

        Returns:
            offsets (B_batch + 1,) and counts (B_batch,) or (B_batch, C), on the device
            of ``positions``.

        Raises ValueError if the positions are not whole bags, bag after bag.
        """
        positions = torch.as_tensor(positions)
        device = positions.device
        positions = positions.cpu()
        if positions.dim() != 1 or positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"bag_layout: positions must be a 1-D integer tensor, got dtype {positions.dtype}, "
                             f"shape {list(positions.shape)}")
        if not isinstance(counts, torch.Tensor) or counts.dim() not in (1, 2) \
                or counts.shape[0] != self.sizes.numel():
            got = list(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(f"bag_layout: counts must have shape [{self.sizes.numel()}] (one count per bag) or "
                             f"[{self.sizes.numel()}, C] (a count vector per bag), got {got}")
        n = self._bag_of.numel()
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise ValueError(f"bag_layout: positions must lie in [0, {n}), got values in "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        bags, run = torch.unique_consecutive(self._bag_of[positions], return_counts=True)
        if not torch.equal(run, self.sizes[bags]) or not torch.equal(positions, self.positions(bags)):
            raise ValueError("bag_layout: positions must hold whole bags, bag after bag, as the sampler "
                             "yields them")
        return offsets_from_sizes(run).to(device), counts[bags.to(counts.device)].to(device)
