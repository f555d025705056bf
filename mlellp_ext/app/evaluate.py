"""``mlellp evaluate`` and ``mlellp predict``: a trained model (model.pt) scored on
the bags of its own data (a split of them) or on other data, whole."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys

import torch

from ..bags import bag_index, offsets_from_sizes
from .batches import Preprocess, infer_logits
from .checkpoint import load_model
from .config import TrainConfig, load_data, settled_data_options
from .data import Bags, DataError
from .metrics import instance_metrics, metrics_from_logits, probabilities

DATA_OPTIONS = ("dataset", "data_root", "classes", "download", "test_root", "counts_file", "count_noise", "bag_size",
                "num_bags", "test_fraction", "seed")


def _same_file(a, b) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (here): compare the names
        return os.path.abspath(a) == os.path.abspath(b)


def _model_and_bags(args):
    """(model, dataset, bags, whole): the bags to score and whether the data are other
    than the model's own (then every instance is scored, bags or not)."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not os.path.isfile(args.model):
        raise DataError(f"--model {args.model}: no such file")
    model, payload = load_model(args.model, args.device)
    cfg = TrainConfig(**payload["config"])
    overrides = {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}
    other = (overrides.get("dataset", cfg.dataset) != cfg.dataset
             or ("data_root" in overrides and not _same_file(overrides["data_root"], cfg.data_root)))
    if overrides.get("dataset", cfg.dataset) != cfg.dataset:  # another dataset: none of the stored one's files
        cfg = dataclasses.replace(cfg, data_root=None, classes=None, download=False, test_root=None, counts_file=None,
                                  count_noise=None)
    if "counts_file" in overrides and "count_noise" not in overrides:  # another file: its own noise, if any
        cfg = dataclasses.replace(cfg, count_noise=None)
    if other:
        if "counts_file" not in overrides:  # the training run's counts belong to its own instances
            cfg = dataclasses.replace(cfg, counts_file=None, count_noise=overrides.get("count_noise"))
        if args.split not in (None, "all"):
            raise DataError(f"--split {args.split} applies to the model's own data; data other than the model's "
                            f"(--dataset/--data-root) is scored whole")
        if "test_root" in overrides or "test_fraction" in overrides:
            raise DataError("--test-root and --test-fraction apply to the model's own data; data other than the "
                            "model's (--dataset/--data-root) is scored whole")
        # Nothing of the training run's bag count or split carries over: bags from all of it.
        cfg = dataclasses.replace(cfg, num_bags=None, test_root=None, test_fraction=None)
    cfg = dataclasses.replace(cfg, **overrides)
    # Stored (not given) values as the data now named use them: a config may hold the old
    # defaults 2:12 and 0.2, which given bags or a separate test set would reject.
    settled = settled_data_options(cfg)
    cfg = dataclasses.replace(cfg, **{k: getattr(settled, k) for k in ("bag_size", "test_fraction")
                                      if k not in overrides})
    if other:
        cfg = dataclasses.replace(cfg, test_fraction=0.0)
    dataset = load_data(cfg)
    check_classes(payload.get("classes"), list(dataset.data.classes))
    split = "all" if other else (args.split or "test")
    bags = _all_bags(dataset) if split == "all" else getattr(dataset, split)
    return model, dataset, bags, other


def check_classes(trained: list[str] | None, have: list[str]) -> None:
    """The data's classes must be the model's outputs, in the same order (else the
    scores would belong to other classes, or not fit the network)."""
    if trained is None:  # a model.pt written before class names were stored
        return
    trained = [str(c) for c in trained]
    names = lambda cs: ",".join(cs)  # noqa: E731
    if len(have) != len(trained):
        raise DataError(f"the model was trained on {len(trained)} classes ({names(trained)}) but these data have "
                        f"{len(have)} ({names(have)}); pass --classes naming the model's classes")
    if have != trained and sorted(have) == sorted(trained):
        raise DataError(f"the data name the model's classes in another order (the model's: {names(trained)}; the "
                        f"data's: {names(have)}), which would swap its outputs' meaning; pass --classes "
                        f"{names(trained)}")


def _all_bags(dataset):
    """The training bags followed by the test bags, as one Bags."""
    tr, te = dataset.train, dataset.test
    weights = None
    if tr.count_log_weights is not None and te.count_log_weights is not None:
        weights = torch.cat([tr.count_log_weights, te.count_log_weights])
    return Bags(torch.cat([tr.index, te.index]), offsets_from_sizes(torch.cat([tr.offsets.diff(), te.offsets.diff()])),
                torch.cat([tr.counts, te.counts]), list(tr.bag_ids) + list(te.bag_ids), weights)


