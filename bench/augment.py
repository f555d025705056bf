"""Input pipeline throughput: per-image torchvision augmentation against BatchAugment,
measured in the same run.

    python bench/augment.py [--out bench/results] [--data ../shared/data/cifar10_bird_cat_train.npz]
                            [--device cpu|cuda]

From a batch of instance indices to an augmented, normalised float batch on the
device: uint8 images (N, 3, 32, 32) held on the CPU as the trainer holds them
(CIFAR bird/cat where the file is present, random images of that shape
otherwise), batches of 64 and 256, one thread and all threads. "per-image" is
the trainer's former pipeline (torchvision v2 transforms, one call per image on
the CPU, then to the device); "batched" is mlellp_ext.app.augment.BatchAugment on
the whole batch, as the trainer's Preprocess runs it (uint8 to the device, the
op there); "none" indexes and normalises without augmentation. On CUDA each
timing ends with a synchronize. Writes augment_cpu.{json,md}, or
augment_<device name>.{json,md} on a GPU (make gpu-check).
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


def per_image(device):
    pipe = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                       v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])

    def run(x, index):
        batch = torch.stack([pipe(img) for img in x[index]]).to(device)
        return (batch.float() / 255.0 - 0.5) / 0.5
    return run


def batched(device):
    aug = BatchAugment()

    def run(x, index):
        return (aug(x[index].to(device)) - 0.5) / 0.5  # as the trainer's Preprocess: uint8 into the op
    return run


def none(device):
    return lambda x, index: (x[index].to(device).float() / 255.0 - 0.5) / 0.5


def throughput(fn, x, batch, device, seconds=1.0):
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(x, torch.randint(0, x.shape[0], (batch,), generator=gen))  # warm-up
    sync()
    times = []
    while sum(times) < seconds or len(times) < 3:
        index = torch.randint(0, x.shape[0], (batch,), generator=gen)
        t = time.perf_counter()
        fn(x, index)
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--data", default=DATA)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
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
            old = throughput(per_image(device), x, batch, device)
            new = throughput(batched(device), x, batch, device)
            plain = throughput(none(device), x, batch, device)
            rows.append({"threads": n_threads, "batch": batch, "per_image": old, "batched": new, "none": plain,
                         "speedup": new / old})
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"augment_{name}.json"), "w") as f:
        json.dump({"source": source, "torch": torch.__version__, "device": name, "rows": rows}, f, indent=1)
    lines = [f"# Augmentation throughput ({name})", "",
             f"Made by `python bench/augment.py --device {args.device}` on {source}, torch {torch.__version__}: "
             f"images/s from a batch of indices to an augmented, normalised float batch on {name} (median of "
             f"repeated batches; threads are the CPU's).", "",
             "| threads | batch | per-image (torchvision) | batched (BatchAugment) | speed-up | no augmentation |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['batch']} | {r['per_image']:,.0f} | {r['batched']:,.0f} | "
                     f"{r['speedup']:.1f}× | {r['none']:,.0f} |")
    with open(os.path.join(args.out, f"augment_{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
