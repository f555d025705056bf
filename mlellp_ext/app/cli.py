"""The ``mlellp`` command: train, evaluate, predict, reproduce.

    mlellp train --dataset digits --method mle --out runs/digits-mle
    mlellp evaluate --model runs/digits-mle/model.pt
    mlellp predict --model runs/digits-mle/model.pt --out predictions.csv

Also ``python -m mlellp_ext ...``. On several GPUs or machines, the same train
command under torchrun (data-parallel, see mlellp_ext/app/distributed.py):

    torchrun --nproc-per-node 4 -m mlellp_ext train --dataset digits --out runs/digits-mle
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys

from .data import DATASETS, DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, DataError
from .methods import ESTEP_MODES, METHODS
from .models import BACKBONES
from .precision import AMP_MODES
from .train import COUNT_NOISE_MODELS, LR_SCHEDULES, MULTICLASS_ESTEPS, TrainConfig

# train's defaults are TrainConfig's (one place for each).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
DATA_OPTIONS = ("dataset", "data_root", "classes", "download", "test_root", "counts_file", "count_noise", "bag_size",
                "num_bags", "test_fraction", "seed")


def _add_data_options(p, defaults: bool):
    """train's data options; for evaluate/predict (defaults=False) each one left out is
    the model's own, from the config stored in model.pt."""
    d = (lambda v: v) if defaults else (lambda v: None)
    dflt = (lambda text: f" (default {text})") if defaults else (lambda text: "")
    g = p.add_argument_group("data", None if defaults else
                             "each option left out is the one the model was trained with")
    g.add_argument("--dataset", choices=DATASETS, default=d(DEFAULTS["dataset"]),
                   help="digits: scikit-learn's bundled digits (label: digit >= 5); npz: --data-root FILE.npz "
                        "(x uint8 NxHxWxC, y); cifar10: torchvision CIFAR10 under --data-root; family-faces: a folder "
                        "of BAGID-...{f|m}.EXT crops; manifest: --data-root instances.csv (path,bag[,label]) "
                        "with --counts-file counts.csv (bag,count; or bag,CLASS1,...,CLASSC, a count per class)")
    g.add_argument("--data-root", default=None, help="file or folder of the dataset (not for digits)")
    g.add_argument("--classes", default=None,
                   help="digits, npz, cifar10: two classes A,B (A -> 0, B -> 1; a binary problem, counts of B), "
                        "three or more A,B,C,... or 'all' (a C-way classifier from count vectors); by name or "
                        "label value. digits without it: label 1 = digit >= 5")
    g.add_argument("--download", action="store_true", default=None if not defaults else False,
                   help="cifar10: allow torchvision to download CIFAR-10 (never done otherwise)")
    g.add_argument("--test-root", default=None,
                   help="test bags from separate data instead of a split: npz: a second .npz file; cifar10: "
                        "'official' (the CIFAR-10 test set); then every bag of --data-root trains")
    g.add_argument("--counts-file", default=None,
                   help="manifest: CSV of bag counts: bag,count (two classes) or bag,CLASS1,...,CLASSC (the header "
                        "names the classes; each row sums to its bag's size)")
    g.add_argument("--count-noise", default=None,
                   help="manifest with bag,count: the counts are noisy observations, laplace:SCALE (discrete "
                        "Laplace, integers) or gaussian:SIGMA (real numbers); they may lie outside 0..n")
    g.add_argument("--bag-size", default=None,
                   help="digits, npz, cifar10: random bag sizes LO:HI, uniform" + dflt(":".join(map(str, DEFAULT_BAG_SIZE))) +
                        "; family-faces and manifest bags are given")
    g.add_argument("--num-bags", type=int, default=None,
                   help="number of bags" + dflt("as many as fit") + "; with --test-root, of training bags; "
                        "family-faces, manifest: the first N given bags")
    g.add_argument("--test-fraction", type=float, default=None,
                   help="fraction of bags for testing" + dflt(DEFAULT_TEST_FRACTION) + "; not with --test-root")
    g.add_argument("--seed", type=int, default=d(DEFAULTS["seed"]),
                   help="seed of bags, split, initialisation and shuffling" + dflt(DEFAULTS["seed"]) if defaults
                   else "seed of bags and split")


