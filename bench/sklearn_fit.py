"""EMClassifier.fit on 100,000 rows with LogisticRegression: the wall time of one fit
and where it goes (a benchmark, not a timed test).

    python bench/sklearn_fit.py [--out bench/results] [--rows 100000]

Rows: 20 Gaussian features, labels from a logistic model; random bags of 2..64 rows
(uniform sizes, rows shuffled so that a bag's rows are scattered), exact counts.
``EMClassifier(LogisticRegression())`` with its defaults (in-sample E-step for a
linear model, at most 10 EM iterations, tol 1e-3), and the same with cross-fitting
(5 folds). Reports the fit's wall time, its iterations, the time of the E-steps
alone (the ops on all rows) and the time of one supervised LogisticRegression fit
on the same rows, for scale. Writes sklearn_fit_cpu.json and sklearn_fit_cpu.md.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import mlellp_ext
from mlellp_ext.sklearn import EMClassifier


def data(rows, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 20))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(X @ rng.normal(size=20) * 0.5)))).astype(np.int64)
    sizes = []
    while sum(sizes) < rows:
        sizes.append(int(rng.integers(2, 65)))
    bags = np.repeat(np.arange(len(sizes)), sizes)[:rows]
    rng.shuffle(bags)
    return X, y, bags, np.bincount(bags, weights=y).astype(np.int64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    X, y, bags, counts = data(args.rows)
    results = dict(rows=args.rows, bags=int(bags.max() + 1), threads=torch.get_num_threads(), torch=torch.__version__)
    for name, cross_fit in [("default (in-sample E-step)", "auto"), ("cross-fitted, 5 folds", True)]:
        start = time.perf_counter()
        em = EMClassifier(LogisticRegression(), cross_fit=cross_fit, random_state=0).fit(X, counts, bags=bags)
        results[name] = dict(seconds=time.perf_counter() - start, n_iter=int(em.n_iter_),
                             converged=bool(em.converged_))
    order = np.argsort(bags, kind="stable")
    offsets = mlellp_ext.offsets_from_sizes(torch.from_numpy(np.bincount(bags)))
    logits = torch.from_numpy(em.decision_function(X)[order])
    start = time.perf_counter()
    mlellp_ext.posterior(logits, offsets, torch.from_numpy(counts))
    results["one E-step (posterior on all rows), seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    LogisticRegression().fit(X, y)
    results["one supervised LogisticRegression fit, seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sklearn_fit_cpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# EMClassifier.fit, 100,000 rows, LogisticRegression (CPU)", "",
             f"Made by `python bench/sklearn_fit.py`: {results['rows']:,} rows of 20 features in "
             f"{results['bags']:,} random bags of 2..64, exact counts; {results['threads']} threads, torch "
             f"{results['torch']}.", "", "| fit | seconds | EM iterations | converged |", "|---|---:|---:|---|"]
    for name in ["default (in-sample E-step)", "cross-fitted, 5 folds"]:
        r = results[name]
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['n_iter']} | {r['converged']} |")
    lines += ["", f"One E-step (`posterior` on all rows): {results['one E-step (posterior on all rows), seconds']:.4f} s; "
              f"one supervised LogisticRegression fit: {results['one supervised LogisticRegression fit, seconds']:.2f} s."]
    with open(os.path.join(args.out, "sklearn_fit_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
