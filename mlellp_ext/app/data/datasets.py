"""Instance data, bags and train/test splits for training from label proportions.

``load_dataset(name, ...)`` returns a :class:`BagDataset`: every instance in one
:class:`InstanceData`, and train and test :class:`Bags` that index into it in
the ragged layout of :mod:`mlellp_ext.bags` (``offsets`` of length B + 1) plus
each bag's counts, which is all a learner from label proportions may see: the
number of positives (B,) with two classes, a count vector (B, C) with C >= 3
(``len(InstanceData.classes)`` tells which). Instance labels, where known, are
kept for evaluation only.

Datasets:

* ``digits``: scikit-learn's bundled 8x8 digits (no download); label 1 = digit >= 5,
  or the digits named by ``classes`` ("3,8", "0,1,2", "all").
* ``npz``: a .npz file with ``x`` (N, H, W[, C]) uint8, ``y`` (N,) and optional ``classes``.
* ``cifar10``: torchvision's CIFAR-10 training set; ``classes="bird,cat"`` picks two.
* ``family-faces``: a folder of face crops ``BAGID-<anything>{f|m}.jpg``; a bag per BAGID.
* ``manifest``: your own images: an instances CSV ``path,bag[,label]`` and a counts CSV
  ``bag,count`` (two classes) or ``bag,CLASS1,...,CLASSC`` (a column per class).

``classes`` (digits, npz, cifar10) names two classes (A -> 0, B -> 1), three or
more (a C-way problem, labels in the order named) or ``all`` (every class present).

``family-faces`` and ``manifest`` images stay on disk (:class:`ImageFiles`, decoded
when indexed; their headers are checked when loading); the others are arrays in
memory. ``digits``, ``npz`` and ``cifar10`` form bags of uniform random sizes drawn
without replacement; all datasets then split whole bags into train and test.
Everything random comes from one ``torch.Generator`` seeded with ``seed``, so a
seed gives the same bags and split on every run and machine. Nothing is
downloaded unless ``download=True``. Every bad input raises :class:`DataError`
whose message names the file, and the line where there is one, so that a
mistake in the data is reported before any training starts.
"""
from __future__ import annotations

import csv
import math
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .. import count_weights
from ..bags import offsets_from_sizes, sizes_from_offsets

__all__ = [
    "BagDataset",
    "Bags",
    "DATASETS",
    "DataError",
    "InstanceData",
    "bag_of_instance",
    "instance_labels_available",
    "load_dataset",
    "parse_bag_size",
    "random_bags",
    "split_bags",
    "subset_bags",
]

DATASETS = ("digits", "npz", "cifar10", "family-faces", "manifest")
GIVEN_BAGS = ("family-faces", "manifest")  # bags come with the data; the others draw random bags
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FACE_SIZE = (96, 120)  # (width, height) of family-faces crops after resizing


