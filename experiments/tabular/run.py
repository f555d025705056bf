"""Tabular LLP on a real table: EMClassifier around a GBDT and a linear model against the
bag-proportion baseline and supervised training, exact and label-DP counts.

Protocol (docs/experiments/tabular.md): the Fair affairs survey (6,366 rows, shipped
inside statsmodels), label ``affairs > 0``; per seed a random 80/20 split of rows, the
training rows in random bags of 8..32 and of 32..128; counts exact or released by
``count_weights.privatize`` at epsilon 4, 1, 0.25 (and modelled by ``count_weights.laplace``);
test AUC on the held-out rows' instance labels.

    python experiments/tabular/run.py --out docs/experiments/tabular
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import time

import numpy as np
import torch
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from mlellp_ext import count_weights
from mlellp_ext.sklearn import EMClassifier, ProportionClassifier

MODELS = {"gbdt": lambda: HistGradientBoostingClassifier(max_iter=100),
          "linear": lambda: LogisticRegression(max_iter=1000)}


def load_fair():
    import statsmodels.api as sm  # the table ships inside the wheel: no download

    frame = sm.datasets.fair.load_pandas().data
    y = (frame.pop("affairs").to_numpy() > 0).astype(np.int64)
    return frame.to_numpy(dtype=np.float64), y


def random_bags(rng, n, low, high):
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(low, high + 1)))
    bags = np.repeat(np.arange(len(sizes)), sizes)[:n]
    rng.shuffle(bags)
    return bags


def methods(model, em_iterations=10):
    yield f"em-{model}-crossfit", lambda seed: EMClassifier(MODELS[model](), cross_fit=True, random_state=seed,
                                                             max_iter=em_iterations)
    yield f"em-{model}-insample", lambda seed: EMClassifier(MODELS[model](), cross_fit=False, max_iter=em_iterations)
    yield f"proportion-{model}", lambda seed: ProportionClassifier(MODELS[model]())


def run(args):
    X, y = load_fair()
    if args.rows:  # a subsample, to check that the code runs
        keep = np.random.default_rng(0).permutation(len(y))[: args.rows]
        X, y = X[keep], y[keep]
    rows = []
    cells = [(s, b, e) for s in range(args.seeds) for b in args.bags for e in args.epsilons]
    supervised = {}
    for seed, bag_range, eps in tqdm(cells, desc="cells"):
        rng = np.random.default_rng(seed)
        test = rng.permutation(len(y))[: len(y) // 5]
        train = np.setdiff1d(np.arange(len(y)), test)
        for model in MODELS:
            if (seed, model) not in supervised:
                fitted = MODELS[model]().fit(X[train], y[train])
                supervised[seed, model] = roc_auc_score(y[test], fitted.predict_proba(X[test])[:, 1])
                rows.append(dict(seed=seed, bags="-", epsilon="-", method=f"supervised-{model}",
                                 auc=supervised[seed, model], n_iter="", seconds=""))
        low, high = map(int, bag_range.split("-"))
        bags = random_bags(np.random.default_rng(1000 + seed), len(train), low, high)
        sizes = torch.from_numpy(np.bincount(bags))
        counts = torch.from_numpy(np.bincount(bags, weights=y[train]).astype(np.int64))
        released = count_weights.privatize(counts, eps, generator=torch.Generator().manual_seed(seed))
        w = (count_weights.exact(counts, sizes) if math.isinf(eps)
             else count_weights.laplace(released.double(), 1.0 / eps, sizes))
        for model in MODELS:
            for name, make in methods(model, args.em_iterations):
                start = time.perf_counter()
                fitted = make(seed).fit(X[train], count_log_weights=w, bags=bags)
                rows.append(dict(seed=seed, bags=bag_range, epsilon=eps, method=name,
                                 auc=roc_auc_score(y[test], fitted.predict_proba(X[test])[:, 1]),
                                 n_iter=getattr(fitted, "n_iter_", 0), seconds=time.perf_counter() - start))
    return rows


def summarise(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(values):
        v = np.asarray(values, dtype=float)
        return v.mean(), (v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))

    sup = {m: stats([r["auc"] for r in rows if r["method"] == f"supervised-{m}"]) for m in MODELS}
    names = [n for m in MODELS for n, _ in methods(m)]
    lines = ["| bags | ε | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    grid = sorted({(r["bags"], r["epsilon"]) for r in rows if r["bags"] != "-"},
                  key=lambda k: (int(k[0].split("-")[0]), -k[1]))
    for bag_range, eps in grid:
        cells = []
        for n in names:
            mean, se = stats([r["auc"] for r in rows if (r["bags"], r["epsilon"], r["method"]) == (bag_range, eps, n)])
            cells.append(f"{mean:.3f} ± {se:.3f}")
        lines.append(f"| {bag_range} | {'∞' if math.isinf(eps) else eps} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"Supervised {m} (instance labels): {sup[m][0]:.3f} ± {sup[m][1]:.3f}" for m in MODELS]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len({g[0] for g in grid}), figsize=(11, 4), sharey=True, squeeze=False)
    for ax, bag_range in zip(axes[0], sorted({g[0] for g in grid}, key=lambda b: int(b.split("-")[0]))):
        eps_values = sorted({g[1] for g in grid if g[0] == bag_range}, reverse=True)
        xs = np.arange(len(eps_values))
        for n in names:
            ax.plot(xs, [stats([r["auc"] for r in rows if (r["bags"], r["epsilon"], r["method"]) ==
                                (bag_range, e, n)])[0] for e in eps_values], marker="o", label=n)
        for m, style in zip(MODELS, ["--", ":"]):
            ax.axhline(sup[m][0], color="k", linestyle=style, label=f"supervised-{m}")
        ax.set_xticks(xs, ["∞" if math.isinf(e) else str(e) for e in eps_values])
        ax.set_xlabel("ε (label-DP counts)")
        ax.set_title(f"bags of {bag_range}")
    axes[0][0].set_ylabel("test AUC")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "auc.png"), dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/experiments/tabular", help="folder for runs.csv, summary.md, auc.png")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (split, bags, noise)")
    parser.add_argument("--bags", nargs="+", default=["8-32", "32-128"], help="bag size ranges LOW-HIGH")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 4.0, 1.0, 0.25],
                        help="label-DP epsilons of the released counts (inf: exact)")
    parser.add_argument("--threads", type=int, default=1, help="threads for the models and the ops")
    parser.add_argument("--em-iterations", type=int, default=10, help="EMClassifier's max_iter")
    parser.add_argument("--rows", type=int, default=0, help="use a random subsample of this many rows (0: all)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        rows = run(args)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summarise(rows, args.out)
    print(open(os.path.join(args.out, "summary.md")).read())


if __name__ == "__main__":
    main()
