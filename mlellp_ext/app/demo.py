"""`make run`: MLE-LLP and the supervised baseline on scikit-learn's bundled digits.

    python -m mlellp_ext.app.demo [--out runs/demo] [--epochs 40]

Binary task digit >= 5; bags of uniform sizes 2..12; 80/20 split of the bags.
MLE-LLP sees only each bag's count of positives, the supervised baseline sees
every instance label; both use the same cnn backbone, optimiser and split.
Prints both test accuracies and writes each run's files under --out.
"""
import argparse
import os
import sys

from .config import TrainConfig
from .outputs import summary_table
from .train import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "demo"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    common = dict(dataset="digits", backbone="cnn", width=0.5, epochs=args.epochs, batch_size=32, lr=2e-3,
                  seed=0, quiet=args.quiet)
    runs = []
    for method in ("mle", "supervised"):
        history = train(TrainConfig(out=os.path.join(args.out, method), method=method, **common))
        runs.append((method, history))
    print(summary_table(runs))
    for method, history in runs:
        print(f"{method} test accuracy: {history[-1]['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
