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

The package: :mod:`.core` (the bag model: DataError, InstanceData, Bags,
BagDataset, random bags, subsets and splits), :mod:`.classes` (``classes``
parsed and selected), :mod:`.images` (ImageFiles), :mod:`.manifest` (the two
CSVs) and :mod:`.datasets` (the dataset kinds and ``load_dataset``).
"""
from __future__ import annotations

from .core import (DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, BagDataset, Bags, DataError, InstanceData, bag_weights,
                   instance_labels_available, parse_bag_size, random_bags, split_bags, subset_bags)
from .datasets import DATASETS, GIVEN_BAGS, load_dataset
from .images import ImageFiles
from .manifest import COUNT_NOISES, noise_weights, parse_count_noise

__all__ = [
    "COUNT_NOISES",
    "DATASETS",
    "DEFAULT_BAG_SIZE",
    "DEFAULT_TEST_FRACTION",
    "GIVEN_BAGS",
    "BagDataset",
    "Bags",
    "DataError",
    "ImageFiles",
    "InstanceData",
    "bag_weights",
    "instance_labels_available",
    "load_dataset",
    "noise_weights",
    "parse_bag_size",
    "parse_count_noise",
    "random_bags",
    "split_bags",
    "subset_bags",
]