DEFAULT_BAG_SIZE = (2, 12)  # random bags, as in the seed paper
DEFAULT_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A bad dataset, file or option; the message names the file and line where there is one."""


@dataclass
class InstanceData:
    # images: uint8 (N, C, H, W); float32 (N, C, H, W) for digits; ImageFiles (decoded when
    # indexed) for the image-file datasets, manifest and family-faces
    x: "torch.Tensor | ImageFiles"
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


# ---------------------------------------------------------------------------
# Bags


def bag_of_instance(bags: Bags) -> torch.Tensor:
    """int64 (M,): the bag number of each position in ``bags.index``."""
    sizes = sizes_from_offsets(bags.offsets)
    return torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), sizes)


def instance_labels_available(data) -> bool:
    """Whether instance labels are known (for evaluation); accepts InstanceData or BagDataset."""
    if isinstance(data, BagDataset):
        data = data.data
    return data.y is not None


def _check_size_range(size_range) -> tuple[int, int]:
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
    lo, hi = _check_size_range(size_range)
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
    which = torch.as_tensor(which, dtype=torch.int64)
    sizes = (offsets[1:] - offsets[:-1])[which]
    starts = offsets[:-1][which] + which  # where each chosen bag's entries start in the input
    new_starts = torch.cumsum(sizes + 1, 0) - (sizes + 1)
    pos = torch.repeat_interleave(starts - new_starts, sizes + 1) + torch.arange(int((sizes + 1).sum()))
    return count_log_weights[pos]


def subset_bags(bags: Bags, which: torch.Tensor) -> Bags:
    """The bags numbered ``which`` (int64, in that order), re-packed contiguously."""
    which = torch.as_tensor(which, dtype=torch.int64)
    sizes = sizes_from_offsets(bags.offsets)[which]
    offsets = offsets_from_sizes(sizes)
    # Position j of new bag k is old position starts[k] + (j - offsets[k]).
    shift = torch.repeat_interleave(bags.offsets[:-1][which] - offsets[:-1], sizes)
    pos = shift + torch.arange(int(offsets[-1]), dtype=torch.int64)
    weights = None if bags.count_log_weights is None else bag_weights(bags.count_log_weights, bags.offsets, which)
    return Bags(index=bags.index[pos], offsets=offsets, counts=bags.counts[which].clone(),
                bag_ids=[bags.bag_ids[int(b)] for b in which], count_log_weights=weights)


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


def _bag_counts(y: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """What a learner may see of each bag's labels: its number of positives (B,) for two
    classes, its count vector (B, C) for C >= 3 (``counts[b, c]``: instances of class c)."""
    sizes = sizes_from_offsets(offsets)
    bag = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), sizes)
    if num_classes == 2:
        return torch.zeros(len(sizes), dtype=torch.int64).index_add_(0, bag, y[index])
    one_hot = torch.nn.functional.one_hot(y[index], num_classes)
    return torch.zeros(len(sizes), num_classes, dtype=torch.int64).index_add_(0, bag, one_hot)


def _random_labelled_bags(y: torch.Tensor, lo_hi, num_bags, generator, num_classes: int = 2, start: int = 0,
                          first_id: int = 0) -> Bags:
    """Random bags over instances ``start .. start + len(y) - 1`` with counts from ``y``."""
    index, offsets = random_bags(len(y), num_bags, lo_hi, generator)
    counts = _bag_counts(y, index, offsets, num_classes)
    ids = [str(first_id + b) for b in range(len(offsets) - 1)]
    return Bags(index=index + start, offsets=offsets, counts=counts, bag_ids=ids)


# ---------------------------------------------------------------------------
# Labels and arrays


def _parse_classes(classes: str) -> list[str] | None:
    """``"A,B[,C...]"`` -> the names; ``"all"`` -> None (every class present)."""
    if str(classes).strip().lower() == "all":
        return None
    parts = [p.strip() for p in str(classes).split(",")]
    if len(parts) < 2 or not all(parts):
        raise DataError(f"--classes must be 'all' or two or more classes separated by commas "
                        f"(e.g. bird,cat or airplane,bird,cat), got {classes!r}")
    return parts


def _select_classes(y: np.ndarray, names: list[str] | None, classes: str | None, where: str,
                    required: bool = True):
    """Pick the instances of the classes named by ``classes`` and relabel them 0..C-1.

    Returns ``(keep, labels, class_names, values)``: indices of the kept instances,
    their labels (the i-th class named -> i), the C class names and the label
    values they had. ``required=False`` lets a named class have no instances
    (a test set drawn with a training set's classes). A class is named by
    its name in ``names`` or by its integer label value; ``"all"`` keeps every
    class present, in label order. ``None`` requires the labels to be 0/1
    already (a binary dataset). C = 2 is the binary problem (label 1 = the
    second class); C >= 3 trains a C-way classifier from count vectors.
    """
    present = np.unique(y).tolist()
    shown = ", ".join(str(v) for v in present[:20]) + (", ..." if len(present) > 20 else "")
    if classes is None:
        if not set(present) <= {0, 1}:
            raise DataError(f"{where}: labels are not binary 0/1 (found {shown}); pass --classes A,B to pick "
                            f"two classes, or --classes all (or three or more names) for multi-class bags")
        cls = [str(names[0]), str(names[1])] if names is not None and len(names) >= 2 else ["0", "1"]
        return np.arange(len(y)), y.astype(np.int64), cls, [0, 1]
    parts = _parse_classes(classes)
    if parts is None:
        if len(present) < 2:
            raise DataError(f"{where}: --classes all needs at least two classes, found only {shown}")
        values = present
    else:
        values = []
        for part in parts:
            if names is not None and part in names:
                v = names.index(part)
            elif re.fullmatch(r"[+-]?\d+", part):
                v = int(part)
            else:
                v = None
            if v is None or (required and v not in present):
                if names is not None:
                    avail = "available names: " + ", ".join(names)
                else:
                    avail = "available label values: " + shown
                what = "has no instances" if v is not None else "is unknown"
                raise DataError(f"{where}: class {part!r} {what}; {avail}")
            if v in values:
                raise DataError(f"{where}: --classes {classes!r} names the same class twice ({part!r})")
            values.append(v)
    cls = [str(names[v]) if names is not None and 0 <= v < len(names) else str(v) for v in values]
    lookup = np.full(max(values) - min(min(values), 0) + 1, -1, dtype=np.int64)
    lookup[np.asarray(values) - min(min(values), 0)] = np.arange(len(values))
    keep = np.flatnonzero(np.isin(y, values))
    return keep, lookup[y[keep] - min(min(values), 0)], cls, list(values)


def _describe_classes(cls: list[str]) -> str:
    """'bird (0) and cat (1)', or 'airplane (0), ..., truck (9)' for many classes."""
    named = [f"{c} ({i})" for i, c in enumerate(cls)]
    return " and ".join(named) if len(cls) == 2 else ", ".join(named)


def _images_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 (N, H, W[, C]) array -> uint8 (N, C, H, W) tensor."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: x must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{where}: x must have shape (N, H, W, C) or (N, H, W), got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _load_npz(path: str, classes: str | None, required: bool = True):
    """(x uint8 NCHW, y int64 0..C-1, class names, whether the file names its classes,
    the label values of the classes) from a .npz."""
    if not path:
        raise DataError("the npz dataset needs --data-root pointing to a .npz file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: npz file not found")
    # np.load reads any file that is neither a zip nor a .npy as a pickle, and would
    # report "pickled (object) data" for a text file: say what the file is instead.
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise DataError(f"{path}: a single .npy array, not an .npz archive (save x and y with numpy.savez)")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (a zip of .npy arrays, as numpy.savez writes; "
                        f"this file starts with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("x", "y", "classes")}
    except ValueError as e:  # object arrays need pickle, which we refuse to run
        raise DataError(f"{path}: cannot read arrays ({e}); store classes as a string array, not objects") from e
    except Exception as e:  # noqa: BLE001  (not a zip / truncated file)
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (need x and y, optional classes)")
    x, y = arrays["x"], arrays["y"]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{path}: y must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{path}: x has {len(x)} images but y has {len(y)} labels")
    names = [str(c) for c in arrays["classes"].reshape(-1).tolist()] if "classes" in arrays else None
    keep, labels, cls, values = _select_classes(y.astype(np.int64), names, classes, path, required)
    if len(keep) == 0:
        raise DataError(f"{path}: no instances")
    xt = _images_nchw(x, path)
    if len(keep) != len(y):
        xt = xt[torch.from_numpy(keep)]
    return xt, torch.from_numpy(labels), cls, names is not None, values


# ---------------------------------------------------------------------------
# Images


def _read_rgb(path: str, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3), resized (bilinear) to ``size`` = (width, height) if given."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
        raise DataError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from e


def _check_header(path: str, where: str) -> tuple[int, int]:
    """(width, height) of an image file, read without decoding it (PIL's verify: the
    header, and for PNG the checksums of the whole file); DataError naming the file and
    ``where`` if it is not a readable image. A file broken in a way only decoding
    finds (a truncated JPEG) is named when it is first decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # reads the file through (for PNG, its checksums) without decoding it
            return size
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
        raise DataError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from e


class ImageFiles:
    """Images read from their files when indexed, not held in memory: ``x[index]``
    (an int, a slice, a 1-D integer tensor or list, or a tuple whose first entry is
    one of those) decodes those files, resized (bilinear) to ``size`` = (width, height),
    into uint8 (k, 3, H, W), as the in-memory datasets hold them. ``shape`` and
    ``dtype`` are those of the whole stack. Picklable, for DataLoader workers."""

    dtype = torch.uint8

    def __init__(self, paths: list[str], size: tuple[int, int], where: list[str]):
        self.paths, self.size, self.where = list(paths), tuple(size), list(where)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size[1], self.size[0]))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, H, W)."""
        return torch.from_numpy(np.ascontiguousarray(_read_rgb(self.paths[i], self.size, self.where[i])
                                                     .transpose(2, 0, 1)))

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            key = list(range(len(self)))[key]
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            out = self.image(int(key))
            return out[rest] if rest else out
        else:
            key = torch.as_tensor(key)
            if key.dtype == torch.bool or key.is_floating_point() or key.dim() != 1:
                raise IndexError(f"ImageFiles: index with an int, a slice or a 1-D integer tensor/list, got "
                                 f"dtype {key.dtype}, shape {list(key.shape)}")
            index = key.long().tolist()
            out = torch.stack([self.image(i) for i in index]) if index else torch.empty(0, *self.shape[1:],
                                                                                        dtype=torch.uint8)
        return out[(slice(None),) + rest] if rest else out


# ---------------------------------------------------------------------------
# Datasets


def _load_digits(classes: str | None = None):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0)[:, None])
    if classes is None:
        y = torch.from_numpy((d.target >= 5).astype(np.int64))
        return InstanceData(x=x, y=y, classes=["digit<5", "digit>=5"], is_rgb=False,
                            source=f"scikit-learn load_digits: {len(y)} 8x8 digit images, label 1 = digit >= 5")
    where = "digits"
    keep, y, cls, _ = _select_classes(d.target.astype(np.int64), [str(k) for k in range(10)], classes, where)
    return InstanceData(x=x[torch.from_numpy(keep)], y=torch.from_numpy(y), classes=cls, is_rgb=False,
                        source=f"scikit-learn load_digits: {len(keep)} 8x8 images of the digits {', '.join(cls)}")


def _load_cifar10(root: str | None, classes: str | None, download: bool, train: bool = True):
    if not classes:
        raise DataError("cifar10 needs --classes: two CIFAR-10 classes A,B (e.g. bird,cat), three or more, or all")
    if not root:
        raise DataError("cifar10 needs --data-root, the folder that holds (or will hold) cifar-10-batches-py")
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=root, train=train, download=download)
    except RuntimeError as e:
        if download:
            raise DataError(f"{root}: could not download CIFAR-10 ({e})") from e
        raise DataError(f"{root}: CIFAR-10 not found there; pass --download to download it ({e})") from e
    except Exception as e:  # noqa: BLE001  (network errors when downloading)
        raise DataError(f"{root}: could not load CIFAR-10 ({type(e).__name__}: {e})") from e
    where = f"CIFAR-10 in {root}"
    keep, labels, cls, _ = _select_classes(np.asarray(ds.targets, dtype=np.int64), list(ds.classes), classes, where)
    x = _images_nchw(np.asarray(ds.data)[keep], where)
    return x, torch.from_numpy(labels), cls


def _face_files(root: str | None):
    """Sorted ``[(bag_id, file_name, label)]`` for a family-faces folder."""
    if not root:
        raise DataError("family-faces needs --data-root, a folder of face crops named BAGID-<anything>{f|m}.jpg")
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a folder")
    entries = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        # Hidden files (.DS_Store) and subfolders are not face crops; anything else must match.
        if name.startswith(".") or os.path.isdir(full):
            continue
        stem, ext = os.path.splitext(name)
        bag, sep, rest = stem.partition("-")
        if ext.lower() not in IMAGE_EXTENSIONS or not sep or not bag or not rest or rest[-1].lower() not in "fm":
            raise DataError(f"{full}: file name does not match BAGID-<anything>{{f|m}}.EXT "
                            f"with EXT one of {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}")
        entries.append((bag, name, 1 if rest[-1].lower() == "f" else 0))
    if not entries:
        raise DataError(f"{root}: no face images found")
    entries.sort()
    return entries


def _load_family_faces(root, num_bags):
    entries = _face_files(root)
    bag_order = sorted({bag for bag, _, _ in entries})
    if num_bags is not None:
        if int(num_bags) < 1:
            raise DataError(f"the number of bags must be at least 1, got {num_bags}")
        bag_order = bag_order[: int(num_bags)]
        kept = set(bag_order)
        entries = [e for e in entries if e[0] in kept]
    # entries is sorted by bag id, so each bag's instances are contiguous.
    paths = [os.path.join(root, name) for _, name, _ in entries]
    for path in paths:  # a quick header check: every unreadable file is named before training
        _check_header(path, path)
    images = ImageFiles(paths, FACE_SIZE, paths)
    y = torch.tensor([lab for _, _, lab in entries], dtype=torch.int64)
    per_bag = Counter(bag for bag, _, _ in entries)
    sizes = torch.tensor([per_bag[b] for b in bag_order], dtype=torch.int64)
    index = torch.arange(len(entries), dtype=torch.int64)
    offsets = offsets_from_sizes(sizes)
    bags = Bags(index=index, offsets=offsets, counts=_bag_counts(y, index, offsets), bag_ids=list(bag_order))
    data = InstanceData(x=images, y=y, classes=["m", "f"], is_rgb=True,
                        source=f"family-faces folder {root}: {len(entries)} faces in {len(bag_order)} "
                               f"groups, resized to {FACE_SIZE[1]}x{FACE_SIZE[0]}")
    return data, bags


def _read_csv(path: str, what: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
              all_columns: bool = False):
    """Header column positions and ``[(line, fields)]`` of a CSV; blank rows skipped
    (with ``all_columns``, also the header's names as written).

    Line numbers are 1-based with the header as line 1, as an editor shows them.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} file not found")
    rows = []
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark before the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for row in reader:
                fields = [c.strip() for c in row]
                if any(fields):
                    rows.append((reader.line_num, fields))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read {what} CSV ({e})") from e
    expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    if header is None:
        raise DataError(f"{path}, line 1: empty file, expected a header row {expected}")
    names = [h.strip() for h in header]
    header = [h.lower() for h in names]
    for col in required:
        if col not in header:
            raise DataError(f"{path}, line 1: missing column {col!r} in the header "
                            f"(found {','.join(header)}; expected {expected})")
    seen = set()
    for h in header:
        if h and h in seen:  # empty names: trailing commas a spreadsheet may save
            raise DataError(f"{path}, line 1: column {h!r} appears twice in the header")
        seen.add(h)
    cols = {c: header.index(c) for c in required + optional if c in header}
    if all_columns:
        return cols, rows, names
    return cols, rows


