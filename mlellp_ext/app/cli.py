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
import dataclasses
import os
import sys

from .config import COUNT_NOISE_MODELS, LR_SCHEDULES, MULTICLASS_ESTEPS, RESUME_MAY_CHANGE, TrainConfig, option_names
from .data import DATASETS, DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, DataError
from .distributed import DistributedError, shutdown
from .evaluate import evaluate, predict
from .methods import ESTEP_MODES, METHODS
from .models import BACKBONES
from .precision import AMP_MODES

# train's defaults are TrainConfig's (one place for each).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


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
                   help=f"continue from OUT/checkpoint.pt with the options it was started with (only "
                        f"{option_names(RESUME_MAY_CHANGE)} may change; under torchrun: the same number of processes)")
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
        shutdown()  # the process group, under torchrun


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        {"train": _train, "evaluate": evaluate, "predict": predict,
         "reproduce": _reproduce}[args.command](args)
    except (DataError, OSError, DistributedError) as e:  # OSError: a file that cannot be read or written
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun every rank fails alike: rank 0 tells
            print(f"mlellp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
