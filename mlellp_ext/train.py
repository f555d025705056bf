"""The training loop shared by every method: data, model, epochs, metrics, checkpoints.

A method (em.EM, baselines.*) implements ``epoch(trainer) -> dict`` and holds
its own state; this module runs epochs, evaluates on the test bags, writes
``metrics.csv``, ``checkpoint.pt`` (atomically, every epoch), ``model.pt``,
``config.json`` and ``curves.png``, and resumes from a checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from .batches import Preprocess, infer_logits
from .data import BagDataset, load_dataset, parse_bag_size
from .models import build_backbone

METHODS = ("mle", "mle-direct", "dllp", "supervised")
METRIC_COLUMNS = ("epoch", "train_loss", "L", "e_step_seconds", "inference_seconds", "m_step_seconds",
                  "epoch_seconds", "test_accuracy", "test_auc", "test_bag_mae", "test_L")


@dataclass
class TrainConfig:
    out: str
    dataset: str = "digits"
    data_root: str | None = None
    classes: str | None = None
    download: bool = False
    test_root: str | None = None
    counts_file: str | None = None
    bag_size: str = "2:12"
    num_bags: int | None = None
    test_fraction: float = 0.2
    method: str = "mle"
    backbone: str = "cnn"
    width: float = 1.0
    weights: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    estep: str = "fresh"
    tol: float = 1e-4
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    resume: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def load_data(cfg) -> BagDataset:
    """The dataset and its bags, from the data options of a config (train or model.pt)."""
    return load_dataset(cfg.dataset, data_root=cfg.data_root, classes=cfg.classes, download=cfg.download,
                        bag_size=parse_bag_size(cfg.bag_size), num_bags=cfg.num_bags,
                        test_fraction=cfg.test_fraction, seed=cfg.seed, test_root=cfg.test_root,
                        counts_file=cfg.counts_file)


def bag_metrics(model, preprocess, data, bags, batch_size) -> dict:
    """Instance accuracy and AUC (when labels are known), bag-count MAE and mean bag
    log-likelihood on `bags`, from one inference pass."""
    from .ops import posterior

    logits = infer_logits(model, preprocess, bags.index, batch_size)
    prob = torch.sigmoid(logits)
    sizes = bags.offsets[1:] - bags.offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    expected = torch.zeros(sizes.numel()).index_add_(0, bag, prob)
    out = {"bag_mae": float((expected - bags.counts.float()).abs().mean()) if sizes.numel() else math.nan,
           "L": float(posterior(logits, bags.offsets, bags.counts)[1].mean()) if sizes.numel() else math.nan,
           "accuracy": math.nan, "auc": math.nan, "n_instances": int(bags.index.numel()), "n_bags": int(sizes.numel())}
    if data.y is not None and bags.index.numel():
        y = data.y[bags.index]
        out["accuracy"] = float(((prob > 0.5).long() == y).float().mean())
        out["auc"] = auc(prob, y)
    return out, prob, expected


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC by the rank statistic (ties averaged); NaN if one class is absent."""
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = torch.argsort(score)
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(score, return_inverse=True)
    if len(uniq) < len(score):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
        cnts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / cnts)[inverse]
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


class Trainer:
    """What a method's epoch needs: model, optimiser, data, preprocessing, RNG, progress."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.dataset = load_data(cfg)
        self.data, self.train_bags, self.test_bags = self.dataset.data, self.dataset.train, self.dataset.test
        if self.train_bags.offsets.numel() < 2:
            raise ValueError("no training bags: check --num-bags, --bag-size and --test-fraction")
        in_channels = self.data.x.shape[1]
        self.model = build_backbone(cfg.backbone, in_channels, 1, cfg.width, cfg.weights).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.preprocess = Preprocess(self.data.x, self.data.is_rgb, cfg.augment, self.device)
        # Shuffling has its own generator; augmentation and dropout use the global RNG.
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.method = make_method(cfg, self)
        self.interactive = sys.stderr.isatty() and not cfg.quiet

    def progress(self, iterable, desc):
        if not self.interactive:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, unit="batch")

    # ---- checkpoints
    def checkpoint_state(self, epoch, history):
        state = {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "method": self.method.state_dict(), "torch_rng": torch.get_rng_state(),
                 "generator": self.generator.get_state(), "history": history,
                 "config": dataclasses.asdict(self.cfg)}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def make_method(cfg, trainer):
    from .baselines import DLLP, DirectLikelihood, Supervised
    from .em import EM

    if cfg.method == "mle":
        return EM(trainer, estep=cfg.estep, tol=cfg.tol)
    if cfg.method == "mle-direct":
        return DirectLikelihood(trainer)
    if cfg.method == "dllp":
        return DLLP(trainer)
    if cfg.method == "supervised":
        return Supervised(trainer)
    raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")


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
            "in_channels": int(trainer.data.x.shape[1]), "classes": list(trainer.data.classes)}


def train(cfg: TrainConfig, stop_after_epochs: int | None = None) -> list[dict]:
    """Train per `cfg`; returns the per-epoch metrics. `stop_after_epochs` ends the
    run early after that many epochs in total, as an interruption would (for tests)."""
    os.makedirs(cfg.out, exist_ok=True)
    trainer = Trainer(cfg)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    history, start = [], 0
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        trainer.restore(state)
        history, start = list(state["history"]), int(state["epoch"]) + 1
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"{cfg.method}: {trainer.train_bags.counts.numel()} train bags "
        f"({trainer.train_bags.index.numel()} instances), {trainer.test_bags.counts.numel()} test bags; "
        f"{cfg.backbone} on {trainer.device}")
    epochs = range(start, cfg.epochs)
    bar = None
    if trainer.interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, desc=cfg.method, unit="epoch")
    for epoch in epochs:
        if trainer.method.converged:
            break
        t0 = time.perf_counter()
        stats = trainer.method.epoch(trainer)
        seconds = time.perf_counter() - t0
        test, _, _ = bag_metrics(trainer.model, trainer.preprocess, trainer.data, trainer.test_bags, cfg.batch_size)
        row = {"epoch": epoch + 1, **stats, "epoch_seconds": seconds, "test_accuracy": test["accuracy"],
               "test_auc": test["auc"], "test_bag_mae": test["bag_mae"], "test_L": test["L"]}
        history.append(row)
        write_metrics(os.path.join(cfg.out, "metrics.csv"), history)
        atomic_save(trainer.checkpoint_state(epoch, history), ckpt_path)
        line = (f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f}  L {stats['L']:.4f}  "
                f"test acc {test['accuracy']:.4f}  auc {test['auc']:.4f}  bag MAE {test['bag_mae']:.3f}  "
                f"({seconds:.1f}s)")
        if bar is not None:
            bar.set_postfix_str(line.split(": ", 1)[1])
            bar.update(1)
        else:
            say(line)
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
            return history
    if bar is not None:
        bar.close()
    atomic_save(model_payload(trainer), os.path.join(cfg.out, "model.pt"))
    plot_curves(os.path.join(cfg.out, "curves.png"), history, f"{cfg.method} on {cfg.dataset}")
    if trainer.method.converged:
        say(f"converged: |dL| < {cfg.tol} after {len(history)} epochs")
    say(summary_table([(cfg.method, history)]))
    return history


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
    model = build_backbone(cfg["backbone"], payload["in_channels"], 1, cfg["width"], None)
    model.load_state_dict(payload["state_dict"])
    model.to(resolve_device(device)).eval()
    return model, payload