def _field(fields: list[str], cols: dict[str, int], name: str) -> str:
    i = cols[name]
    return fields[i] if i < len(fields) else ""


COUNT_NOISES = ("laplace", "gaussian")


def parse_count_noise(text: str) -> tuple[str, float]:
    """``'laplace:1.5'`` -> ``('laplace', 1.5)``; ``'gaussian:SIGMA'`` likewise."""
    m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9.eE+-]+)\s*", str(text))
    kind, value = (m.group(1).lower(), m.group(2)) if m else (None, None)
    try:
        value = float(value) if value is not None else None
    except ValueError:
        value = None
    if kind not in COUNT_NOISES or value is None or not (math.isfinite(value) and value > 0):
        raise DataError(f"--count-noise must be laplace:SCALE or gaussian:SIGMA with a positive number, got {text!r}")
    return kind, value


def noise_weights(noise: tuple[str, float], observed: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Count log-weights of observations ``observed`` (true count plus noise) under ``noise``."""
    kind, value = noise
    return (count_weights.laplace if kind == "laplace" else count_weights.gaussian)(observed, value, sizes)


def _count_columns(counts_path: str):
    """The counts CSV's rows and layout: ``(cols, rows, count_columns, classes)``.
    ``bag,count`` is two classes named 0 and 1 (count = instances of 1);
    ``bag,count_lo,count_hi`` the same with the count known to lie in an interval;
    otherwise every column but ``bag`` is a class, named by its header (two or more)."""
    cols, rows, names = _read_csv(counts_path, "counts", ("bag",), all_columns=True)
    lower = [n.lower() for n in names]
    class_cols = [i for i, n in enumerate(lower) if n not in ("bag", "")]
    if "count_lo" in lower or "count_hi" in lower:
        others = [names[i] for i in class_cols if lower[i] not in ("count_lo", "count_hi")]
        if others or not ("count_lo" in lower and "count_hi" in lower):
            raise DataError(f"{counts_path}, line 1: an interval of counts needs the header bag,count_lo,count_hi "
                            f"(two classes; the count of class 1 lies in [count_lo, count_hi]), found "
                            f"{','.join(names)}")
        return cols, rows, [lower.index("count_lo"), lower.index("count_hi")], ["0", "1"]
    if "count" in lower:
        others = [names[i] for i in class_cols if lower[i] != "count"]
        if others:
            raise DataError(f"{counts_path}, line 1: the header has a 'count' column and other columns "
                            f"({', '.join(others)}): use bag,count for two classes, or bag,CLASS1,CLASS2,... "
                            f"with a count per class and no total")
        return cols, rows, [lower.index("count")], ["0", "1"]
    if len(class_cols) < 2:
        raise DataError(f"{counts_path}, line 1: missing column 'count' in the header (found {','.join(names)}; "
                        f"expected bag,count for two classes or bag,CLASS1,CLASS2,... for a count per class)")
    return cols, rows, class_cols, [names[i] for i in class_cols]


def _parse_label(text: str, classes: list[str], where: str) -> int | None:
    """An instances CSV label: '' (unknown), a class name, or a label value 0..C-1."""
    if text == "":
        return None
    if text in classes:
        return classes.index(text)
    if re.fullmatch(r"0|[1-9]\d*", text) and int(text) < len(classes):
        return int(text)
    if classes == ["0", "1"]:
        raise DataError(f"{where}: label must be 0 or 1, got {text!r}")
    raise DataError(f"{where}: label must be a class name ({', '.join(classes)}) or its number "
                    f"0..{len(classes) - 1}, got {text!r}")


def _load_manifest(csv_path: str | None, counts_path: str | None, num_bags, noise=None):
    """Instances, labels and given bags from an instances CSV and a counts CSV.

    Checks both files completely (cheap) before opening any image, so a typo is
    reported at once rather than after minutes of decoding.
    """
    if not csv_path:
        raise DataError("manifest needs --data-root, an instances CSV with columns path,bag[,label]")
    if not counts_path:
        raise DataError("manifest needs --counts-file, a CSV with columns bag,count (or bag,CLASS1,CLASS2,...)")
    cols, rows = _read_csv(csv_path, "instances", ("path", "bag"), ("label",))
    if not rows:
        raise DataError(f"{csv_path}: no instances after the header")
    ccols, crows, class_cols, classes = _count_columns(counts_path)
    lower_header = [h.lower() for h in _read_csv(counts_path, "counts", ("bag",), all_columns=True)[2]]
    interval = "count_lo" in lower_header
    if noise is not None and (interval or len(classes) > 2 or "count" not in lower_header):
        raise DataError(f"--count-noise applies to a counts CSV bag,count (one observed count per bag); "
                        f"{counts_path} has {','.join(lower_header)}")
    base = os.path.dirname(os.path.abspath(csv_path))
    paths, lines, labels, bag_of = [], [], [], []
    first_line: dict[str, int] = {}
    members: dict[str, list[int]] = {}  # bag id -> instance numbers, in order of first appearance
    listed: dict[tuple[str, str], int] = {}  # (bag id, real path) -> line
    for line, fields in rows:
        rel, bag = _field(fields, cols, "path"), _field(fields, cols, "bag")
        if not rel:
            raise DataError(f"{csv_path}, line {line}: empty path")
        if not bag:
            raise DataError(f"{csv_path}, line {line}: empty bag")
        label = _parse_label(_field(fields, cols, "label") if "label" in cols else "", classes,
                             f"{csv_path}, line {line}")
        full = rel if os.path.isabs(rel) else os.path.join(base, rel)
        if not os.path.isfile(full):
            raise DataError(f"{csv_path}, line {line}: image {rel!r} not found (looked for {full})")
        # The same file twice in one bag would count one instance twice against the
        # bag's count: refused rather than guessed at (across bags it is allowed).
        key = (bag, os.path.realpath(full))
        if key in listed:
            raise DataError(f"{csv_path}, line {line}: image {rel!r} is listed twice in bag {bag!r} (first on "
                            f"line {listed[key]}); list each image once per bag")
        listed[key] = line
        first_line.setdefault(bag, line)
        members.setdefault(bag, []).append(len(paths))
        paths.append(full)
        lines.append(line)
        labels.append(label)
        bag_of.append(bag)

    counts: dict[str, list[int]] = {}
    count_line: dict[str, int] = {}
    for line, fields in crows:
        bag = _field(fields, ccols, "bag")
        where = f"{counts_path}, line {line}"
        if not bag:
            raise DataError(f"{where}: empty bag")
        if bag in counts:
            raise DataError(f"{where}: bag {bag!r} is listed twice (first on line {count_line[bag]})")
        if bag not in members:
            raise DataError(f"{where}: bag {bag!r} has no instances in {csv_path}")
        size = len(members[bag])
        vector = []
        labels_of = ["count_lo", "count_hi"] if interval else classes if len(class_cols) > 1 else ["count"]
        for i, name in zip(class_cols, labels_of):
            text = fields[i] if i < len(fields) else ""
            what = name if interval or len(class_cols) == 1 else f"count of class {name!r}"
            if noise is not None:  # an observation with noise: any integer (laplace) or number (gaussian)
                pattern = r"[+-]?\d+" if noise[0] == "laplace" else r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
                if not re.fullmatch(pattern, text):
                    kind = "an integer" if noise[0] == "laplace" else "a number"
                    raise DataError(f"{where}: {what} {text!r} for bag {bag!r} is not {kind} "
                                    f"(--count-noise {noise[0]}:{noise[1]:g})")
                if not math.isfinite(float(text)):
                    raise DataError(f"{where}: {what} {text!r} for bag {bag!r} is not finite")
                vector.append(float(text))
                continue
            if not re.fullmatch(r"[+-]?\d+", text):
                raise DataError(f"{where}: {what} {text!r} for bag {bag!r} is not an integer")
            count = int(text)
            if count < 0:
                raise DataError(f"{where}: {what} {count} for bag {bag!r} is negative")
            if count > size:
                raise DataError(f"{where}: {what} {count} for bag {bag!r} is larger than its {size} instances")
            vector.append(count)
        if interval and vector[0] > vector[1]:
            raise DataError(f"{where}: count_lo {vector[0]} for bag {bag!r} is larger than its count_hi {vector[1]}")
        if len(vector) > 1 and not interval and sum(vector) != size:
            raise DataError(f"{where}: the counts of bag {bag!r} sum to {sum(vector)}, but it has {size} "
                            f"instances in {csv_path} (every instance is of exactly one class)")
        counts[bag] = vector
        count_line[bag] = line
    for bag, line in first_line.items():
        if bag not in counts:
            raise DataError(f"{csv_path}, line {line}: bag {bag!r} has no count in {counts_path}")

    bag_order = list(members)
    if num_bags is not None:
        if int(num_bags) < 1:
            raise DataError(f"the number of bags must be at least 1, got {num_bags}")
        bag_order = bag_order[: int(num_bags)]
    # Instances are stored bag after bag, so index is simply 0..M-1.
    order = [i for bag in bag_order for i in members[bag]]
    size = None
    for i in order:  # a quick header check: every unreadable file is named before training
        dims = _check_header(paths[i], f"{csv_path}, line {lines[i]}")
        # Images of different sizes cannot be batched; resize to the first image's size.
        size = size or dims
    images = ImageFiles([paths[i] for i in order], size, [f"{csv_path}, line {lines[i]}" for i in order])
    has_labels = all(labels[i] is not None for i in order)
    y = torch.tensor([labels[i] for i in order], dtype=torch.int64) if has_labels else None
    sizes = torch.tensor([len(members[b]) for b in bag_order], dtype=torch.int64)
    weights = None
    if interval:  # the interval's likelihood; its midpoint (rounded down) where a point count is needed
        lo_hi = torch.tensor([counts[b] for b in bag_order], dtype=torch.int64)
        weights = count_weights.interval(lo_hi[:, 0], lo_hi[:, 1], sizes)
        count_tensor = (lo_hi[:, 0] + lo_hi[:, 1]) // 2
    elif noise is not None:  # the noise model's likelihood; the observation clipped to 0..n as a point count
        observed = torch.tensor([counts[b][0] for b in bag_order], dtype=torch.float64)
        weights = noise_weights(noise, observed, sizes)
        count_tensor = torch.minimum(observed.round().clamp(min=0).long(), sizes)
    else:
        count_tensor = torch.tensor([counts[b] for b in bag_order], dtype=torch.int64)
        # Two classes: the count of the second (label 1), as for every binary dataset.
        count_tensor = count_tensor[:, -1].contiguous() if len(classes) == 2 else count_tensor
    bags = Bags(index=torch.arange(len(order), dtype=torch.int64), offsets=offsets_from_sizes(sizes),
                counts=count_tensor, bag_ids=bag_order, count_log_weights=weights)
    data = InstanceData(x=images, y=y, classes=classes, is_rgb=True,
                        source=f"manifest {csv_path} with counts {counts_path}: {len(order)} images in "
                               f"{len(bag_order)} bags, {size[1]}x{size[0]}, classes {', '.join(classes)}")
    return data, bags


def load_dataset(name: str, *, data_root: str | None = None, classes: str | None = None,
                 download: bool = False, bag_size: tuple[int, int] | None = None, num_bags: int | None = None,
                 test_fraction: float | None = None, seed: int = 0, test_root: str | None = None,
                 counts_file: str | None = None, count_noise: str | None = None) -> BagDataset:
    """Load instances, form bags and split them into train and test; see the module docstring.

    Args:
        name: one of ``DATASETS``.
        data_root: the .npz file (npz), CIFAR-10 folder (cifar10), faces folder
            (family-faces) or instances CSV (manifest); must be None for digits.
        classes: ``"A,B"``: keep classes A (label 0) and B (label 1), by name or label
            value; ``"A,B,C,..."``: a multi-class problem over those classes, labels in
            that order; ``"all"``: every class present (digits, npz and cifar10 only).
        download: allow torchvision to download CIFAR-10 (cifar10 only); nothing else
            downloads.
        bag_size: ``(lo, hi)`` inclusive range of random bag sizes (digits, npz,
            cifar10; None: ``DEFAULT_BAG_SIZE``, 2..12). family-faces and manifest
            have their bags given.
        num_bags: number of random bags (None: as many as fit); for family-faces
            and manifest, keep only the first ``num_bags`` given bags. With
            ``test_root`` it counts the training bags only.
        test_fraction: fraction of bags held out for testing, in [0, 1) (None:
            ``DEFAULT_TEST_FRACTION``, 0.2); not with ``test_root``.
        seed: seeds the one generator behind every random choice.
        test_root: npz: a second .npz whose random bags are the test set (then
            all bags of ``data_root`` train); cifar10: ``"official"`` takes test
            bags from the CIFAR-10 test set.
        counts_file: manifest: CSV ``bag,count``, ``bag,count_lo,count_hi`` (the count lies in
            an interval) or ``bag,CLASS1,...,CLASSC`` (a count per class).
        count_noise: manifest with ``bag,count``: ``"laplace:SCALE"`` or ``"gaussian:SIGMA"``,
            the counts are observations of the true count plus that noise (they may
            lie outside 0..n; gaussian ones need not be integers).

    An option given to a dataset that does not use it raises DataError.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if test_root is not None and name not in ("npz", "cifar10"):
        raise DataError(f"--test-root is only supported for npz and cifar10, not {name}")
    # An option the dataset would ignore is an error: `--data-root cifar.npz` without
    # `--dataset npz` would otherwise train on the default digits without a word.
    sizes = None if bag_size is None else ":".join(str(v) for v in bag_size)
    for option, value, takers in (("--data-root", data_root, ("npz", "cifar10", "family-faces", "manifest")),
                                  ("--classes", classes, ("digits", "npz", "cifar10")),
                                  ("--counts-file", counts_file, ("manifest",)),
                                  ("--count-noise", count_noise, ("manifest",)),
                                  ("--download", download or None, ("cifar10",)),
                                  ("--bag-size", sizes, ("digits", "npz", "cifar10"))):
        if value is not None and name in DATASETS and name not in takers:
            given = option if value is True else f"{option} {value}"
            raise DataError(f"{given} does not apply to --dataset {name} (only to {', '.join(takers)})")
    if test_root is not None and test_fraction is not None:
        raise DataError(f"--test-fraction {test_fraction} does not apply with --test-root "
                        f"(the test bags come from {test_root})")
    test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    if not 0.0 <= float(test_fraction) < 1.0:
        raise DataError(f"test fraction must be in [0, 1), got {test_fraction}")
    if name not in GIVEN_BAGS:
        bag_size = _check_size_range(DEFAULT_BAG_SIZE if bag_size is None else bag_size)

    if name == "digits":
        data = _load_digits(classes)
        bags = _random_labelled_bags(data.y, bag_size, num_bags, gen, len(data.classes))
        train, test = split_bags(bags, test_fraction, gen)
        return BagDataset(data=data, train=train, test=test)

    if name in ("npz", "cifar10"):
        if name == "npz":
            x, y, cls, named, values = _load_npz(data_root, classes)
            source = f"npz file {data_root}: {len(y)} images of {_describe_classes(cls)}"
        else:
            if test_root not in (None, "official"):
                raise DataError(f"cifar10: --test-root must be 'official' (the CIFAR-10 test set), got {test_root!r}")
            x, y, cls = _load_cifar10(data_root, classes, download)
            source = f"CIFAR-10 training set in {data_root}: {len(y)} images of {_describe_classes(cls)}"
        if test_root is None:
            data = InstanceData(x=x, y=y, classes=cls, is_rgb=x.shape[1] == 3, source=source)
            bags = _random_labelled_bags(y, bag_size, num_bags, gen, len(cls))
            train, test = split_bags(bags, test_fraction, gen)
            return BagDataset(data=data, train=train, test=test)
        # A separate test set: every bag of the first set trains; test bags come from the
        # second, whose instances follow the training ones in InstanceData.
        if name == "npz":
            # The training set's classes by their label values (a test set may lack some).
            tx, ty, tcls, tnamed, _ = _load_npz(test_root, None if classes is None else ",".join(map(str, values)),
                                                required=False)
            if named and tnamed and tcls != cls:
                raise DataError(f"{test_root}: classes {tcls} differ from {cls} in {data_root} "
                                f"(the same label values must name the same classes)")
            source += f"; test set npz file {test_root}: {len(ty)} images"
        else:
            tx, ty, _ = _load_cifar10(data_root, classes, download, train=False)
            source += f"; test bags from the CIFAR-10 test set: {len(ty)} images"
        if tx.shape[1:] != x.shape[1:] or tx.dtype != x.dtype:
            raise DataError(f"{test_root}: test images are {tuple(tx.shape[1:])} {tx.dtype}, "
                            f"training images {tuple(x.shape[1:])} {x.dtype}")
        data = InstanceData(x=torch.cat([x, tx]), y=torch.cat([y, ty]), classes=cls,
                            is_rgb=x.shape[1] == 3, source=source)
        train = _random_labelled_bags(y, bag_size, num_bags, gen, len(cls))
        # Test bag ids continue the training numbering so every id in the dataset is unique.
        test = _random_labelled_bags(ty, bag_size, None, gen, len(cls), start=len(y), first_id=len(train.bag_ids))
        return BagDataset(data=data, train=train, test=test)

    if name == "family-faces":
        data, bags = _load_family_faces(data_root, num_bags)
    elif name == "manifest":
        data, bags = _load_manifest(data_root, counts_file, num_bags,
                                    None if count_noise is None else parse_count_noise(count_noise))
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train, test = split_bags(bags, test_fraction, gen)
    return BagDataset(data=data, train=train, test=test)
