"""Hyper-parameters of a method chosen on a validation split of training bags only.

The images of the training bags of the reproduction's split (CIFAR-10 bird/cat,
1,000 bags of 2..12, seed 0) are written to a file of their own; each grid point
trains on 80% of new random bags of that file and is scored on the other 20%, so
no test instance of the split is seen. The score of a grid point is the mean
validation accuracy of its last three epochs. Run from the project root:

    python experiments/reproduction/tune.py --method dllp --out runs/tune-dllp [--epochs 12 --width 0.5]
    python experiments/reproduction/tune.py --method llpgan --out runs/tune-llpgan --width 0.25

writes OUT/tuning.csv (one row per grid point) and prints it; the runs stay under OUT.
"""
import argparse
import csv
import itertools
import os

import numpy as np

from mlellp_ext.app.train import TrainConfig, load_data, train

# Each method's grid: the options it is most sensitive to. LLP-GAN's is the weight of
# its real/fake terms (the proportion loss is DLLP's, whose lr and batch size are tuned).
GRIDS = {"dllp": {"lr": (3e-4, 1e-3), "batch_size": (64, 256)},
         "llpgan": {"gan_weight": (1.0, 0.3, 0.1)}}


def training_images(data_root, num_bags, out):
    """The training bags' images of the reproduction's split, as an npz of their own."""
    path = os.path.join(out, "train_only.npz")
    if not os.path.exists(path):
        data = load_data(TrainConfig(out=out, dataset="npz", data_root=data_root, num_bags=num_bags, seed=0))
        index = data.train.index.numpy()
        np.savez(path, x=data.data.x[index].permute(0, 2, 3, 1).numpy(), y=data.data.y[index].numpy())
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=tuple(GRIDS))
    p.add_argument("--data-root", default="../shared/data/cifar10_bird_cat_train.npz")
    p.add_argument("--num-bags", type=int, default=1000, help="bags of the split whose training images are used")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    data = training_images(a.data_root, a.num_bags, a.out)
    rows = []
    grid = GRIDS[a.method]
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        name = "-".join(f"{k}{v}" for k, v in point.items())
        history = train(TrainConfig(out=os.path.join(a.out, name), dataset="npz", data_root=data, method=a.method,
                                    width=a.width, epochs=a.epochs, tol=0.0, seed=1, quiet=True, **point))
        last = [r["test_accuracy"] for r in history[-3:]]
        rows.append({**point, "validation_accuracy": sum(last) / len(last),
                     "curve": " ".join(f"{r['test_accuracy']:.3f}" for r in history)})
        print(rows[-1], flush=True)
        with open(os.path.join(a.out, "tuning.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
