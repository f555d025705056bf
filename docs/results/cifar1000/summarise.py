"""Table and plot of the CIFAR-10 1,000-bag runs in this folder (README, "Training").

Each run folder here holds the config.json and metrics.csv that `mlellp train`
wrote (seed S: sS/supervised and sS/mle-recorded). Run from this folder:
    python summarise.py        # writes summary.md and accuracy.png
"""
import csv
import glob
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = (("supervised", "supervised"), ("mle-recorded", "MLE-LLP (--estep recorded)"))


def read(run):
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return cfg, [int(r["epoch"]) for r in rows], [float(r["test_accuracy"]) for r in rows]


def main():
    seeds = sorted((d for d in glob.glob("s[0-9]*") if os.path.isdir(d)), key=lambda s: int(s[1:]))
    lines = ["# CIFAR-10 bird vs cat, 1,000 bags: supervised vs MLE-LLP", "",
             "Made by `summarise.py` from the runs' own metrics.csv (test accuracy at the last epoch).", "",
             "| seed | supervised | MLE-LLP | gap (points) |", "|---|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    finals = {m: [] for m, _ in METHODS}
    for i, seed in enumerate(seeds):
        for (method, label), style in zip(METHODS, ("-", "--")):
            cfg, epochs, acc = read(os.path.join(seed, method))
            finals[method].append(acc[-1])
            ax.plot(epochs, acc, style, color=f"C{i}", label=f"{label}, seed {cfg['seed']}")
        sup, mle = finals["supervised"][-1], finals["mle-recorded"][-1]
        lines.append(f"| {seed[1:]} | {sup:.4f} | {mle:.4f} | {100 * (sup - mle):.1f} |")
    sup, mle = (statistics.mean(finals[m]) for m, _ in METHODS)
    gaps = [100 * (a - b) for a, b in zip(finals["supervised"], finals["mle-recorded"])]
    lines += [f"| mean | {sup:.4f} | {mle:.4f} | {statistics.mean(gaps):.1f} "
              f"(sd {statistics.stdev(gaps):.1f}) |", ""]
    with open("summary.md", "w") as f:
        f.write("\n".join(lines))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test instance accuracy")
    ax.set_title("CIFAR-10 bird/cat, 1,000 bags, cnn width 0.5, cosine lr, batch 32")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig("accuracy.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
