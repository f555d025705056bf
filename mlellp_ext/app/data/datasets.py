"""The dataset kinds and :func:`load_dataset`, which loads one, forms its bags (random
ones, or the bags the data give) and splits them into train and test."""
from __future__ import annotations

import os
import zipfile
from collections import Counter

import numpy as np
import torch

from ...bags import offsets_from_sizes
from .classes import describe_classes, select_classes
from .core import (DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, BagDataset, Bags, DataError, InstanceData, bag_counts,
                   check_size_range, random_labelled_bags, split_bags)
from .images import IMAGE_EXTENSIONS, ImageFiles, check_header
from .manifest import load_manifest, parse_count_noise

DATASETS = ("digits", "npz", "cifar10", "family-faces", "manifest")
GIVEN_BAGS = ("family-faces", "manifest")  # bags come with the data; the others draw random bags
FACE_SIZE = (96, 120)  # (width, height) of family-faces crops after resizing



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
    keep, labels, cls, values = select_classes(y.astype(np.int64), names, classes, path, required)
    if len(keep) == 0:
        raise DataError(f"{path}: no instances")
    xt = _images_nchw(x, path)
    if len(keep) != len(y):
        xt = xt[torch.from_numpy(keep)]
    return xt, torch.from_numpy(labels), cls, names is not None, values


def _load_digits(classes: str | None = None):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0)[:, None])
    if classes is None:
        y = torch.from_numpy((d.target >= 5).astype(np.int64))
        return InstanceData(x=x, y=y, classes=["digit<5", "digit>=5"], is_rgb=False,
                            source=f"scikit-learn load_digits: {len(y)} 8x8 digit images, label 1 = digit >= 5")
    where = "digits"
    keep, y, cls, _ = select_classes(d.target.astype(np.int64), [str(k) for k in range(10)], classes, where)
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
    keep, labels, cls, _ = select_classes(np.asarray(ds.targets, dtype=np.int64), list(ds.classes), classes, where)
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
        check_header(path, path)
    images = ImageFiles(paths, FACE_SIZE, paths)
    y = torch.tensor([lab for _, _, lab in entries], dtype=torch.int64)
    per_bag = Counter(bag for bag, _, _ in entries)
    sizes = torch.tensor([per_bag[b] for b in bag_order], dtype=torch.int64)
    index = torch.arange(len(entries), dtype=torch.int64)
    offsets = offsets_from_sizes(sizes)
    bags = Bags(index=index, offsets=offsets, counts=bag_counts(y, index, offsets), bag_ids=list(bag_order))
    data = InstanceData(x=images, y=y, classes=["m", "f"], is_rgb=True,
                        source=f"family-faces folder {root}: {len(entries)} faces in {len(bag_order)} "
                               f"groups, resized to {FACE_SIZE[1]}x{FACE_SIZE[0]}")
    return data, bags


def load_dataset(name: str, *, data_root: str | None = None, classes: str | None = None,
                 download: bool = False, bag_size: tuple[int, int] | None = None, num_bags: int | None = None,
                 test_fraction: float | None = None, seed: int = 0, test_root: str | None = None,
                 counts_file: str | None = None, count_noise: str | None = None) -> BagDataset:
    """Load instances, form bags and split them into train and test; see the package docstring.

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
    test_fraction = _check_options(name, data_root, classes, download, bag_size, test_fraction, test_root,
                                   counts_file, count_noise)
    if name not in GIVEN_BAGS:
        bag_size = check_size_range(DEFAULT_BAG_SIZE if bag_size is None else bag_size)
    if name == "digits":
        data = _load_digits(classes)
        bags = random_labelled_bags(data.y, bag_size, num_bags, gen, len(data.classes))
    elif name in ("npz", "cifar10"):
        x, y, cls, named, values, source = _load_arrays(name, data_root, classes, download, test_root)
        if test_root is not None:
            return _with_test_set(name, x, y, cls, named, values, source, data_root, classes, download, test_root,
                                  bag_size, num_bags, gen)
        data = InstanceData(x=x, y=y, classes=cls, is_rgb=x.shape[1] == 3, source=source)
        bags = random_labelled_bags(y, bag_size, num_bags, gen, len(cls))
    elif name == "family-faces":
        data, bags = _load_family_faces(data_root, num_bags)
    elif name == "manifest":
        data, bags = load_manifest(data_root, counts_file, num_bags,
                                   None if count_noise is None else parse_count_noise(count_noise))
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train, test = split_bags(bags, test_fraction, gen)
    return BagDataset(data=data, train=train, test=test)


def _check_options(name, data_root, classes, download, bag_size, test_fraction, test_root, counts_file,
                   count_noise) -> float:
    """Refuse an option the dataset would ignore; returns the test fraction to use."""
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
    return test_fraction


def _load_arrays(name, data_root, classes, download, test_root):
    """npz or cifar10 in memory: (x, y, class names, whether the file names its classes,
    their label values, a description)."""
    if name == "npz":
        x, y, cls, named, values = _load_npz(data_root, classes)
        return x, y, cls, named, values, f"npz file {data_root}: {len(y)} images of {describe_classes(cls)}"
    if test_root not in (None, "official"):
        raise DataError(f"cifar10: --test-root must be 'official' (the CIFAR-10 test set), got {test_root!r}")
    x, y, cls = _load_cifar10(data_root, classes, download)
    return x, y, cls, True, None, f"CIFAR-10 training set in {data_root}: {len(y)} images of {describe_classes(cls)}"


def _with_test_set(name, x, y, cls, named, values, source, data_root, classes, download, test_root, bag_size,
                   num_bags, gen) -> BagDataset:
    """A separate test set: every bag of the first set trains; test bags come from the
    second, whose instances follow the training ones in InstanceData."""
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
    train = random_labelled_bags(y, bag_size, num_bags, gen, len(cls))
    # Test bag ids continue the training numbering so every id in the dataset is unique.
    test = random_labelled_bags(ty, bag_size, None, gen, len(cls), start=len(y), first_id=len(train.bag_ids))
    return BagDataset(data=data, train=train, test=test)
