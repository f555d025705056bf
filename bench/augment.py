"""Input pipeline throughput: per-image torchvision augmentation against BatchAugment,
measured in the same run.

    python bench/augment.py [--out bench/results] [--data ../shared/data/cifar10_bird_cat_train.npz]

From a batch of instance indices to an augmented, normalised float batch on the
device (this CPU): uint8 images (N, 3, 32, 32) (CIFAR bird/cat where the file is
present, random images of that shape otherwise), batches of 64 and 256, one
thread and all threads. "per-image" is the pipeline of the trainer's
Preprocess (torchvision v2 transforms, one call per image); "batched" is
mlellp_ext.app.augment.BatchAugment on the whole batch; "none" indexes and
normalises without augmentation. Writes augment_cpu.json and augment_cpu.md.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torchvision.transforms import v2

from mlellp_ext.app.augment import BatchAugment

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_bird_cat_train.npz")


def per_image():
    pipe = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                       v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])

    def run(x, index):
        batch = torch.stack([pipe(img) for img in x[index]])
        return (batch.float() / 255.0 - 0.5) / 0.5
    return run


def batched():
    aug = BatchAugment()

    def run(x, index):
        return (aug(x[index]) - 0.5) / 0.5  # as the trainer's Preprocess: uint8 into the op
    return run


def none():
    return lambda x, index: (x[index].float() / 255.0 - 0.5) / 0.5


def throughput(fn, x, batch, seconds=1.0):
    gen = torch.Generator().manual_seed(0)
    fn(x, torch.randint(0, x.shape[0], (batch,), generator=gen))  # warm-up
    times = []
    while sum(times) < seconds or len(times) < 3:
        index = torch.randint(0, x.shape[0], (batch,), generator=gen)
        t = time.perf_counter()
        fn(x, index)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--data", default=DATA)
    args = p.parse_args(argv)
    if os.path.exists(args.data):
        with np.load(args.data) as f:
            x = torch.from_numpy(np.ascontiguousarray(f["x"].transpose(0, 3, 1, 2)))
        source = os.path.basename(args.data)
    else:
        x = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8)
        source = "random uint8 images (the CIFAR file is absent)"
    threads = torch.get_num_threads()
    rows = []
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for batch in (64, 256):
            old = throughput(per_image(), x, batch)
            new = throughput(batched(), x, batch)
            plain = throughput(none(), x, batch)
            rows.append({"threads": n_threads, "batch": batch, "per_image": old, "batched": new, "none": plain,
                         "speedup": new / old})
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "augment_cpu.json"), "w") as f:
        json.dump({"source": source, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = ["# Augmentation throughput (CPU)", "",
             f"Made by `python bench/augment.py` on {source}, torch {torch.__version__}: images/s from a batch "
             f"of indices to an augmented, normalised float batch (median of repeated batches).", "",
             "| threads | batch | per-image (torchvision) | batched (BatchAugment) | speed-up | no augmentation |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['batch']} | {r['per_image']:,.0f} | {r['batched']:,.0f} | "
                     f"{r['speedup']:.1f}× | {r['none']:,.0f} |")
    with open(os.path.join(args.out, "augment_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
