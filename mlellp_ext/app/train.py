"""The training loop shared by every method: data, model, epochs.

A method (see methods/common.py; chosen by name from the registry,
methods.METHODS) implements ``epoch(model=, optimizer=, batches=, inputs=, world=,
progress=) -> dict`` and holds its own state; this module builds the data, the
network and the method (:class:`Trainer`), runs the epochs (:func:`train`) and
evaluates on the test bags after each (metrics.py). It writes ``metrics.csv``,
``config.json`` and ``curves.png`` (outputs.py), ``checkpoint.pt`` (atomically,
every epoch) and ``model.pt`` (checkpoint.py), and resumes from a checkpoint.
The options and their checks are in config.py.

Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its shard of the
training bags and the files are written by rank 0 only; see distributed.py.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time

import torch

from . import checkpoint, distributed, sync
from .batches import Batches, Preprocess, TrainingInputs, infer_logits
from .config import (TrainConfig, check_multiclass_options, check_options, check_resume_config, load_data, lr_factor,
                     observed_training_bags)
from .data import DataError, subset_bags
from .distributed import resolve_device
from .methods import METHODS, build_method
from .metrics import bag_metrics, instance_metrics, metrics_from_logits
from .models import build_backbone
from .outputs import METRIC_COLUMNS, make_out_folder, plot_curves, summary_table, write_json, write_metrics, write_shards
from .precision import attach_grad_scalers, prepare_model

# The training API: what experiments import from here, wherever it is defined.
__all__ = ["METRIC_COLUMNS", "TrainConfig", "Trainer", "bag_metrics", "instance_metrics", "load_data", "lr_factor",
           "observed_training_bags", "summary_table", "train"]


def network_outputs(spec, num_classes: int) -> int:
    """Outputs of the network a method trains: its registered number for a binary
    problem (1 logit, or LLP-GAN's 2 real-class logits), one per class for C >= 3."""
    return spec.num_outputs if num_classes == 2 else num_classes


def shard(train_bags, test_bags, world):
    """(this rank's training bags, its test bags, all test bags in rank order): whole
    bags, balanced by instance count. A world of one process keeps them all."""
    if not world.distributed:
        return train_bags, test_bags, test_bags
    parts = distributed.shard_assignment(train_bags, world.size)
    if any(p.numel() == 0 for p in parts):
        raise distributed.DistributedError(
            f"{len(train_bags.bag_ids)} training bags cannot be shared by {world.size} processes; "
            f"start fewer processes or use more bags")
    test_parts = distributed.shard_assignment(test_bags, world.size)
    # The test bags in rank order: the concatenation of the ranks' test shards.
    return (subset_bags(train_bags, parts[world.rank]), subset_bags(test_bags, test_parts[world.rank]),
            subset_bags(test_bags, torch.cat(test_parts)))


def method_arguments(cfg: TrainConfig, bags, data, model, device) -> dict:
    """What the trainer offers a method's constructor (methods.build_method takes what it
    names); instance labels only to a method registered as needing them."""
    offered = dict(offsets=bags.offsets, counts=bags.counts, count_log_weights=bags.count_log_weights,
                   model=model, device=device, image_shape=tuple(data.x.shape[1:]), batch_size=cfg.batch_size,
                   lr=cfg.lr, width=cfg.width, seed=cfg.seed, estep=cfg.estep, tol=cfg.tol, min_epochs=cfg.min_epochs,
                   gan_weight=cfg.gan_weight, multiclass_estep=cfg.multiclass_estep)
    if METHODS[cfg.method].needs_labels:
        if data.y is None:
            raise DataError(f"--method {cfg.method} needs instance labels, and this dataset has none")
        offered["labels"] = data.y[bags.index]
    return offered


class Trainer:
    """A training run's parts: data and bags (this rank's shard under torchrun), model,
    optimiser, inputs, minibatches, RNG, the method. The method gets what it needs
    from here as arguments (epoch()), never the trainer itself."""

    def __init__(self, cfg: TrainConfig, world: distributed.World | None = None):
        self.cfg = cfg
        self.world = world or distributed.World()
        self.device = self.world.device if self.world.distributed else resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.dataset = load_data(cfg)
        self.dataset = dataclasses.replace(self.dataset, train=observed_training_bags(cfg, self.dataset))
        self.data, self.test_bags = self.dataset.data, self.dataset.test
        if self.dataset.train.offsets.numel() < 2:
            raise DataError("no training bags: check --num-bags, --bag-size and --test-fraction")
        self.train_bags, self.test_shard, self.test_gathered = shard(self.dataset.train, self.test_bags, self.world)
        if cfg.method not in METHODS:  # e.g. a config of an experiment's method that is not registered here
            raise DataError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
        self.num_classes = len(self.data.classes)
        check_multiclass_options(cfg, self.dataset)
        outputs = network_outputs(METHODS[cfg.method], self.num_classes)
        self.model = build_backbone(cfg.backbone, self.data.x.shape[1], outputs, cfg.width, cfg.weights).to(self.device)
        prepare_model(self.model, self.device, cfg.amp, cfg.compile)
        lr_factor(cfg.lr_schedule, 0, cfg.epochs)  # rejects an unknown schedule before any work
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.preprocess = Preprocess(self.data.x, self.data.is_rgb, cfg.augment, self.device, cfg.workers)
        # Shuffling has its own generator; augmentation and dropout use the global RNG.
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.inputs = TrainingInputs(self.preprocess, self.train_bags.index)
        self.batches = Batches(self.train_bags.offsets, self.train_bags.counts, cfg.batch_size, self.generator,
                               self.world, on_plan=self.inputs.plan)
        self.method = build_method(cfg.method, **method_arguments(cfg, self.train_bags, self.data, self.model,
                                                                  self.device))
        attach_grad_scalers(cfg.amp, self.device, self.optimizer, *self.method.own_optimizers)
        if self.world.distributed:
            # Every rank built the same networks from cfg.seed (rank 0's are broadcast all the
            # same, as DistributedDataParallel does); from here on each rank draws its own
            # dropout masks, augmentations and shuffles.
            sync.broadcast_module(self.world, self.model)
            rank_seed = cfg.seed + 7919 * (self.world.rank + 1)
            torch.manual_seed(rank_seed)
            self.generator.manual_seed(rank_seed + 1)
        self.interactive = sys.stderr.isatty() and not cfg.quiet and self.world.is_main

    @property
    def optimizers(self) -> tuple:
        """The trainer's optimiser and the method's own (the learning-rate schedule sets all)."""
        return (self.optimizer, *self.method.own_optimizers)

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
        """Test metrics (metrics.metrics_from_logits) of all test bags: each rank infers
        its test shard, and every rank computes the metrics of all of them (the same
        on every rank; one process infers them all)."""
        logits = infer_logits(self.model, self.preprocess, self.test_shard.index, self.cfg.batch_size)
        parts = distributed.all_gather_objects(self.world, logits)
        test, _, _ = metrics_from_logits(torch.cat(parts), self.data, self.test_gathered)
        return test

    def checkpoint_state(self, epoch, history):
        """The checkpoint (checkpoint.checkpoint_state, a collective): rank 0 gets it, the others None."""
        return checkpoint.checkpoint_state(
            epoch, history, config=dataclasses.asdict(self.cfg), model=self.model, optimizer=self.optimizer,
            method=self.method, generator=self.generator, bag_ids=self.train_bags.bag_ids, device=self.device,
            world=self.world)

    def restore(self, state) -> list[dict]:
        """Load a checkpoint written with the same options; returns the history of the epochs it holds."""
        check_resume_config(state.get("config", {}), self.cfg)
        return checkpoint.restore(state, model=self.model, optimizer=self.optimizer, method=self.method,
                                  generator=self.generator, bag_ids=self.train_bags.bag_ids, device=self.device,
                                  world=self.world)

    def model_payload(self) -> dict:
        return checkpoint.model_payload(dataclasses.asdict(self.cfg), self.model,
                                        network_outputs(METHODS[self.cfg.method], self.num_classes),
                                        int(self.data.x.shape[1]), self.data.classes)


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
    trainer = Trainer(cfg, world)
    history, start = [], 0
    if cfg.resume:
        state = checkpoint.load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), world)
        history, start = trainer.restore(state), int(state["epoch"]) + 1
        del state
    # Only now: a run whose data or checkpoint fail to load leaves no folder behind.
    if world.is_main and make_out_folder(cfg.out):
        made.append(cfg.out)
    if world.distributed:
        write_shards(os.path.join(cfg.out, "shards.json"), world, cfg.batch_size, trainer.train_bags,
                     trainer.test_shard)
    if world.is_main:
        write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg), indent=2)
    say = (lambda *a: None) if cfg.quiet or not world.is_main else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(_announcement(cfg, trainer))
    bar = None
    if trainer.interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, desc=cfg.method, unit="epoch")
    for epoch in range(start, cfg.epochs):
        if trainer.method.converged:
            break
        row, line = train_one_epoch(trainer, epoch, cfg.lr * lr_factor(cfg.lr_schedule, epoch, cfg.epochs))
        history.append(row)
        save_epoch(trainer, epoch, history)
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
    if world.is_main:
        checkpoint.atomic_save(trainer.model_payload(), os.path.join(cfg.out, "model.pt"))
        plot_curves(os.path.join(cfg.out, "curves.png"), history, f"{cfg.method} on {cfg.dataset}")
    if trainer.method.converged:
        say(f"converged: |dL| < {cfg.tol} after {len(history)} epochs")
    say(summary_table([(cfg.method, history)]))
    distributed.barrier(world)  # leave together: no rank tears down while rank 0 still writes
    return history


