"""The training loop shared by every method: data, model, epochs, metrics, checkpoints.

A method (see methods/common.py; chosen by name from the registry,
methods.METHODS) implements ``epoch(model=, optimizer=, batches=, inputs=, world=,
progress=) -> dict`` and holds its own state; this module builds the data, the
network and the method, runs epochs, evaluates on the test bags, writes
``metrics.csv``, ``checkpoint.pt`` (atomically, every epoch), ``model.pt``,
``config.json`` and ``curves.png``, and resumes from a checkpoint.

Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its shard of the
training bags and the files are written by rank 0 only; see distributed.py.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from ..bags import bag_index
from ..em import DEFAULT_MIN_ITERATIONS, DEFAULT_TOL
from ..ops import posterior
from . import distributed
from .batches import Batches, Preprocess, TrainingInputs, infer_logits
from .data import (DEFAULT_BAG_SIZE, DEFAULT_TEST_FRACTION, GIVEN_BAGS, BagDataset, DataError, load_dataset, parse_bag_size,
                   subset_bags)
from .distributed import resolve_device
from .methods import METHODS, build_method
from .methods.llpgan import GAN_WEIGHT
from .models import build_backbone
from .precision import AMP_MODES, attach_grad_scalers, grad_scaler_states, load_grad_scaler_states, prepare_model

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "L", "e_step_seconds", "inference_seconds", "m_step_seconds",
                  "epoch_seconds", "test_accuracy", "test_auc", "test_bag_mae", "test_L", "approximated_bags")
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


def bag_metrics(model, preprocess, data, bags, batch_size) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Instance accuracy and AUC (NaN without labels or with one class only), bag-count
    MAE and mean bag log-likelihood on `bags`, from one inference pass. Returns
    ``(metrics, prob, expected)``: the metrics dict, each instance's probability (in
    the order of ``bags.index``; (M, C) class probabilities for C >= 3 classes) and
    each bag's expected count ((B, C) expected count vectors)."""
    logits = infer_logits(model, preprocess, bags.index, batch_size)
    return metrics_from_logits(logits, data, bags)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(label 1) of (N,) binary logits; class probabilities (N, C) of (N, C) logits."""
    return torch.sigmoid(logits) if logits.dim() == 1 else torch.softmax(logits.double(), 1).float()


def metrics_from_logits(logits, data, bags) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """bag_metrics() from the logits of the instances ``bags.index``. The bag-count
    MAE is over bags (and classes, for count vectors), against the point counts
    (for noisy or interval counts: the clipped observation or the midpoint); L is
    log P(observation), under the counts' likelihood where they have one, and
    leaves out multi-class bags over the exact E-step's state budget (NaN if all are)."""
    from .methods.common import log_likelihoods, observed

    prob = probabilities(logits)
    sizes = bags.offsets.diff()
    expected = torch.zeros(sizes.numel(), *prob.shape[1:]).index_add_(0, bag_index(bags.offsets, prob.shape[0]), prob)
    out = {"bag_mae": float((expected - bags.counts.float()).abs().mean()) if sizes.numel() else math.nan,
           "L": float(torch.nanmean(log_likelihoods(logits, bags.offsets,
                                                    observed(bags.counts, bags.count_log_weights)).double()))
           if sizes.numel() else math.nan,
           **instance_metrics(prob, None if data.y is None else data.y[bags.index], data.classes),
           "n_instances": int(bags.index.numel()), "n_bags": int(sizes.numel())}
    return out, prob, expected


