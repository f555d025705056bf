"""`mlellp reproduce`: the seed paper's CIFAR-10 experiments, from real data.

    mlellp reproduce --data-root ../shared/data/cifar10_bird_cat_train.npz --profile cpu

Three experiments, each writing ``<name>.csv`` (every run's numbers),
``<name>.png`` and ``<name>.md`` to --out (default docs/experiments/reproduction/):
  curves  test accuracy against epoch for supervised, DLLP, LLP-GAN and
          MLE-LLP; mean and standard deviation over repetitions, each a fresh
          random 80/20 split of the bags (seed = repetition); sizes 2..12.
  bags    final test accuracy against the number of training bags m, with a
          test set of 250 bags.
  timing  mean epoch duration per method (MLE-LLP split into E-step,
          inference pass and M-step) from runs of its own, one method at a
          time (so run it with nothing else on the machine); and epochs to
          reach 99% of the method's final accuracy on the mean curve.
With all three done, ``claims.md``/``claims.csv`` set each claim of the seed
paper beside the measurement and a verdict by rules fixed in this module
(:func:`claims`).
A profile only sets numbers (repetitions, epochs, width, bag counts); both run
the same code. Every training run keeps its files under --work; a finished
run (model.pt present) is read back instead of being trained again, and an
interrupted one resumes from its checkpoint, so re-running the command after
an interruption redoes nothing that finished.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass

from .claims import LABELS, claims, mean_std
from .config import TrainConfig
from .data import DataError
from .train import train

METHODS = ("supervised", "dllp", "llpgan", "mle")
EXPERIMENTS = ("curves", "bags", "timing", "claims")


@dataclass
class Profile:
    repetitions: int
    epochs: int
    width: float
    curves_bags: int | None          # bags in the curves experiment (None: all that fit)
    bag_counts: tuple[int, ...]      # training bags m in the bags experiment
    bags_repetitions: int
    bags_epochs: int
    test_bags: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    timing_epochs: int = 3          # epochs of each method's timing run (the first is not counted)


PROFILES = {
    # Sized for a 2-core CPU: about an hour with curves and bags as two one-thread
    # processes at once (OMP_NUM_THREADS=1), then timing alone for a few minutes. 15 epochs let every method's
    # mean curve flatten (claim c); five repetitions give the standard deviations of
    # claim g some meaning; the bags experiment spans m = 200..1000 (claim f).
    "cpu": Profile(repetitions=5, epochs=15, width=0.25, curves_bags=600, bag_counts=(200, 400, 600, 800, 1000),
                   bags_repetitions=1, bags_epochs=10),
    # The seed paper's protocol (for a GPU): 10 repetitions, full-width backbone, all 10,000 images.
    "paper": Profile(repetitions=10, epochs=100, width=1.0, curves_bags=None,
                     bag_counts=(200, 400, 600, 800, 1000), bags_repetitions=10, bags_epochs=100),
}


def _data_options(args):
    dataset = "npz" if os.path.isfile(args.data_root) else "cifar10"
    return dict(dataset=dataset, data_root=args.data_root, classes=args.classes, bag_size="2:12")


def _run(args, profile, work, method, seed, **overrides):
    """Train one configuration (or read it back if it already finished); returns its history."""
    out = os.path.join(args.work, work)
    cfg = TrainConfig(out=out, method=method, backbone="cnn", width=profile.width, epochs=profile.epochs,
                      batch_size=profile.batch_size, lr=profile.lr, seed=seed, device=args.device,
                      quiet=True, tol=0.0, **_data_options(args))
    cfg = dataclasses.replace(cfg, **overrides)
    if os.path.exists(os.path.join(out, "model.pt")):
        return _read_metrics(os.path.join(out, "metrics.csv"))
    resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
    return train(dataclasses.replace(cfg, resume=resume))


def _value(text):
    if text in ("", None):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _read_metrics(path):
    """Rows of a CSV written by train() or by this module, numbers as floats."""
    with open(path) as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not sys.stderr.isatty())


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_plot(plt, fig, ax, path, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- experiments
def run_curves(args, profile):
    rows = []
    bar = _progress(profile.repetitions * len(args.methods), "curves")
    for rep in range(profile.repetitions):
        for method in args.methods:
            history = _run(args, profile, f"curves/{method}/rep{rep}", method, seed=rep,
                           num_bags=profile.curves_bags)
            for r in history:
                rows.append({"method": method, "repetition": rep, "epoch": int(r["epoch"]),
                             "test_accuracy": r["test_accuracy"], "test_auc": r["test_auc"], "L": r["L"],
                             "epoch_seconds": r["epoch_seconds"], "e_step_seconds": r["e_step_seconds"],
                             "inference_seconds": r["inference_seconds"], "m_step_seconds": r["m_step_seconds"]})
            bar.update(1)
    bar.close()
    _write_csv(os.path.join(args.out, "curves.csv"), rows)

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines = ["| method | final test accuracy (mean ± sd) | repetitions | epochs |", "|---|---:|---:|---:|"]
    for method in args.methods:
        epochs, mean, sd = mean_curve(rows, method)
        ax.plot(epochs, mean, label=LABELS[method])
        ax.fill_between(epochs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
        lines.append(f"| {LABELS[method]} | {mean[-1]:.4f} ± {sd[-1]:.4f} | {profile.repetitions} | {epochs[-1]} |")
    _finish_plot(plt, fig, ax, os.path.join(args.out, "curves.png"), "epoch", "test instance accuracy",
                 "CIFAR-10 bird vs cat, bags of 2..12")
    _write_md(args, "curves", lines, profile)
    return rows


def run_bags(args, profile):
    rows = []
    bar = _progress(len(profile.bag_counts) * profile.bags_repetitions * len(args.methods), "bags")
    for m in profile.bag_counts:
        for rep in range(profile.bags_repetitions):
            for method in args.methods:
                total = m + profile.test_bags
                history = _run(args, profile, f"bags/m{m}/{method}/rep{rep}", method, seed=rep,
                               num_bags=total, test_fraction=profile.test_bags / total, epochs=profile.bags_epochs)
                rows.append({"method": method, "train_bags": m, "test_bags": profile.test_bags, "repetition": rep,
                             "epochs": len(history), "test_accuracy": history[-1]["test_accuracy"],
                             "test_auc": history[-1]["test_auc"]})
                bar.update(1)
    bar.close()
    _write_csv(os.path.join(args.out, "bags.csv"), rows)

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    header = "| method | " + " | ".join(f"m = {m}" for m in profile.bag_counts) + " |"
    lines = [header, "|---|" + "---:|" * len(profile.bag_counts)]
    for method in args.methods:
        stats = [mean_std([r["test_accuracy"] for r in rows if r["method"] == method and r["train_bags"] == m])
                 for m in profile.bag_counts]
        ax.errorbar(profile.bag_counts, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                    capsize=3, label=LABELS[method])
        lines.append(f"| {LABELS[method]} | " + " | ".join(f"{mu:.4f}" for mu, _ in stats) + " |")
    _finish_plot(plt, fig, ax, os.path.join(args.out, "bags.png"), "number of training bags m",
                 "final test instance accuracy", f"CIFAR-10 bird vs cat, {profile.test_bags} test bags")
    _write_md(args, "bags", lines, profile)
    return rows


def epochs_to_fraction(accuracies, fraction=0.99):
    """First epoch (1-based) whose accuracy reaches `fraction` of the final one."""
    target = fraction * accuracies[-1]
    return next(i + 1 for i, a in enumerate(accuracies) if a >= target)


def mean_curve(rows, method):
    """(epochs, mean accuracy, sd) of a method's test accuracy over repetitions, per epoch."""
    mine = [r for r in rows if r["method"] == method]
    epochs = sorted({int(r["epoch"]) for r in mine})
    stats = [mean_std([r["test_accuracy"] for r in mine if int(r["epoch"]) == e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _curves_rows(args, profile, curves_rows):
    if curves_rows is not None:
        return curves_rows
    path = os.path.join(args.out, "curves.csv")
    return _read_metrics(path) if os.path.exists(path) else run_curves(args, profile)


def run_timing(args, profile, curves_rows=None):
    """Epoch durations from one run per method of its own, trained one at a time (the
    curves' runs are not used: there, other jobs may share the machine); the first
    epoch (warm-up) is not counted. Epochs to 99% come from the curves."""
    curves_rows = _curves_rows(args, profile, curves_rows)
    rows = []
    bar = _progress(len(args.methods), "timing")
    for method in args.methods:
        history = _run(args, profile, f"timing/{method}", method, seed=0, num_bags=profile.curves_bags,
                       epochs=profile.timing_epochs)
        bar.update(1)
        counted = history[1:] or history
        mean = lambda key: (statistics.fmean(r[key] for r in counted)  # noqa: E731
                            if method == "mle" or key == "epoch_seconds" else None)
        rows.append({"method": method, "epochs_timed": len(counted), "epoch_seconds": mean("epoch_seconds"),
                     "e_step_seconds": mean("e_step_seconds"), "inference_seconds": mean("inference_seconds"),
                     "m_step_seconds": mean("m_step_seconds"),
                     "epochs_to_99pct": epochs_to_fraction(mean_curve(curves_rows, method)[1])})
    bar.close()
    _write_csv(os.path.join(args.out, "timing.csv"), [{k: ("" if v is None else v) for k, v in r.items()} for r in rows])

    fmt = lambda v, d=3: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| method | epoch (s) | E-step (s) | inference pass (s) | M-step (s) | E-step share | "
             "epochs to 99% of final (mean curve) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = "" if r["e_step_seconds"] is None else f"{100 * r['e_step_seconds'] / r['epoch_seconds']:.3f}%"
        lines.append(f"| {LABELS[r['method']]} | {fmt(r['epoch_seconds'], 2)} | {fmt(r['e_step_seconds'], 4)} | "
                     f"{fmt(r['inference_seconds'], 2)} | {fmt(r['m_step_seconds'], 2)} | {share} | "
                     f"{r['epochs_to_99pct']} |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [LABELS[r["method"]] for r in rows]
    bottoms = [0.0] * len(rows)
    for key, label in (("m_step_seconds", "M-step / training pass"), ("inference_seconds", "inference pass (E-step input)"),
                       ("e_step_seconds", "E-step (posterior op)")):
        vals = [(r[key] if r[key] is not None else (r["epoch_seconds"] if key == "m_step_seconds" else 0.0))
                for r in rows]
        ax.bar(names, vals, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("seconds per epoch")
    ax.set_title("Mean epoch duration, each method alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "timing.png"), dpi=110)
    plt.close(fig)
    _write_md(args, "timing", lines, profile)
    return rows


def run_claims(args, profile, curves_rows=None, bags_rows=None, timing_rows=None):
    read = lambda name, rows: rows if rows is not None else _read_metrics(os.path.join(args.out, f"{name}.csv"))  # noqa: E731
    for name in ("curves", "bags", "timing"):
        if not os.path.exists(os.path.join(args.out, f"{name}.csv")):
            raise DataError(f"--experiment claims needs {name}.csv in {args.out}: run --experiment {name} first")
    rows = claims(read("curves", curves_rows), read("bags", bags_rows), read("timing", timing_rows), args.methods)
    _write_csv(os.path.join(args.out, "claims.csv"), rows)
    lines = ["| | the seed paper | measured here | verdict |", "|---|---|---|---|"]
    lines += [f"| ({r['claim']}) | {r['seed paper']} | {r['measured']} | {r['verdict']} |" for r in rows]
    _write_md(args, "claims", lines, profile, plot=False)
    return rows


def _write_md(args, name, lines, profile, plot=True):
    command = " ".join(["mlellp reproduce", "--experiment", name, "--profile", args.profile,
                        "--data-root", os.path.basename(args.data_root)])
    text = [f"# {name}", "", f"Made by `{command}` (profile: {dataclasses.asdict(profile)}).", ""]
    text += [f"![{name}]({name}.png)", ""] if plot else []
    text += lines
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(text) + "\n")


# ----------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--experiment", choices=EXPERIMENTS + ("all",), default="all")
    p.add_argument("--profile", choices=tuple(PROFILES), default="cpu")
    p.add_argument("--data-root", required=True, help="CIFAR-10 bird/cat .npz, or a torchvision CIFAR-10 folder")
    p.add_argument("--classes", default=None, help="two classes A,B where the data have more (a CIFAR-10 folder needs them, e.g. bird,cat); "
                        "the seed paper's experiments are binary")
    p.add_argument("--out", default=os.path.join("docs", "experiments", "reproduction"), help="CSV, PNG and Markdown go here")
    p.add_argument("--work", default=os.path.join("runs", "reproduce"), help="the training runs go here")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--device", default="auto")
    # Overrides of the profile's numbers (e.g. for a quick check).
    for field in dataclasses.fields(Profile):
        kind = int if field.type in ("int", "int | None") else float if field.type == "float" else str
        p.add_argument("--" + field.name.replace("_", "-"), dest="override_" + field.name, type=kind, default=None,
                       help=argparse.SUPPRESS)


def run(args):
    profile = PROFILES[args.profile]
    for field in dataclasses.fields(Profile):
        value = getattr(args, "override_" + field.name, None)
        if value is not None:
            if field.name == "bag_counts":
                value = tuple(int(v) for v in str(value).split(","))
            profile = dataclasses.replace(profile, **{field.name: value})
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise DataError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.classes is not None and (args.classes.strip().lower() == "all" or len(args.classes.split(",")) != 2):
        raise DataError(f"--classes must name two classes A,B (the seed paper's experiments are binary), "
                        f"got {args.classes!r}")
    if not os.path.exists(args.data_root):  # else a missing .npz would be taken for a CIFAR-10 folder
        raise DataError(f"--data-root {args.data_root}: no such file or folder")
    os.makedirs(args.out, exist_ok=True)
    curves_rows = bags_rows = timing_rows = None
    if args.experiment in ("curves", "all"):
        curves_rows = run_curves(args, profile)
    if args.experiment in ("bags", "all"):
        bags_rows = run_bags(args, profile)
    if args.experiment in ("timing", "all"):
        timing_rows = run_timing(args, profile, curves_rows)
    if args.experiment in ("claims", "all"):
        run_claims(args, profile, curves_rows, bags_rows, timing_rows)
    print(f"results in {args.out}", file=sys.stderr)
