"""Table and plot of the CIFAR-10 1,000-bag runs (docs/experiments/cifar10-bird-cat.md).

Each run folder under RUNS holds the config.json and metrics.csv that `mlellp train`
wrote (seed S: sS/supervised and sS/mle-recorded). Run from the project root:
    python experiments/cifar10_bird_cat/summarise.py [RUNS]   # default docs/experiments/cifar10-bird-cat
writes RUNS/summary.md and RUNS/accuracy.png (thin: each run, thick: mean).
"""
import csv
import glob
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = (("supervised", "supervised"), ("mle-recorded", "MLE-LLP (--estep recorded)"))
COLOURS = {"supervised": "C0", "mle-recorded": "C1"}


def read(run):
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return cfg, [int(r["epoch"]) for r in rows], [float(r["test_accuracy"]) for r in rows]


def main(runs=os.path.join("docs", "experiments", "cifar10-bird-cat")):
    os.chdir(runs)
    seeds = sorted((d for d in glob.glob("s[0-9]*") if os.path.isdir(d)), key=lambda s: int(s[1:]))
    lines = ["# CIFAR-10 bird vs cat, 1,000 bags: supervised vs MLE-LLP", "",
             "Made by `summarise.py` from the runs' own metrics.csv (test accuracy at the last epoch).", "",
             "| seed | supervised | MLE-LLP | gap (points) |", "|---|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    finals = {m: [] for m, _ in METHODS}
    curves = {m: [] for m, _ in METHODS}
    for seed in seeds:
        for method, _ in METHODS:
            cfg, epochs, acc = read(os.path.join(seed, method))
            assert cfg["seed"] == int(seed[1:]), (seed, cfg["seed"])
            finals[method].append(acc[-1])
            curves[method].append(acc)
            # one thin line per run, so a seed that strays stays visible
            ax.plot(epochs, acc, color=COLOURS[method], lw=0.6, alpha=0.5)
        sup, mle = finals["supervised"][-1], finals["mle-recorded"][-1]
        lines.append(f"| {seed[1:]} | {sup:.4f} | {mle:.4f} | {100 * (sup - mle):.1f} |")
    for method, label in METHODS:
        mean_curve = [statistics.mean(c) for c in zip(*curves[method])]
        ax.plot(epochs, mean_curve, color=COLOURS[method], lw=2,
                label=f"{label}, mean of {len(seeds)} seeds")
    sup, mle = (statistics.mean(finals[m]) for m, _ in METHODS)
    gaps = [100 * (a - b) for a, b in zip(finals["supervised"], finals["mle-recorded"])]
    sem = statistics.stdev(gaps) / len(gaps) ** 0.5
    lines += [f"| mean | {sup:.4f} | {mle:.4f} | {statistics.mean(gaps):.1f} "
              f"(sd {statistics.stdev(gaps):.1f}, standard error {sem:.1f}) |", ""]
    with open("summary.md", "w") as f:
        f.write("\n".join(lines))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test instance accuracy")
    ax.set_title("CIFAR-10 bird/cat, 1,000 bags, cnn width 0.5, cosine lr, batch 32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("accuracy.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
