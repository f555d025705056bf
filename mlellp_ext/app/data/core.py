"""The bag model: instances, bags and a train/test split, and the ways bags are
formed (random sizes), chosen (:func:`subset_bags`) and split (:func:`split_bags`).
Every bad input raises :class:`DataError`."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ...bags import bag_index, bag_positions, offsets_from_sizes, sizes_from_offsets

DEFAULT_BAG_SIZE = (2, 12)  # random bags, as in the seed paper
DEFAULT_TEST_FRACTION = 0.2

class DataError(ValueError):
    """A bad dataset, file or option; the message names the file and line where there is one."""


@dataclass
class InstanceData:
    # images: uint8 (N, C, H, W); float32 (N, C, H, W) for digits; ImageFiles (decoded when
    # indexed) for the image-file datasets, manifest and family-faces
    x: "torch.Tensor | ImageFiles"  # noqa: F821 (images.ImageFiles, which imports this module)
    y: torch.Tensor | None  # int64 (N,) instance labels in 0..C-1; None when unknown
    classes: list[str]  # names of labels 0..C-1 (C = 2: a binary problem, counts of label 1)
    is_rgb: bool  # True for 3-channel natural images (augmentation applies)
    source: str  # human-readable description of where the data came from


@dataclass
class Bags:
    index: torch.Tensor  # int64 (M,) instance indices into InstanceData, bag after bag
    offsets: torch.Tensor  # int64 (B+1,), offsets[0]=0, bag b = index[offsets[b]:offsets[b+1]]
    counts: torch.Tensor  # int64 (B,) positives per bag with 2 classes; (B, C) count vectors with C >= 3
    bag_ids: list[str]  # (B,) a name per bag (str(b) for random bags, the given id otherwise)
    # Counts known only up to a likelihood (intervals, noise): log P(observation | S_b = k) at
    # offsets[b] + b + k (mlellp_ext.count_weights); counts then holds a point value of it
    # (the clipped observed count, an interval's midpoint) for methods that need one.
    count_log_weights: torch.Tensor | None = None


@dataclass
class BagDataset:
    data: InstanceData  # all instances (train and test bags index into it)
    train: Bags
    test: Bags


def instance_labels_available(data) -> bool:
    """Whether instance labels are known (for evaluation); accepts InstanceData or BagDataset."""
    if isinstance(data, BagDataset):
        data = data.data
    return data.y is not None


def check_size_range(size_range) -> tuple[int, int]:
    lo, hi = (int(v) for v in size_range)
    if lo < 1 or lo > hi:
        raise DataError(f"bag sizes must satisfy 1 <= LO <= HI, got LO={lo}, HI={hi}")
    return lo, hi


def random_bags(num_instances: int, num_bags: int | None, size_range: tuple[int, int],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of uniform random sizes in ``[lo, hi]`` (inclusive), instances drawn without replacement.

    Returns ``(index, offsets)``. With ``num_bags=None`` sizes are drawn until the
    next bag would not fit, so almost every instance is used; a given ``num_bags``
    whose drawn sizes sum past ``num_instances`` raises :class:`DataError` (the
    sizes are random, so whether they fit depends on the seed, not only on the
    expected total). Sizes are drawn before the permutation, so a seed fixes both.
    """
    lo, hi = check_size_range(size_range)
    n = int(num_instances)
    if n < 0:
        raise DataError(f"num_instances must be non-negative, got {n}")
    if num_bags is None:
        # At most n // lo bags can fit; keep the prefix whose running total fits.
        sizes = torch.randint(lo, hi + 1, (n // lo,), generator=generator, dtype=torch.int64)
        sizes = sizes[torch.cumsum(sizes, 0) <= n]
        if len(sizes) == 0:
            raise DataError(f"only {n} instances available, fewer than the smallest bag size {lo}")
    else:
        num_bags = int(num_bags)
        if num_bags < 1:
            raise DataError(f"the number of bags must be at least 1, got {num_bags}")
        sizes = torch.randint(lo, hi + 1, (num_bags,), generator=generator, dtype=torch.int64)
        need = int(sizes.sum())
        if need > n:
            raise DataError(
                f"{num_bags} bags of sizes {lo}..{hi} need {need} instances (about "
                f"{num_bags * (lo + hi) / 2:.0f} expected) but only {n} are available; "
                f"ask for fewer bags or smaller bags")
    perm = torch.randperm(n, generator=generator)
    return perm[: int(sizes.sum())].contiguous(), offsets_from_sizes(sizes)


def bag_weights(count_log_weights: torch.Tensor, offsets: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The count log-weights of the bags numbered ``which``, in their own layout (bag
    after bag, n_b + 1 entries each; bag b's start at ``offsets[b] + b`` in the input)."""
    return count_log_weights[bag_positions(offsets, which, slots=True)]


def subset_bags(bags: Bags, which: torch.Tensor) -> Bags:
    """The bags numbered ``which`` (int64, in that order), re-packed contiguously."""
    which = torch.as_tensor(which, dtype=torch.int64)
    offsets = offsets_from_sizes(sizes_from_offsets(bags.offsets)[which])
    weights = None if bags.count_log_weights is None else bag_weights(bags.count_log_weights, bags.offsets, which)
    return Bags(index=bags.index[bag_positions(bags.offsets, which)], offsets=offsets,
                counts=bags.counts[which].clone(), bag_ids=[bags.bag_ids[int(b)] for b in which],
                count_log_weights=weights)


def split_bags(bags: Bags, test_fraction: float, generator: torch.Generator) -> tuple[Bags, Bags]:
    """Random split of whole bags into ``(train, test)``; a bag is never split.

    The test set gets ``round(test_fraction * B)`` bags (use 0.2 by default), but
    at least one when ``test_fraction > 0`` and there are two or more bags, and
    never all of them, so neither side is unexpectedly empty. Both keep the
    original bag order.
    """
    test_fraction = float(test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test fraction must be in [0, 1), got {test_fraction}")
    num = len(bags.bag_ids)
    n_test = int(math.floor(test_fraction * num + 0.5))
    if test_fraction > 0 and num >= 2:
        n_test = max(n_test, 1)
    n_test = min(n_test, max(num - 1, 0))
    perm = torch.randperm(num, generator=generator)
    test = perm[:n_test].sort().values
    train = perm[n_test:].sort().values
    return subset_bags(bags, train), subset_bags(bags, test)


def parse_bag_size(text: str) -> tuple[int, int]:
    """``'2:12'`` -> ``(2, 12)``; ``'5'`` -> ``(5, 5)``; anything else raises DataError."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", str(text))
    if m is None:
        raise DataError(f"--bag-size must be LO:HI or N (e.g. 2:12 or 5), got {text!r}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1 or lo > hi:
        raise DataError(f"--bag-size must be LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def bag_counts(y: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """What a learner may see of each bag's labels: its number of positives (B,) for two
    classes, its count vector (B, C) for C >= 3 (``counts[b, c]``: instances of class c)."""
    num_bags = offsets.numel() - 1
    bag = bag_index(offsets, index.numel())
    if num_classes == 2:
        return torch.zeros(num_bags, dtype=torch.int64).index_add_(0, bag, y[index])
    one_hot = torch.nn.functional.one_hot(y[index], num_classes)
    return torch.zeros(num_bags, num_classes, dtype=torch.int64).index_add_(0, bag, one_hot)


def random_labelled_bags(y: torch.Tensor, lo_hi, num_bags, generator, num_classes: int = 2, start: int = 0,
                         first_id: int = 0) -> Bags:
    """Random bags over instances ``start .. start + len(y) - 1`` with counts from ``y``."""
    index, offsets = random_bags(len(y), num_bags, lo_hi, generator)
    counts = bag_counts(y, index, offsets, num_classes)
    ids = [str(first_id + b) for b in range(len(offsets) - 1)]
    return Bags(index=index + start, offsets=offsets, counts=counts, bag_ids=ids)
