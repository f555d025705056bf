"""Training from privatised counts: test accuracy against epsilon
(docs/experiments/noisy-counts.md).

Protocol (fixed before the runs): each training bag's count is released with
discrete Laplace noise of scale 1/epsilon (``--privatize-counts EPS``, seeded by
the run's seed; test bags keep their true labels for scoring), epsilon in
{inf, 4, 2, 1, 0.5, 0.25}; three learners on the same released counts:
  * ``mle``: EM with the matched noise model (the exact likelihood of the released count);
  * ``mle-ignore``: EM taking the released count, clipped to 0..n, as exact
    (``--count-noise-model ignore``: what a user would otherwise run);
  * ``dllp``: DLLP on the clipped released proportion.
Datasets: ``digits`` (label digit >= 5, bags of 2..12, every image; ``cnn`` width
0.5, 20 epochs, seeds 0, 1, 2) and ``cifar`` (``../shared/data/cifar10_bird_cat_train.npz``,
1,000 bags of 2..12; ``cnn`` width 0.25, 10 epochs, seed 0). Adam lr 1e-3, batch 64,
``--tol 0``. Reported: final test accuracy per run and its mean over seeds.

Each run goes through the public training API and is resumable (a finished run
is kept). Run from the project root, e.g.:

    python experiments/noisy_counts/run.py --runs runs/noisy --dataset digits
    python experiments/noisy_counts/run.py --runs runs/noisy --dataset cifar
    python experiments/noisy_counts/run.py --runs runs/noisy --summarise docs/experiments/noisy-counts
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys

import torch

from mlellp_ext.app.train import TrainConfig, train

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar10_bird_cat_train.npz")
EPSILONS = (math.inf, 4.0, 2.0, 1.0, 0.5, 0.25)
LEARNERS = {"mle": dict(method="mle"), "mle-ignore": dict(method="mle", count_noise_model="ignore"),
            "dllp": dict(method="dllp")}
LABELS = {"mle": "EM, matched noise model", "mle-ignore": "EM, noise ignored", "dllp": "DLLP"}
SETTINGS = {
    "digits": dict(seeds=(0, 1, 2), config=dict(dataset="digits", width=0.5, epochs=20)),
    "cifar": dict(seeds=(0,), config=dict(dataset="npz", data_root=CIFAR, num_bags=1000, width=0.25, epochs=10)),
}


def run_name(dataset, learner, eps, seed):
    return f"{dataset}-{learner}-eps{'inf' if math.isinf(eps) else f'{eps:g}'}-s{seed}"


def run(args) -> None:
    setting = SETTINGS[args.dataset]
    config = dict(setting["config"])
    if args.data_root:
        config["data_root"] = args.data_root
    seeds = setting["seeds"] if args.seeds is None else args.seeds
    epsilons = EPSILONS if args.epsilons is None else args.epsilons
    jobs = [(learner, eps, seed) for seed in seeds for eps in epsilons for learner in LEARNERS]
    try:
        from tqdm.auto import tqdm

        jobs_iter = tqdm(jobs, desc=args.dataset, unit="run")
    except ImportError:  # tqdm comes with the requirements; a plain loop otherwise
        jobs_iter = jobs
    for learner, eps, seed in jobs_iter:
        out = os.path.join(args.runs, run_name(args.dataset, learner, eps, seed))
        if os.path.exists(os.path.join(out, "model.pt")):
            continue
        cfg = TrainConfig(out=out, backbone="cnn", batch_size=64, lr=1e-3, tol=0.0, seed=seed, quiet=True,
                          device="cpu", privatize_counts=eps, **config, **LEARNERS[learner])
        if args.epochs is not None:
            cfg.epochs = args.epochs
        cfg.resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
        train(cfg)


def summarise(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.summarise, exist_ok=True)
    rows = []
    for name in sorted(os.listdir(args.runs)):
        path = os.path.join(args.runs, name, "metrics.csv")
        if not os.path.exists(os.path.join(args.runs, name, "model.pt")):
            continue
        with open(path) as f:
            last = list(csv.DictReader(f))[-1]
        with open(os.path.join(args.runs, name, "config.json")) as f:
            cfg = json.load(f)
        dataset, rest = name.split("-", 1)
        learner = rest.rsplit("-eps", 1)[0]
        eps = cfg["privatize_counts"]
        rows.append({"dataset": dataset, "learner": learner, "epsilon": eps, "seed": cfg["seed"],
                     "epochs": int(last["epoch"]), "test_accuracy": float(last["test_accuracy"]),
                     "test_auc": float(last["test_auc"])})
    with open(os.path.join(args.summarise, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    datasets = [d for d in SETTINGS if any(r["dataset"] == d for r in rows)]
    eps_key = lambda e: (0, 0.0) if math.isinf(e) else (1, -e)  # noqa: E731  (inf first, then decreasing)
    lines = []
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        eps_values = sorted({r["epsilon"] for r in mine}, key=eps_key)
        seeds = sorted({r["seed"] for r in mine})
        lines += [f"**{dataset}** (mean test accuracy over seeds {', '.join(map(str, seeds))}; "
                  f"{'± sd; ' if len(seeds) > 1 else ''}each cell one run per seed)", "",
                  "| learner | " + " | ".join(f"ε = {'∞' if math.isinf(e) else f'{e:g}'}" for e in eps_values) + " |",
                  "|---|" + "---:|" * len(eps_values)]
        for learner in LEARNERS:
            cells, means = [], []
            for e in eps_values:
                acc = [r["test_accuracy"] for r in mine if r["learner"] == learner and r["epsilon"] == e]
                if not acc:
                    cells.append("—")
                    means.append(math.nan)
                    continue
                m = statistics.fmean(acc)
                means.append(m)
                cells.append(f"{m:.3f}" + (f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""))
            lines.append(f"| {LABELS[learner]} | " + " | ".join(cells) + " |")
            ax.plot(range(len(means)), means, marker="o", label=LABELS[learner])
        ax.set_xticks(range(len(eps_values)), ["∞" if math.isinf(e) else f"{e:g}" for e in eps_values])
        ax.set_xlabel("ε of the released counts (smaller: more noise)")
        ax.set_ylabel("test instance accuracy")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
        lines.append("")
    fig.tight_layout()
    fig.savefig(os.path.join(args.summarise, "accuracy.png"), dpi=100)
    with open(os.path.join(args.summarise, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder of the run folders")
    p.add_argument("--dataset", choices=list(SETTINGS), default="digits")
    p.add_argument("--data-root", default=None, help="cifar: the bird/cat npz file (default: ../shared/data)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (for a quick check)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the protocol's seeds")
    p.add_argument("--epsilons", type=float, nargs="+", default=None, help="override the protocol's epsilons")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarise", default=None, help="write the table and plot of every run under --runs here")
    args = p.parse_args(argv)
    if args.summarise:
        summarise(args)
        return
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    sys.exit(main())
