"""Ragged bag layout: a flat tensor of instances plus CSR-style offsets.

Bag b holds instances ``offsets[b]:offsets[b + 1]``; ``offsets`` is int64 of
length B + 1, starts at 0, is non-decreasing and ends at the number of
instances. This is the layout of ``torch.nested`` jagged tensors, whose
``values()`` and ``offsets()`` the ops accept directly.
"""
from __future__ import annotations

import math

import torch


def offsets_from_sizes(sizes) -> torch.Tensor:
    """Offsets (int64, length B + 1) of bags with the given sizes.

    Args:
        sizes: B non-negative bag sizes (sequence or 1-D integer tensor).

    Example:
        >>> offsets_from_sizes([3, 0, 2])
        tensor([0, 3, 3, 5])
    """
    if not isinstance(sizes, torch.Tensor) and len(sizes) == 0:
        sizes = torch.zeros(0, dtype=torch.int64)  # B = 0 (torch would make an empty list float32)
    sizes = torch.as_tensor(sizes)
    if sizes.dim() != 1:
        raise ValueError(f"sizes must be 1-D, got shape {tuple(sizes.shape)}")
    if sizes.is_floating_point() or sizes.is_complex() or sizes.dtype == torch.bool:
        raise ValueError(f"sizes must be integers, got dtype {sizes.dtype}")
    sizes = sizes.to(torch.int64)
    if sizes.numel() and bool((sizes < 0).any()):
        b = int(torch.nonzero(sizes < 0)[0])
        raise ValueError(f"sizes must be non-negative, got sizes[{b}] = {int(sizes[b])}")
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])


def sizes_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """Bag sizes ``offsets[1:] - offsets[:-1]``."""
    return offsets[1:] - offsets[:-1]


def bag_index(offsets: torch.Tensor, num_instances: int | None = None) -> torch.Tensor:
    """Bag of each instance, on offsets' device (``num_instances`` = offsets[-1] spares a sync)."""
    return torch.repeat_interleave(torch.arange(offsets.shape[0] - 1, device=offsets.device), offsets.diff(),
                                   output_size=num_instances)


def count_slot_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """Offsets of the per-count layout: n_b + 1 count slots per bag (k = 0..n_b), bag
    after bag, bag b's count k at ``offsets[b] + b + k`` (the layout of log_pmf's
    output and of count log-weights). It is a bag layout like ``offsets`` itself."""
    return offsets + torch.arange(offsets.shape[0], device=offsets.device)


def count_slot_bags(offsets: torch.Tensor, num_slots: int | None = None) -> torch.Tensor:
    """Bag of each count slot in the per-count layout (:func:`count_slot_offsets`), on
    offsets' device (``num_slots`` = offsets[-1] + B spares a sync)."""
    return bag_index(count_slot_offsets(offsets), num_slots)


