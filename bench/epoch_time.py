"""Epoch time of the seed's CIFAR protocol, per method: with the per-image augmentation
pipeline (before) and with BatchAugment (now), measured in the same run.

    python bench/epoch_time.py [--out bench/results] [--device cpu|cuda] [--amp off|bf16|fp16]
                               [--epochs 2] [--methods mle,dllp,supervised,llpgan]

CIFAR-10 bird vs cat (``../shared/data/cifar10_bird_cat_train.npz``; random
images of that shape where the file is absent), 1,000 bags of 2..12 (800 train),
``cnn`` width 0.5 on the CPU (the seed's width 1 on a GPU), batch 64. Each method
trains ``--epochs`` epochs per variant; the time is the mean epoch after the first
(warm-up), from the trainer's own ``epoch_seconds``. On a GPU (``make gpu-check``)
it adds ``--amp`` and the device to the file name, for comparison with the seed's
Table 1 (7.3 s supervised, 11.1 s MLE-LLP per epoch on an RTX 2080 Ti). Writes
epoch_time_<device>.json and .md.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

import mlellp_ext.app.train as train_module
from mlellp_ext.app import batches as batches_module
from mlellp_ext.app.train import TrainConfig, train

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_bird_cat_train.npz")


class PerImagePreprocess(batches_module.Preprocess):
    """The augmentation before BatchAugment: torchvision's pipeline, one call per image."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchvision.transforms import v2

        self.per_image = v2.Compose([v2.RandomHorizontalFlip(),
                                     v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                                     v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])

    def augment_batch(self, x):
        return (torch.stack([self.per_image(img) for img in x]).float() / 255.0).to(self.device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--data", default=DATA)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="off")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--methods", default="mle,dllp,supervised,llpgan")
    args = p.parse_args(argv)
    data = args.data
    scratch = tempfile.mkdtemp()
    if not os.path.exists(data):  # the shape of the protocol's data, random pixels
        rng = np.random.default_rng(0)
        data = os.path.join(scratch, "random.npz")
        np.savez(data, x=rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 2, 10_000))
    width = 1.0 if args.device.startswith("cuda") else 0.5
    rows = []
    for method in args.methods.split(","):
        for variant, cls in (("per-image", PerImagePreprocess), ("batched", batches_module.Preprocess)):
            train_module.Preprocess = cls  # the trainer builds its Preprocess by this name
            try:
                history = train(TrainConfig(out=os.path.join(scratch, f"{method}-{variant}"), dataset="npz",
                                            data_root=data, num_bags=1000, method=method, width=width,
                                            epochs=args.epochs, batch_size=64, tol=0.0, quiet=True,
                                            device=args.device, amp=args.amp))
            finally:
                train_module.Preprocess = batches_module.Preprocess
            timed = history[1:] or history
            rows.append({"method": method, "augmentation": variant,
                         "epoch_seconds": statistics.fmean(r["epoch_seconds"] for r in timed)})
            print(rows[-1], file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name().replace(" ", "_") if args.device.startswith("cuda") else "cpu"
    name = f"epoch_time_{device}" + ("" if args.amp == "off" else f"_{args.amp}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": device, "amp": args.amp, "width": width, "threads": torch.get_num_threads(),
            "data": os.path.basename(data), "torch": torch.__version__, "epochs": args.epochs}
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Epoch time, CIFAR bird/cat, 1,000 bags ({device})", "",
             f"Made by `python bench/epoch_time.py --device {args.device} --amp {args.amp}`: `cnn` width {width}, "
             f"batch 64, {torch.get_num_threads()} threads, mean of epochs 2..{args.epochs}; data "
             f"{meta['data']}.", "", "| method | per-image augmentation (s) | BatchAugment (s) | ratio |",
             "|---|---:|---:|---:|"]
    for method in args.methods.split(","):
        old = next(r["epoch_seconds"] for r in rows if r["method"] == method and r["augmentation"] == "per-image")
        new = next(r["epoch_seconds"] for r in rows if r["method"] == method and r["augmentation"] == "batched")
        lines.append(f"| {method} | {old:.1f} | {new:.1f} | {old / new:.2f}× |")
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
