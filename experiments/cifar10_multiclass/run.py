"""CIFAR-10, ten classes, from count vectors: MLE-LLP vs DLLP vs supervised
(docs/experiments/cifar10-multiclass.md).

Protocol (fixed before the runs): ``../shared/data/cifar10_train_20k.npz``
(2,000 training images per class), ``--classes all``, bags of exactly
``--bag-size`` images drawn at random, 80/20 split of the bags by ``--seed``;
``cnn`` backbone at ``--width``, Adam lr 1e-3, batch 64, ``--epochs`` epochs
with ``--tol 0`` (EM does every epoch), augmentation on; the three methods on
the same bags, split, backbone and epochs. Reported: final test accuracy, macro
AUC, bag-count MAE, and the first epoch whose test accuracy reaches 99% of the
final one; a plot of the curves.

Each run goes through the public training API (``mlellp_ext.app.train``) and is
resumable: a run with a ``model.pt`` is kept, one with a ``checkpoint.pt`` is
continued. Run from the project root, e.g. as two processes of one thread:

    python experiments/cifar10_multiclass/run.py --runs runs/cifar10-mc --methods mle dllp
    python experiments/cifar10_multiclass/run.py --runs runs/cifar10-mc --methods supervised
    python experiments/cifar10_multiclass/run.py --runs runs/cifar10-mc --summarise docs/experiments/cifar10-multiclass
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

import torch

from mlellp_ext.app.train import TrainConfig, train

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar10_train_20k.npz")
METHODS = ("mle", "dllp", "supervised")
LABELS = {"mle": "MLE-LLP (EM)", "dllp": "DLLP", "supervised": "supervised"}


def config(out: str, method: str, args) -> TrainConfig:
    return TrainConfig(out=out, dataset="npz", data_root=args.data, classes="all", bag_size=f"{args.bag_size}:{args.bag_size}",
                       method=method, backbone="cnn", width=args.width, epochs=args.epochs, batch_size=64, lr=1e-3,
                       tol=0.0, seed=args.seed, quiet=False, device="cpu", multiclass_estep=args.multiclass_estep)


def run_name(method: str, args) -> str:
    return f"bags{args.bag_size}-s{args.seed}-{method}"


def run(args) -> None:
    for method in args.methods:
        out = os.path.join(args.runs, run_name(method, args))
        if os.path.exists(os.path.join(out, "model.pt")):
            print(f"{out}: done already", file=sys.stderr)
            continue
        resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
        cfg = config(out, method, args)
        train(TrainConfig(**{**cfg.__dict__, "resume": resume}))


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def epochs_to_99(rows: list[dict]) -> int:
    """The first epoch whose test accuracy reaches 99% of the final one."""
    final = rows[-1]["test_accuracy"]
    return next(int(r["epoch"]) for r in rows if r["test_accuracy"] >= 0.99 * final)


def summarise(args) -> None:
    """Copy each run's config.json and metrics.csv beside the table (summary.md,
    summary.csv) and the curves plot (accuracy.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.summarise, exist_ok=True)
    names = sorted(n for n in os.listdir(args.runs) if os.path.exists(os.path.join(args.runs, n, "metrics.csv")))
    table, curves = [], {}
    for name in names:
        rows = read_metrics(os.path.join(args.runs, name, "metrics.csv"))
        keep = os.path.join(args.summarise, name)
        os.makedirs(keep, exist_ok=True)
        shutil.copy(os.path.join(args.runs, name, "metrics.csv"), keep)
        with open(os.path.join(args.runs, name, "config.json")) as f:
            cfg = json.load(f)
        # The data as the docs name it (beside the project), not where this machine keeps it.
        for key in ("data_root", "out"):
            if cfg.get(key):
                cfg[key] = ("../shared/data/" if key == "data_root" else "runs/") + os.path.basename(cfg[key])
        with open(os.path.join(keep, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        bags, seed, method = name.split("-", 2)
        last = rows[-1]
        table.append({"bags": bags[4:], "seed": seed[1:], "method": method, "epochs": int(last["epoch"]),
                      "test_accuracy": last["test_accuracy"], "test_auc": last["test_auc"],
                      "test_bag_mae": last["test_bag_mae"], "epochs_to_99": epochs_to_99(rows),
                      "seconds_per_epoch": sum(r["epoch_seconds"] for r in rows) / len(rows),
                      "finished": os.path.exists(os.path.join(args.runs, name, "model.pt"))})
        curves[name] = rows
    with open(os.path.join(args.summarise, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = ["| bag size | seed | method | epochs | test accuracy | macro AUC | bag-count MAE | epochs to 99% of final "
             "| s/epoch |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['bags']} | {r['seed']} | {LABELS.get(r['method'], r['method'])} | {r['epochs']}"
                     f"{'' if r['finished'] else ' (unfinished)'} | {r['test_accuracy']:.3f} | {r['test_auc']:.3f} | "
                     f"{r['test_bag_mae']:.3f} | {r['epochs_to_99']} | {r['seconds_per_epoch']:.0f} |")
    with open(os.path.join(args.summarise, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    sizes = sorted({n.split("-")[0] for n in curves}, key=lambda s: int(s[4:]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for name, rows in curves.items():
            if name.split("-")[0] != size:
                continue
            method = name.split("-", 2)[2]
            ax.plot([r["epoch"] for r in rows], [r["test_accuracy"] for r in rows], marker=".",
                    label=f"{LABELS.get(method, method)} ({name.split('-')[1]})")
        ax.axhline(0.1, color="grey", linestyle=":", label="chance (0.1)")
        ax.set_title(f"CIFAR-10, 10 classes, bags of {size[4:]}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test instance accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.summarise, "accuracy.png"), dpi=100)
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder of the run folders")
    p.add_argument("--data", default=DATA, help="the 20k CIFAR-10 npz file")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--bag-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--multiclass-estep", choices=("exact", "approx", "auto"), default="exact",
                   help="EM's E-step for bags over the state budget (from bags of about 48 with ten classes)")
    p.add_argument("--summarise", default=None, help="write the table and plot of every run under --runs here")
    args = p.parse_args(argv)
    if args.summarise:
        summarise(args)
        return
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