def _score(model, dataset, bags, batch_size, whole):
    """(metrics, probability per scored instance, expected count per bag, scored instances).
    ``whole``: every instance of the data is scored (instance metrics over all of
    them, bag metrics over the bags); else the instances of ``bags``."""
    preprocess = _preprocess(model, dataset)
    index = torch.arange(dataset.data.x.shape[0]) if whole else bags.index
    logits = infer_logits(model, preprocess, index, batch_size)
    if not whole:
        metrics, prob, expected = metrics_from_logits(logits, dataset.data, bags)
        metrics["n_bag_instances"] = metrics["n_instances"]
        return metrics, prob, expected, index
    metrics, _, expected = metrics_from_logits(logits[bags.index], dataset.data, bags)
    prob = probabilities(logits)
    metrics.update(instance_metrics(prob, dataset.data.y, dataset.data.classes), n_instances=int(index.numel()),
                   n_bag_instances=int(bags.index.numel()))
    return metrics, prob, expected, index


def _preprocess(model, dataset):
    device = next(model.parameters()).device
    return Preprocess(dataset.data.x, dataset.data.is_rgb, augment=False, device=device)


def evaluate(args):
    """``mlellp evaluate``: print the model's metrics on the bags as JSON."""
    model, dataset, bags, whole = _model_and_bags(args)
    metrics, _, _, _ = _score(model, dataset, bags, args.batch_size, whole)
    metrics["split"] = "all" if whole else (args.split or "test")
    metrics["data"] = "other" if whole else "the model's"
    metrics["classes"] = list(dataset.data.classes)
    print(json.dumps(_strict(metrics), indent=2, allow_nan=False))


def _strict(value):
    """For strict JSON: a metric that is undefined here (no labels, one class only) is null, not NaN."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def predict(args):
    """``mlellp predict``: write each scored instance's probability (--out) and each bag's
    expected count (the same name with _bags before .csv)."""
    bag_path = args.out[:-4] + "_bags.csv" if args.out.endswith(".csv") else args.out + "_bags.csv"
    for path in (args.out, bag_path):  # before the inference pass, not after it
        if os.path.isdir(path):
            raise DataError(f"--out {args.out}: {path} is a folder; name the instance CSV to write")
    model, dataset, bags, whole = _model_and_bags(args)
    _, prob, expected, index = _score(model, dataset, bags, args.batch_size, whole)
    sizes = bags.offsets.diff()
    # The bag of each scored instance ("" for one in no bag, possible when the data are scored whole).
    bag_of = torch.full((dataset.data.x.shape[0],), -1, dtype=torch.int64)
    bag_of[bags.index] = bag_index(bags.offsets, bags.index.numel())
    y = dataset.data.y
    classes = list(dataset.data.classes)
    multi = prob.dim() == 2  # C >= 3 classes: a probability and an expected count per class
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "bag"] + ([f"p_{c}" for c in classes] if multi else ["probability"])
                   + (["label"] if y is not None else []))
        for pos, i in enumerate(index.tolist()):
            b = int(bag_of[i])
            p = [f"{v:.6f}" for v in prob[pos].tolist()] if multi else [f"{float(prob[pos]):.6f}"]
            w.writerow([i, bags.bag_ids[b] if b >= 0 else ""] + p
                       + ([classes[int(y[i])] if multi else int(y[i])] if y is not None else []))
    with open(bag_path, "w", newline="") as f:
        w = csv.writer(f)
        if multi:
            w.writerow(["bag", "size"] + [f"count_{c}" for c in classes] + [f"expected_{c}" for c in classes])
        else:
            w.writerow(["bag", "size", "count", "expected_count"])
        for b in range(sizes.numel()):
            if multi:
                w.writerow([bags.bag_ids[b], int(sizes[b])] + bags.counts[b].tolist()
                           + [f"{v:.4f}" for v in expected[b].tolist()])
            else:
                w.writerow([bags.bag_ids[b], int(sizes[b]), int(bags.counts[b]), f"{float(expected[b]):.4f}"])
    print(f"wrote {args.out} ({index.numel()} instances) and {bag_path} ({sizes.numel()} bags)",
          file=sys.stderr)
