"""A training run's options (:class:`TrainConfig`, the ``mlellp train`` options) and
their checks: each value on its own before any work (:func:`check_options`), the
multi-class options against the data (:func:`check_multiclass_options`), and on
``--resume`` against the checkpoint's (:func:`check_resume_config`). Also what
the options make of the data: :func:`load_data` and :func:`observed_training_bags`."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from .. import count_weights
from ..bags import lattice_states
from ..em import DEFAULT_MIN_ITERATIONS, DEFAULT_TOL
from ..ops import DEFAULT_MAX_STATES
from .data import (DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, GIVEN_BAGS, BagDataset, Bags, DataError, load_dataset,
                   parse_bag_size)
from .methods import METHODS
from .methods.llpgan import GAN_WEIGHT
from .precision import AMP_MODES

MULTICLASS_ESTEPS = ("exact", "approx", "auto")
COUNT_NOISE_MODELS = ("matched", "ignore")
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of --lr in epoch `epoch` (0-based) of `epochs`: 1, or a cosine
    from 1 down towards 0. A function of the epoch alone, so resuming needs no
    scheduler state."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


@dataclass
class TrainConfig:
    out: str
    dataset: str = "digits"
    data_root: str | None = None
    classes: str | None = None
    download: bool = False
    test_root: str | None = None
    counts_file: str | None = None
    count_noise: str | None = None  # manifest: laplace:SCALE or gaussian:SIGMA noise on the given counts
    bag_size: str | None = None  # None: the dataset's default (2:12 for random bags; given bags as they are)
    num_bags: int | None = None
    test_fraction: float | None = None  # None: 0.2, or none with test_root
    method: str = "mle"
    backbone: str = "cnn"
    width: float = 1.0
    weights: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    estep: str = "fresh"
    multiclass_estep: str = "exact"  # count vectors: exact E-step, approximate, or exact within the state budget
    tol: float = DEFAULT_TOL
    min_epochs: int = DEFAULT_MIN_ITERATIONS
    gan_weight: float = GAN_WEIGHT  # LLP-GAN's weight of its real/fake terms
    privatize_counts: float | None = None  # epsilon: release training counts with discrete Laplace noise
    count_noise_model: str = "matched"  # noisy/interval counts: their likelihood, or "ignore" (clipped, as exact)
    augment: bool = True
    amp: str = "off"  # off, bf16 or fp16: autocast of the network (app.precision)
    compile: bool = False  # torch.compile the network
    workers: int = 2  # DataLoader processes decoding image files (manifest, family-faces); 0: in this process
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    resume: bool = False


def check_options(cfg: TrainConfig) -> None:
    """Reject out-of-range numeric options with the option's name and value, before
    any work (else they surface later as an IndexError or a torch error)."""
    def bad(option, value, need):
        raise DataError(f"{option} must be {need}, got {value!r}")

    for option, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            bad(option, value, "at least 1")
    if cfg.min_epochs < 0:
        bad("--min-epochs", cfg.min_epochs, "non-negative")
    if cfg.workers < 0:
        bad("--workers", cfg.workers, "non-negative")
    if cfg.amp not in AMP_MODES:
        bad("--amp", cfg.amp, f"one of {', '.join(AMP_MODES)}")
    if cfg.count_noise_model not in COUNT_NOISE_MODELS:
        bad("--count-noise-model", cfg.count_noise_model, f"one of {', '.join(COUNT_NOISE_MODELS)}")
    if cfg.privatize_counts is not None and not (cfg.privatize_counts > 0):
        bad("--privatize-counts", cfg.privatize_counts, "a positive epsilon (inf: no noise)")
    if cfg.privatize_counts is not None and cfg.count_noise is not None:
        raise DataError("--privatize-counts adds noise to exact counts; the counts of --count-noise are noisy "
                        "already (use one of them)")
    if cfg.multiclass_estep not in MULTICLASS_ESTEPS:
        bad("--multiclass-estep", cfg.multiclass_estep, f"one of {', '.join(MULTICLASS_ESTEPS)}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise DataError(f"--out {cfg.out} exists and is not a folder")
    # Combinations the backbone or method would refuse only after the data have loaded.
    if cfg.weights is not None and cfg.backbone != "resnet18":
        raise DataError(f"--weights applies to --backbone resnet18 only, got --backbone {cfg.backbone}")
    if cfg.weights is not None and not os.path.isfile(cfg.weights):
        raise DataError(f"--weights {cfg.weights}: no such file")
    if cfg.method not in METHODS:
        raise DataError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    needs = METHODS[cfg.method].backbone
    if needs is not None and cfg.backbone != needs:
        raise DataError(f"--method {cfg.method} uses --backbone {needs}, got {cfg.backbone}")
    for option, value in (("--lr", cfg.lr), ("--width", cfg.width)):
        if not (math.isfinite(value) and value > 0):
            bad(option, value, "a positive number")
    for option, value in (("--weight-decay", cfg.weight_decay), ("--tol", cfg.tol), ("--gan-weight", cfg.gan_weight)):
        if not (math.isfinite(value) and value >= 0):
            bad(option, value, "a non-negative number")


def load_data(cfg) -> BagDataset:
    """The dataset and its bags, from the data options of a config (train or model.pt)."""
    return load_dataset(cfg.dataset, data_root=cfg.data_root, classes=cfg.classes, download=cfg.download,
                        bag_size=None if cfg.bag_size is None else parse_bag_size(cfg.bag_size), num_bags=cfg.num_bags,
                        test_fraction=cfg.test_fraction, seed=cfg.seed, test_root=cfg.test_root,
                        counts_file=cfg.counts_file, count_noise=getattr(cfg, "count_noise", None))



def observed_training_bags(cfg: TrainConfig, dataset: BagDataset) -> Bags:
    """The training bags as the learner sees them: with --privatize-counts EPS each
    count gets discrete Laplace noise of scale 1/EPS (seeded by --seed), with the
    matching likelihood as count_log_weights and the clipped noisy count as the
    point count; --count-noise-model ignore drops the likelihood of noisy or
    interval counts (the point counts are then taken as exact)."""
    train = dataset.train
    if cfg.privatize_counts is not None and train.count_log_weights is not None:
        raise DataError("--privatize-counts adds noise to exact counts; these counts are intervals or noisy "
                        "already (count_lo,count_hi or --count-noise)")
    noisy = cfg.privatize_counts is not None or train.count_log_weights is not None
    if noisy and train.counts.dim() == 2:
        raise DataError("noisy or interval counts (--privatize-counts, --count-noise, count_lo/count_hi) are "
                        "supported for two classes only; these bags have count vectors")
    if cfg.privatize_counts is not None and not math.isinf(cfg.privatize_counts):
        sizes = train.offsets.diff()
        gen = torch.Generator().manual_seed(cfg.seed + 104729)  # a stream of its own
        released = count_weights.privatize(train.counts, cfg.privatize_counts, generator=gen)
        train = dataclasses.replace(train, counts=torch.minimum(released.clamp(min=0), sizes),
                                    count_log_weights=count_weights.laplace(released.double(),
                                                                            1.0 / cfg.privatize_counts, sizes))
    if cfg.count_noise_model == "ignore":
        train = dataclasses.replace(train, count_log_weights=None)
    return train


def check_multiclass_options(cfg: TrainConfig, dataset: BagDataset) -> None:
    """--multiclass-estep applies to count vectors only; with the exact E-step no
    training bag may be over the state budget (said before any training, with the way out)."""
    counts = dataset.train.counts
    if counts.dim() == 2 and not METHODS[cfg.method].multiclass:
        raise DataError(f"--method {cfg.method} trains binary classifiers only; these bags have "
                        f"{counts.shape[1]} classes ({', '.join(dataset.data.classes)})")
    if counts.dim() == 1:
        if cfg.multiclass_estep != "exact":
            raise DataError(f"--multiclass-estep {cfg.multiclass_estep} applies to multi-class bags (--classes with "
                            f"three or more classes, or a counts CSV with a column per class); these bags have "
                            f"two classes, whose E-step is always exact")
        return
    if cfg.multiclass_estep != "exact" and cfg.method != "mle":
        raise DataError(f"--multiclass-estep {cfg.multiclass_estep} applies to --method mle (EM's E-step), "
                        f"not to --method {cfg.method}")
    if cfg.method not in ("mle", "mle-direct") or cfg.multiclass_estep != "exact" or not counts.shape[0]:
        return
    states = lattice_states(counts)
    b = int(states.argmax())
    if float(states[b]) > DEFAULT_MAX_STATES:
        over = int((states > DEFAULT_MAX_STATES).sum())
        what = ("--multiclass-estep auto (exact where it fits, approximate beyond) or approx"
                if cfg.method == "mle" else "--method mle with --multiclass-estep auto, or smaller bags")
        raise DataError(f"{over} training bag(s) are too large for the exact multi-class E-step: bag "
                        f"{dataset.train.bag_ids[b]!r} with counts {counts[b].tolist()} has {float(states[b]):.3g} "
                        f"count vectors, over the budget of {DEFAULT_MAX_STATES}; use {what}")


# What --resume may change: how long to run and how to show it (and where, and with what
# speed-ups). Anything else would continue a different run (another --seed, say, draws
# other bags, and the saved targets phi would then belong to other instances).
RESUME_MAY_CHANGE = ("epochs", "tol", "min_epochs", "device", "quiet", "multiclass_estep", "compile", "workers")
NOT_RESUMED = ("out", "resume")  # where the run is and that it resumes: never compared


def option_names(fields) -> str:
    """Config field names as the options of ``mlellp train``: ``--min-epochs, --tol``."""
    return ", ".join("--" + name.replace("_", "-") for name in fields)


def settled_data_options(cfg: TrainConfig) -> TrainConfig:
    """cfg with --bag-size and --test-fraction as the data use them: None where the data
    have no such choice (given bags; a separate test set), else the value or its default.
    For comparing and reusing stored configs: those written before these options
    defaulted to None hold 2:12 and 0.2 whatever the data."""
    random_bags = cfg.dataset not in GIVEN_BAGS
    bag_size = (cfg.bag_size or ":".join(map(str, DEFAULT_BAG_SIZE))) if random_bags else None
    test_fraction = None if cfg.test_root else (DEFAULT_TEST_FRACTION if cfg.test_fraction is None
                                                else cfg.test_fraction)
    return dataclasses.replace(cfg, bag_size=bag_size, test_fraction=test_fraction)


def check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    """Raise DataError naming each option the checkpoint was written with otherwise."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_RESUMED + RESUME_MAY_CHANGE
             and (f.name in saved or f.default is not dataclasses.MISSING)]
    # An option a checkpoint predates ran with its default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    old_cfg = settled_data_options(dataclasses.replace(cfg, **{k: saved.get(k, defaults.get(k)) for k in names}))
    new_cfg = settled_data_options(cfg)
    differ = []
    for name in names:
        old, new = getattr(old_cfg, name), getattr(new_cfg, name)
        if old != new:
            if name == "augment":
                differ.append(f"{'augmentation' if old else '--no-augment'} (this run: "
                              f"{'augmentation' if new else '--no-augment'})")
            else:
                differ.append(f"--{name.replace('_', '-')} {old!r} (this run: {new!r})")
    if differ:
        raise DataError("--resume: the checkpoint was written with " + "; ".join(differ) +
                        f". Resume with the same options; only {option_names(RESUME_MAY_CHANGE)} may change")