def _announcement(cfg: TrainConfig, trainer: Trainer) -> str:
    world, train_bags = trainer.world, trainer.dataset.train  # all of them (trainer.train_bags: this rank's)
    where = f"{trainer.device}" if not world.distributed else \
        f"{world.size} processes ({world.backend}, {trainer.device.type}), " \
        f"{distributed.per_rank_batch_size(cfg.batch_size, world)} instances per minibatch each"
    return (f"{cfg.method}: {len(train_bags.bag_ids)} train bags ({train_bags.index.numel()} instances), "
            f"{len(trainer.test_bags.bag_ids)} test bags; {cfg.backbone} on {where}")


def train_one_epoch(trainer: Trainer, epoch: int, lr: float) -> tuple[dict, str]:
    """Epoch `epoch` (0-based) at learning rate `lr`, then the test metrics; returns the
    row of metrics.csv and the line that reports it."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    t0 = time.perf_counter()
    stats = trainer.run_epoch()
    seconds = time.perf_counter() - t0
    check_ranks_agree(trainer.world, trainer.model, stats, trainer.method.converged,
                      f"epoch {epoch + 1} of --method {trainer.cfg.method}")
    test = trainer.test_metrics()
    row = {"epoch": epoch + 1, "lr": lr, **stats, "epoch_seconds": seconds, "test_accuracy": test["accuracy"],
           "test_auc": test["auc"], "test_bag_mae": test["bag_mae"], "test_L": test["L"]}
    line = (f"epoch {epoch + 1}/{trainer.cfg.epochs}: loss {stats['train_loss']:.4f}  L {stats['L']:.4f}  "
            f"test acc {test['accuracy']:.4f}  auc {test['auc']:.4f}  bag MAE {test['bag_mae']:.3f}  "
            f"({seconds:.1f}s)")
    if stats.get("approximated_bags"):
        line += f"  [{stats['approximated_bags']} bags took the approximate E-step]"
    return row, line


def save_epoch(trainer: Trainer, epoch: int, history: list[dict]) -> None:
    """metrics.csv and checkpoint.pt after an epoch (rank 0 writes; the checkpoint is a collective)."""
    out = trainer.cfg.out
    if trainer.world.is_main:
        write_metrics(os.path.join(out, "metrics.csv"), history)
    state = trainer.checkpoint_state(epoch, history)
    if trainer.world.is_main:
        checkpoint.atomic_save(state, os.path.join(out, "checkpoint.pt"))


def check_ranks_agree(world, model, stats: dict, converged: bool, what: str) -> None:
    """Under torchrun: raise DistributedError unless every rank has the same model
    parameters, L, training loss and stopping decision after this epoch (nothing to
    check for one process)."""
    if not world.distributed:
        return
    sync.check_in_sync(world, model, what)
    mine = (stats.get("L"), stats.get("train_loss"), bool(converged))
    seen = distributed.all_gather_objects(world, mine)
    same = lambda a, b: a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # noqa: E731
    if not all(all(same(x, y) for x, y in zip(other, mine)) for other in seen):
        raise distributed.DistributedError(
            f"{what}: the ranks disagree on (L, train_loss, converged): {seen}. A method must report means over "
            f"all ranks (distributed.bag_mean / instance_mean) and decide to stop from them")
