"""The files of a training run in ``--out``, other than the checkpoint and the model
(checkpoint.py): ``config.json``, ``metrics.csv``, ``curves.png`` and, under torchrun,
``shards.json``; and the closing table. Only rank 0 writes (the callers see to it);
each file is replaced whole, never left half written."""
from __future__ import annotations

import contextlib
import csv
import json
import os

from . import distributed

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "L", "e_step_seconds", "inference_seconds", "m_step_seconds",
                  "epoch_seconds", "test_accuracy", "test_auc", "test_bag_mae", "test_L", "approximated_bags")


@contextlib.contextmanager
def replaced_atomically(path: str):
    """Yields PATH.tmp to write; it then replaces `path` in one step, so that a reader
    (or a run interrupted while writing) never finds half a file."""
    tmp = path + ".tmp"
    yield tmp
    os.replace(tmp, path)


def make_out_folder(out: str) -> bool:
    """Create the folder `out` (and its parents); whether this call created it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        os.mkdir(out)
        return True
    except FileExistsError:
        return False


def write_json(path: str, obj, indent: int | None = None) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def write_metrics(path: str, history: list[dict]) -> None:
    """metrics.csv: a row per epoch, the columns METRIC_COLUMNS (empty where a value is None)."""
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})


def plot_curves(path: str, history: list[dict], title: str) -> None:
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


def write_shards(path: str, world, batch_size: int, train_bags, test_bags) -> None:
    """Rank 0 writes `path` (shards.json): each rank's training and test bag ids, given
    this rank's `train_bags` and `test_bags` (a collective: call it on every rank)."""
    mine = {"rank": world.rank, "train_bags": list(train_bags.bag_ids),
            "train_instances": int(train_bags.index.numel()), "test_bags": list(test_bags.bag_ids)}
    ranks = distributed.gather_to_main(world, mine)
    if world.is_main:
        write_json(path, {"world_size": world.size, "batch_size": batch_size,
                          "per_rank_batch_size": distributed.per_rank_batch_size(batch_size, world), "ranks": ranks})


def summary_table(runs) -> str:
    """A closing table: one row per (name, history)."""
    lines = [f"{'method':12s} {'epochs':>6s} {'test acc':>9s} {'test AUC':>9s} {'bag MAE':>8s} {'L':>9s} {'s/epoch':>8s}"]
    for name, history in runs:
        last = history[-1]
        mean_s = sum(r["epoch_seconds"] for r in history) / len(history)
        lines.append(f"{name:12s} {len(history):6d} {last['test_accuracy']:9.4f} {last['test_auc']:9.4f} "
                     f"{last['test_bag_mae']:8.3f} {last['L']:9.4f} {mean_s:8.2f}")
    return "\n".join(lines)