def instance_metrics(prob: torch.Tensor, y: torch.Tensor | None, classes: list[str] | None = None) -> dict:
    """Accuracy and ROC AUC of instance probabilities; NaN without labels.

    Binary ((N,) probabilities of label 1): accuracy at threshold 0.5, AUC NaN where
    one class is absent (undefined). C classes ((N, C)): accuracy of the argmax, the
    macro-average of the one-vs-rest AUCs of the classes present with both signs,
    and ``per_class_accuracy`` (the recall of each class, by name; NaN for a class
    with no instances)."""
    multi = prob.dim() == 2
    if y is None or y.numel() == 0:
        out = {"accuracy": math.nan, "auc": math.nan}
        if multi:
            out["per_class_accuracy"] = {name: math.nan for name in _names(classes, prob.shape[1])}
        return out
    if not multi:
        return {"accuracy": float(((prob > 0.5).long() == y).float().mean()), "auc": auc(prob, y)}
    pred = prob.argmax(1)
    names = _names(classes, prob.shape[1])
    per_class = {}
    for c, name in enumerate(names):
        mine = y == c
        per_class[name] = float((pred[mine] == c).float().mean()) if bool(mine.any()) else math.nan
    aucs = [auc(prob[:, c], (y == c).long()) for c in range(prob.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return {"accuracy": float((pred == y).float().mean()), "auc": sum(aucs) / len(aucs) if aucs else math.nan,
            "per_class_accuracy": per_class}


def _names(classes, num_classes: int) -> list[str]:
    return list(classes) if classes is not None and len(classes) == num_classes else [str(c) for c in range(num_classes)]


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC (scikit-learn's); NaN if one class is absent, where it is undefined.
    (Multi-class AUC is the mean of these one-vs-rest AUCs: scikit-learn's
    ``multi_class="ovr"`` raises instead where a class is absent from a test set.)"""
    from sklearn.metrics import roc_auc_score

    if y.numel() == 0 or bool((y == y[0]).all()):
        return math.nan
    return float(roc_auc_score(y.numpy(), score.double().numpy()))


def observed_training_bags(cfg: TrainConfig, dataset: BagDataset):
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
        from .. import count_weights

        sizes = train.offsets.diff()
        gen = torch.Generator().manual_seed(cfg.seed + 104729)  # a stream of its own
        released = count_weights.privatize(train.counts, cfg.privatize_counts, generator=gen)
        train = dataclasses.replace(train, counts=torch.minimum(released.clamp(min=0), sizes),
                                    count_log_weights=count_weights.laplace(released.double(),
                                                                            1.0 / cfg.privatize_counts, sizes))
    if cfg.count_noise_model == "ignore":
        train = dataclasses.replace(train, count_log_weights=None)
    return train


def network_outputs(spec, num_classes: int) -> int:
    """Outputs of the network a method trains: its registered number for a binary
    problem (1 logit, or LLP-GAN's 2 real-class logits), one per class for C >= 3."""
    return spec.num_outputs if num_classes == 2 else num_classes


def check_multiclass_options(cfg: TrainConfig, dataset: BagDataset) -> None:
    """--multiclass-estep applies to count vectors only; with the exact E-step no
    training bag may be over the state budget (said before any training, with the way out)."""
    from ..bags import lattice_states
    from ..ops import DEFAULT_MAX_STATES

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


class Trainer:
    """A training run's parts: data and bags (this rank's shard under torchrun), model,
    optimiser, inputs, minibatches, RNG, the method, checkpoints. The method gets
    what it needs from here as arguments (epoch()), never the trainer itself."""

    def __init__(self, cfg: TrainConfig, world: distributed.World | None = None):
        self.cfg = cfg
        self.world = world or distributed.World()
        self.device = self.world.device if self.world.distributed else resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.dataset = load_data(cfg)
        self.dataset = dataclasses.replace(self.dataset, train=observed_training_bags(cfg, self.dataset))
        self.data, self.train_bags, self.test_bags = self.dataset.data, self.dataset.train, self.dataset.test
        if self.train_bags.offsets.numel() < 2:
            raise DataError("no training bags: check --num-bags, --bag-size and --test-fraction")
        if self.world.distributed:
            self._shard()
        if cfg.method not in METHODS:  # e.g. a config of an experiment's method that is not registered here
            raise DataError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
        spec = METHODS[cfg.method]
        in_channels = self.data.x.shape[1]
        self.num_classes = len(self.data.classes)
        check_multiclass_options(cfg, self.dataset)
        self.model = build_backbone(cfg.backbone, in_channels, network_outputs(spec, self.num_classes), cfg.width,
                                    cfg.weights).to(self.device)
        prepare_model(self.model, self.device, cfg.amp, cfg.compile)
        lr_factor(cfg.lr_schedule, 0, cfg.epochs)  # rejects an unknown schedule before any work
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.preprocess = Preprocess(self.data.x, self.data.is_rgb, cfg.augment, self.device, cfg.workers)
        # Shuffling has its own generator; augmentation and dropout use the global RNG.
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        bags = self.train_bags
        self.inputs = TrainingInputs(self.preprocess, bags.index)
        self.batches = Batches(bags.offsets, bags.counts, cfg.batch_size, self.generator, self.world,
                               on_plan=self.inputs.plan)
        offered = dict(offsets=bags.offsets, counts=bags.counts, count_log_weights=bags.count_log_weights,
                       model=self.model, device=self.device,
                       image_shape=tuple(self.data.x.shape[1:]), batch_size=cfg.batch_size, lr=cfg.lr,
                       width=cfg.width, seed=cfg.seed, estep=cfg.estep, tol=cfg.tol, min_epochs=cfg.min_epochs,
                       gan_weight=cfg.gan_weight, multiclass_estep=cfg.multiclass_estep)
        if spec.needs_labels:
            if self.data.y is None:
                raise DataError(f"--method {cfg.method} needs instance labels, and this dataset has none")
            offered["labels"] = self.data.y[bags.index]
        self.method = build_method(cfg.method, **offered)
        attach_grad_scalers(cfg.amp, self.device, self.optimizer, *self.method.own_optimizers)
        if self.world.distributed:
            # Every rank built the same networks from cfg.seed (rank 0's are broadcast all the
            # same, as DistributedDataParallel does); from here on each rank draws its own
            # dropout masks, augmentations and shuffles.
            distributed.broadcast_module(self.world, self.model)
            rank_seed = cfg.seed + 7919 * (self.world.rank + 1)
            torch.manual_seed(rank_seed)
            self.generator.manual_seed(rank_seed + 1)
        self.interactive = sys.stderr.isatty() and not cfg.quiet and self.world.is_main

    def _shard(self):
        """Keep this rank's shard of the training bags (whole bags, balanced by instance
        count) in train_bags; shard the test bags for evaluation likewise."""
        world = self.world
        parts = distributed.shard_assignment(self.train_bags, world.size)
        if any(p.numel() == 0 for p in parts):
            raise distributed.DistributedError(
                f"{len(self.train_bags.bag_ids)} training bags cannot be shared by {world.size} processes; "
                f"start fewer processes or use more bags")
        self.train_bags = subset_bags(self.train_bags, parts[world.rank])
        test_parts = distributed.shard_assignment(self.test_bags, world.size)
        self.test_shard = subset_bags(self.test_bags, test_parts[world.rank])
        # The test bags in rank order: the concatenation of the ranks' test shards.
        self.test_gathered = subset_bags(self.test_bags, torch.cat(test_parts))

    def progress(self, iterable, desc):
        if not self.interactive:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, unit="batch")

    def run_epoch(self) -> dict:
        """One epoch of the method, given what it needs."""
        return self.method.epoch(model=self.model, optimizer=self.optimizer, batches=self.batches,
                                 inputs=self.inputs, world=self.world, progress=self.progress)

    def test_metrics(self) -> dict:
        """bag_metrics() on the test bags; under torchrun each rank infers its test shard
        and every rank computes the metrics of all of them (the same on every rank)."""
        if not self.world.distributed:
            test, _, _ = bag_metrics(self.model, self.preprocess, self.data, self.test_bags, self.cfg.batch_size)
            return test
        logits = infer_logits(self.model, self.preprocess, self.test_shard.index, self.cfg.batch_size)
        parts = distributed.all_gather_objects(self.world, logits)
        test, _, _ = metrics_from_logits(torch.cat(parts), self.data, self.test_gathered)
        return test

    # ---- checkpoints
    def checkpoint_state(self, epoch, history):
        """The checkpoint. Under torchrun this is a collective (call it on every rank):
        rank 0 gets the state, with every rank's method state and RNG states under
        "ranks", the other ranks None."""
        if not self.world.distributed:
            state = {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "method": self.method.state_dict(), "torch_rng": torch.get_rng_state(),
                     "generator": self.generator.get_state(), "history": history,
                     "config": dataclasses.asdict(self.cfg)}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            scalers = grad_scaler_states(self.optimizer, *self.method.own_optimizers)
            if scalers is not None:
                state["grad_scalers"] = scalers
            return state
        mine = {"method": _to_cpu(self.method.state_dict()), "torch_rng": torch.get_rng_state(),
                "generator": self.generator.get_state(), "history": history,
                "bag_ids": list(self.train_bags.bag_ids)}
        if self.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ranks = distributed.gather_to_main(self.world, mine)
        if not self.world.is_main:
            return None
        # Model and optimiser are identical on every rank (checked every epoch): rank 0's.
        state = {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "history": history, "config": dataclasses.asdict(self.cfg), "world_size": self.world.size,
                 "ranks": ranks}
        scalers = grad_scaler_states(self.optimizer, *self.method.own_optimizers)  # the same on every rank
        if scalers is not None:
            state["grad_scalers"] = scalers
        return state

    def load_checkpoint(self, path):
        """The checkpoint at `path` (under torchrun rank 0 reads it and sends it to every rank)."""
        if not self.world.distributed:
            if not os.path.exists(path):
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
            return torch.load(path, map_location="cpu", weights_only=True)
        state = None
        if self.world.is_main:
            state = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        state = distributed.broadcast_from_main(self.world, state)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        return state

    def restore(self, state):
        """Load a checkpoint; returns the history of the epochs it holds."""
        check_resume_config(state.get("config", {}), self.cfg)
        saved = int(state.get("world_size", 1))
        if saved != self.world.size:
            raise distributed.DistributedError(
                f"--resume: the checkpoint was written by {saved} process{'es' if saved > 1 else ''} and this "
                f"run has {self.world.size}; resume with the same number of processes "
                f"({'a plain run, without torchrun' if saved == 1 else f'torchrun with {saved} processes in all'})")
        if not self.world.distributed:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"])
            torch.set_rng_state(state["torch_rng"])
            self.generator.set_state(state["generator"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            load_grad_scaler_states(state.get("grad_scalers"), self.optimizer, *self.method.own_optimizers)
            return list(state["history"])
        mine = state["ranks"][self.world.rank]
        if list(mine["bag_ids"]) != list(self.train_bags.bag_ids):
            raise distributed.DistributedError(
                f"--resume: rank {self.world.rank}'s training bags differ from the checkpoint's; "
                f"resume with the same data options and seed")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        load_grad_scaler_states(state.get("grad_scalers"), self.optimizer, *self.method.own_optimizers)
        self.method.load_state_dict(mine["method"])
        torch.set_rng_state(mine["torch_rng"])
        self.generator.set_state(mine["generator"])
        if "cuda_rng" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        return list(mine["history"])


# What --resume may change: how long to run and how to show it. Anything else would
# continue a different run (another --seed, say, draws other bags, and the saved
# targets phi would then belong to other instances).
RESUME_MAY_CHANGE = ("out", "resume", "epochs", "tol", "min_epochs", "device", "quiet", "multiclass_estep", "compile",
                     "workers")


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
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUME_MAY_CHANGE
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
                        f". Resume with the same options; only --{', --'.join(o.replace('_', '-') for o in RESUME_MAY_CHANGE[2:])} may change")


def _to_cpu(obj):
    """`obj` with every tensor in it moved to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_metrics(path, history):
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    os.replace(path + ".tmp", path)


def plot_curves(path, history, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["test_accuracy"] for r in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test instance accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [r["L"] for r in history], marker="o", color="C1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("mean train bag log-likelihood L")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_payload(trainer):
    cfg = dataclasses.asdict(trainer.cfg)
    return {"state_dict": trainer.model.state_dict(), "config": cfg,
            "num_outputs": network_outputs(METHODS[trainer.cfg.method], trainer.num_classes),
            "in_channels": int(trainer.data.x.shape[1]), "classes": list(trainer.data.classes)}


def train(cfg: TrainConfig, stop_after_epochs: int | None = None) -> list[dict]:
    """Train per `cfg`; returns the per-epoch metrics. `stop_after_epochs` ends the
    run early after that many epochs in total, as an interruption would (for tests).

    Under torchrun (WORLD_SIZE > 1) every process runs this: it joins the process
    group (created here unless one exists; distributed.shutdown() destroys it),
    trains on its shard of the bags, and only rank 0 writes files and shows progress."""
    check_options(cfg)
    world = distributed.setup(cfg.device)
    made = []  # the folder, if this run created it
    try:
        return _train(cfg, stop_after_epochs, world, made)
    except DataError:
        # A data error found only in training (an image that fails at its first decode)
        # before the first checkpoint: the folder this run made holds nothing worth
        # keeping, and a run whose data fail leaves no --out folder. With a checkpoint it
        # stays, for --resume; a folder that was there before is never removed.
        if made and not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, stop_after_epochs: int | None, world, made: list) -> list[dict]:
    main = world.is_main
    trainer = Trainer(cfg, world)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    history, start = [], 0
    if cfg.resume:
        state = trainer.load_checkpoint(ckpt_path)
        history, start = trainer.restore(state), int(state["epoch"]) + 1
        del state
    if main:  # only now: a run whose data or checkpoint fail to load leaves no folder behind
        parent = os.path.dirname(os.path.abspath(cfg.out))
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(cfg.out)
            made.append(cfg.out)
        except FileExistsError:
            pass
    if world.distributed:
        write_shards(trainer)
    if main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    say = (lambda *a: None) if cfg.quiet or not main else (lambda *a: print(*a, file=sys.stderr, flush=True))
    train_bags = trainer.dataset.train  # all of them (trainer.train_bags is this rank's shard)
    where = f"{trainer.device}" if not world.distributed else \
        f"{world.size} processes ({world.backend}, {trainer.device.type}), " \
        f"{distributed.per_rank_batch_size(cfg.batch_size, world)} instances per minibatch each"
    say(f"{cfg.method}: {len(train_bags.bag_ids)} train bags "
        f"({train_bags.index.numel()} instances), {len(trainer.test_bags.bag_ids)} test bags; "
        f"{cfg.backbone} on {where}")
    epochs = range(start, cfg.epochs)
    bar = None
    if trainer.interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, desc=cfg.method, unit="epoch")
    for epoch in epochs:
        if trainer.method.converged:
            break
        lr = cfg.lr * lr_factor(cfg.lr_schedule, epoch, cfg.epochs)
        for opt in (trainer.optimizer, *trainer.method.own_optimizers):
            for group in opt.param_groups:
                group["lr"] = lr
        t0 = time.perf_counter()
        stats = trainer.run_epoch()
        seconds = time.perf_counter() - t0
        if world.distributed:
            check_ranks_agree(trainer, stats, epoch)
        test = trainer.test_metrics()
        row = {"epoch": epoch + 1, "lr": lr, **stats, "epoch_seconds": seconds, "test_accuracy": test["accuracy"],
               "test_auc": test["auc"], "test_bag_mae": test["bag_mae"], "test_L": test["L"]}
        history.append(row)
        if main:
            write_metrics(os.path.join(cfg.out, "metrics.csv"), history)
        state = trainer.checkpoint_state(epoch, history)
        if main:
            atomic_save(state, ckpt_path)
        del state
        line = (f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f}  L {stats['L']:.4f}  "
                f"test acc {test['accuracy']:.4f}  auc {test['auc']:.4f}  bag MAE {test['bag_mae']:.3f}  "
                f"({seconds:.1f}s)")
        if stats.get("approximated_bags"):
            line += f"  [{stats['approximated_bags']} bags took the approximate E-step]"
        if bar is not None:
            bar.set_postfix_str(line.split(": ", 1)[1])
            bar.update(1)
        else:
            say(line)
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
            distributed.barrier(world)
            return history
    if bar is not None:
        bar.close()
    if main:
        atomic_save(model_payload(trainer), os.path.join(cfg.out, "model.pt"))
        plot_curves(os.path.join(cfg.out, "curves.png"), history, f"{cfg.method} on {cfg.dataset}")
    if trainer.method.converged:
        say(f"converged: |dL| < {cfg.tol} after {len(history)} epochs")
    say(summary_table([(cfg.method, history)]))
    distributed.barrier(world)  # leave together: no rank tears down while rank 0 still writes
    return history


def check_ranks_agree(trainer, stats, epoch) -> None:
    """Under torchrun: raise DistributedError unless every rank has the same model
    parameters, L, training loss and stopping decision after this epoch."""
    world = trainer.world
    what = f"epoch {epoch + 1} of --method {trainer.cfg.method}"
    distributed.check_in_sync(world, trainer.model, what)
    mine = (stats.get("L"), stats.get("train_loss"), bool(trainer.method.converged))
    seen = distributed.all_gather_objects(world, mine)
    same = lambda a, b: a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # noqa: E731
    if not all(all(same(x, y) for x, y in zip(other, mine)) for other in seen):
        raise distributed.DistributedError(
            f"{what}: the ranks disagree on (L, train_loss, converged): {seen}. A method must report means over "
            f"all ranks (distributed.bag_mean / instance_mean) and decide to stop from them")


def write_shards(trainer) -> None:
    """Rank 0 writes OUT/shards.json: each rank's training and test bag ids (a collective)."""
    world = trainer.world
    mine = {"rank": world.rank, "train_bags": list(trainer.train_bags.bag_ids),
            "train_instances": int(trainer.train_bags.index.numel()),
            "test_bags": list(trainer.test_shard.bag_ids)}
    ranks = distributed.gather_to_main(world, mine)
    if world.is_main:
        path = os.path.join(trainer.cfg.out, "shards.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"world_size": world.size, "batch_size": trainer.cfg.batch_size,
                       "per_rank_batch_size": distributed.per_rank_batch_size(trainer.cfg.batch_size, world),
                       "ranks": ranks}, f)
        os.replace(path + ".tmp", path)


def summary_table(runs) -> str:
    """A closing table: one row per (name, history)."""
    lines = [f"{'method':12s} {'epochs':>6s} {'test acc':>9s} {'test AUC':>9s} {'bag MAE':>8s} {'L':>9s} {'s/epoch':>8s}"]
    for name, history in runs:
        last = history[-1]
        mean_s = sum(r["epoch_seconds"] for r in history) / len(history)
        lines.append(f"{name:12s} {len(history):6d} {last['test_accuracy']:9.4f} {last['test_auc']:9.4f} "
                     f"{last['test_bag_mae']:8.3f} {last['L']:9.4f} {mean_s:8.2f}")
    return "\n".join(lines)


def load_model(path: str, device: str = "auto"):
    """(model in eval mode, payload) from a model.pt written by train()."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    cfg = payload["config"]
    # Files written before 0.2 have no num_outputs: their methods are all registered.
    num_outputs = payload["num_outputs"] if "num_outputs" in payload else METHODS[cfg["method"]].num_outputs
    model = build_backbone(cfg["backbone"], payload["in_channels"], num_outputs, cfg["width"], None)
    model.load_state_dict(payload["state_dict"])
    model.to(resolve_device(device)).eval()
    return model, payload