def build_parser():
    parser = argparse.ArgumentParser(prog="mlellp", description="Learning from label proportions (MLE-LLP).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an instance classifier from bag counts")
    _add_data_options(t, defaults=True)
    t.add_argument("--method", choices=list(METHODS), default=DEFAULTS["method"],
                   help="; ".join(f"{name}: {spec.help}" for name, spec in METHODS.items()))
    t.add_argument("--backbone", choices=BACKBONES, default=DEFAULTS["backbone"])
    t.add_argument("--width", type=float, default=DEFAULTS["width"], help="channel multiplier of the cnn backbone")
    t.add_argument("--weights", default=None, help="local resnet18 weights (state_dict) to start from")
    t.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epoch limit (EM may stop earlier)")
    t.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="instances per minibatch (under torchrun: in all; each of K processes takes "
                        "batch-size/K, rounded up)")
    t.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=DEFAULTS["lr_schedule"],
                   help="constant, or cosine: lr * (1 + cos(pi * epoch / epochs)) / 2 in each epoch")
    t.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    t.add_argument("--estep", choices=ESTEP_MODES, default=DEFAULTS["estep"],
                   help="E-step logits: fresh inference pass (exact EM) or recorded during the M-step")
    t.add_argument("--multiclass-estep", choices=MULTICLASS_ESTEPS, default=DEFAULTS["multiclass_estep"],
                   help="--method mle with count vectors: exact E-step (an error for a bag over the state budget of "
                        "2^24 count vectors), approx (per-class posteriors fitted to the counts), or auto (exact "
                        "where the budget allows, approximate beyond; each epoch says how many bags)")
    t.add_argument("--privatize-counts", type=float, default=None, metavar="EPS",
                   help="release each training bag's count with discrete Laplace noise of scale 1/EPS (label "
                        "differential privacy), seeded by --seed, and train with that noise model")
    t.add_argument("--count-noise-model", choices=COUNT_NOISE_MODELS, default=DEFAULTS["count_noise_model"],
                   help="noisy or interval counts: matched (their exact likelihood; mle and mle-direct) or ignore "
                        "(the observed count clipped to 0..n, or an interval's midpoint, taken as exact); dllp "
                        "always takes the clipped count")
    t.add_argument("--tol", type=float, default=DEFAULTS["tol"],
                   help="EM stops when |change of mean bag log-likelihood| < tol")
    t.add_argument("--gan-weight", type=float, default=DEFAULTS["gan_weight"],
                   help=f"--method llpgan: weight of the real/fake terms beside the bag-proportion loss "
                        f"(default {DEFAULTS['gan_weight']})")
    t.add_argument("--min-epochs", type=int, default=DEFAULTS["min_epochs"],
                   help=f"EM's stopping rule applies only after this many epochs (default {DEFAULTS['min_epochs']})")
    t.add_argument("--no-augment", dest="augment", action="store_false", help="no flips/blur/colour jitter")
    t.add_argument("--amp", choices=AMP_MODES, default=DEFAULTS["amp"],
                   help="mixed precision of the network: bf16 (A100/H100, and CPUs), fp16 with a gradient scaler "
                        "(older GPUs), or off (default); losses and the E-step stay in float32")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (first epoch slower)")
    t.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                   help=f"manifest, family-faces: processes decoding the image files ahead of each batch "
                        f"(default {DEFAULTS['workers']}; 0: decode in this process); the images are never all "
                        f"held in memory")
    t.add_argument("--device", default=DEFAULTS["device"], help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with the options it was started with (only --epochs, --tol, "
                        "--min-epochs, --device, --quiet may change; under torchrun: the same number of processes)")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    for name, helptext in (("evaluate", "print test metrics of a trained model as JSON"),
                           ("predict", "write per-instance probabilities and per-bag expected counts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="model.pt written by train")
        _add_data_options(p, defaults=False)
        p.add_argument("--split", choices=("test", "train", "all"), default=None,
                       help="which bags of the model's own data (default test); data other than the model's "
                            "(another --dataset or --data-root) is scored whole, every instance")
        p.add_argument("--device", default="auto")
        p.add_argument("--batch-size", type=int, default=256)
        if name == "predict":
            p.add_argument("--out", required=True,
                           help="instance CSV; per-bag expected counts go to the same name with _bags before .csv")
    r = sub.add_parser("reproduce", help="the seed paper's CIFAR-10 experiments (curves, bags, timing)")
    from .reproduce import add_arguments

    add_arguments(r)
    return parser


def _reproduce(args):
    from .reproduce import run

    run(args)


def _train(args):
    from .train import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        train(cfg)
    finally:
        from .distributed import shutdown

        shutdown()  # the process group, under torchrun


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
    from .data import DataError
    from .train import load_data, load_model, settled_data_options

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
    import torch

    from ..bags import offsets_from_sizes
    from .data import Bags

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
    import torch

    from .batches import infer_logits
    from .train import instance_metrics, metrics_from_logits, probabilities

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
    from .batches import Preprocess

    device = next(model.parameters()).device
    return Preprocess(dataset.data.x, dataset.data.is_rgb, augment=False, device=device)


def _evaluate(args):
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


def _predict(args):
    import torch

    from ..bags import bag_index
    from .data import DataError

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


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .distributed import DistributedError

    try:
        {"train": _train, "evaluate": _evaluate, "predict": _predict,
         "reproduce": _reproduce}[args.command](args)
    except (DataError, OSError, DistributedError) as e:  # OSError: a file that cannot be read or written
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun every rank fails alike: rank 0 tells
            print(f"mlellp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