def count_slots(offsets: torch.Tensor, num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, bag)`` of each count slot in the per-count layout: slot ``offsets[b] + b + k``
    holds count k of bag b (:func:`count_slot_offsets`)."""
    bag = count_slot_bags(offsets, num_slots)
    starts = count_slot_offsets(offsets)[:-1]
    return torch.arange(bag.shape[0], device=offsets.device) - starts[bag], bag


def bag_positions(offsets: torch.Tensor, which, slots: bool = False) -> torch.Tensor:
    """Positions of the bags numbered ``which``, bag after bag, each bag's in order
    (int64): of their instances, or with ``slots=True`` of their count slots in the
    per-count layout (:func:`count_slot_offsets`)."""
    layout = count_slot_offsets(offsets) if slots else offsets
    which = torch.as_tensor(which, dtype=torch.int64, device=offsets.device)
    sizes = layout.diff()[which]
    starts = layout[:-1][which]  # where each chosen bag starts in the input
    new_starts = torch.cumsum(sizes, 0) - sizes
    return (torch.repeat_interleave(starts - new_starts, sizes)
            + torch.arange(int(sizes.sum()), device=offsets.device))


def lattice_states(counts: torch.Tensor) -> torch.Tensor:
    """Each bag's exact multi-class E-step state count prod_c (counts[b, c] + 1), as
    float64 (it may pass int64)."""
    return (counts.double() + 1).prod(1)


def split_nested(logits, offsets, counts, op: str, takes_counts: bool = True):
    """Accept ``(logits, offsets[, counts])`` or ``(nested_logits[, counts])``.

    Returns ``(flat_logits, offsets, counts, nested)``; ``nested`` says whether
    the input was a jagged nested tensor (then outputs are returned nested, on
    the offsets returned here). ``takes_counts=False`` for ops without counts.
    """
    def plain(name, t):
        if getattr(t, "is_nested", False):
            raise ValueError(f"{op}: {name} must be a plain 1-D int64 tensor, got a nested tensor")

    if getattr(logits, "is_nested", False):
        if logits.layout != torch.jagged:
            raise ValueError(f"{op}: nested logits must use layout=torch.jagged, got {logits.layout}")
        if logits.dim() != 2:
            raise ValueError(f"{op}: nested logits must be (B, j) with one logit per instance, got {logits.dim()} dims")
        if offsets is not None and (counts is not None or not takes_counts):
            raise ValueError(f"{op}: with nested logits pass {'counts only, not offsets' if takes_counts else 'no offsets'}"
                             " (the nested tensor holds them)")
        counts = offsets if counts is None else counts
        plain("counts", counts)
        values, starts, lengths = logits.values(), logits.offsets(), logits._lengths
        if lengths is None:
            return values, starts, counts, True
        # A view with holes (built with lengths=, or by torch.nested.narrow): values()
        # still holds the skipped entries, so gather the bags out (differentiably;
        # the nested tensor's own contiguous() has no working backward for this).
        offsets = offsets_from_sizes(lengths.to(torch.int64).cpu()).to(starts.device)
        bag = bag_index(offsets, int(offsets[-1]))
        index = starts[:-1][bag] + torch.arange(bag.numel(), device=starts.device) - offsets[:-1][bag]
        return values[index], offsets, counts, True
    if offsets is None:
        raise ValueError(f"{op}: offsets is required unless logits is a torch.nested jagged tensor")
    plain("offsets", offsets)
    plain("counts", counts)
    return logits, offsets, counts, False


def check_bag_values(op: str, num_instances: int, offsets: torch.Tensor, counts: torch.Tensor | None = None) -> None:
    """The value checks of csrc/ops/checks.cpp (same order and words), for Python code
    that takes the bag layout without calling an op: ``offsets[0] = 0``, non-decreasing,
    ``offsets[-1] = num_instances`` and ``0 <= counts[b] <= n_b``. Shapes, dtypes and
    devices are checked before (mlellp_ext.ops._checks.check_layout)."""
    offsets = offsets.cpu()
    if int(offsets[0]) != 0:
        raise ValueError(f"{op}: offsets[0] must be 0, got {int(offsets[0])}")
    sizes = offsets.diff()
    if bool((sizes < 0).any()):
        b = int(torch.nonzero(sizes < 0)[0])
        raise ValueError(f"{op}: offsets must be non-decreasing, got offsets[{b + 1}] = {int(offsets[b + 1])} "
                         f"< offsets[{b}] = {int(offsets[b])}")
    if int(offsets[-1]) != num_instances:
        raise ValueError(f"{op}: offsets[-1] must equal len(logits) = {num_instances}, "
                         f"got offsets[{offsets.numel() - 1}] = {int(offsets[-1])}")
    if counts is None:
        return
    counts = counts.cpu()
    bad = (counts < 0) | (counts > sizes)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(f"{op}: counts[{b}] = {int(counts[b])} is outside [0, n_b] = [0, {int(sizes[b])}] for bag {b}")


def check_count_vectors(op: str, num_instances: int, offsets: torch.Tensor, counts: torch.Tensor,
                        max_states: int | None = None) -> None:
    """check_multiclass_values_host of csrc/ops/checks.cpp (same order and words) for
    (B, C) count vectors: offsets as :func:`check_bag_values`, then bag by bag: counts
    non-negative, none above the bag's size, the row summing to it, and (if
    ``max_states``) the bag's lattice within ``max_states`` states."""
    check_bag_values(op, num_instances, offsets)
    offsets, counts = offsets.cpu(), counts.cpu()
    sizes = offsets.diff()
    negative = (counts < 0).any(1)
    over = (counts > sizes.unsqueeze(1)).any(1)
    wrong_sum = counts.sum(1) != sizes
    bad = negative | over | wrong_sum
    if max_states is not None:
        # Candidates by float; the verdict by exact integers (the product may pass int64).
        log_states = (counts.clamp(min=0).double() + 1).log().sum(1)
        big = log_states > math.log(max_states) - 1e-6
        big &= torch.tensor([math.prod(int(v) + 1 for v in row) > max_states if flag else False
                             for row, flag in zip(counts.tolist(), big.tolist())], dtype=torch.bool)
        bad |= big
    if not bool(bad.any()):
        return
    b = int(torch.nonzero(bad)[0])
    row = counts[b].tolist()
    text = "[" + ", ".join(str(v) for v in row) + "]"
    for c, v in enumerate(row):
        if v < 0:
            raise ValueError(f"{op}: counts must be non-negative, got counts[{b}, {c}] = {v}")
    n = int(sizes[b])
    for c, v in enumerate(row):
        if v > n:
            raise ValueError(f"{op}: counts[{b}] = {text} has {v} in class {c} but bag {b} has {n} instances")
    if sum(row) != n:
        raise ValueError(f"{op}: counts[{b}] = {text} sums to {sum(row)} but bag {b} has {n} instances "
                         f"(offsets[{b + 1}] - offsets[{b}])")
    states = float(lattice_states(counts[b:b + 1]))
    raise ValueError(f"{op}: bag {b} with counts {text} has {states:g} count-vector states (prod(counts + 1)), "
                     f"over max_states = {max_states}; raise max_states if its tables (16 bytes per state) fit in "
                     f"memory, or use the approximate E-step (mlellp_ext.posterior_multiclass_approx) for such bags")


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_over_bags(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-bag values (B,) reduced as ``reduction`` says. ``'mean'`` divides the sum by
    max(B, 1): over zero bags it is 0 with a zero gradient (the empty sum), not the
    NaN of ``Tensor.mean``, so an empty minibatch cannot poison a training step."""
    if reduction == "mean":
        return values.sum() / max(values.shape[0], 1)
    if reduction == "sum":
        return values.sum()
    return values
