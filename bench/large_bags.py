"""Cost of the E-step against bag size (part of `make bench`).

    python bench/large_bags.py [--out bench/results] [--max-n 100000]

One bag of n instances, n in {10, 100, 1,000, 10,000, 100,000}, with y = n/2
and y = n/10, logits ~ N(0, 4), float64 and float32: wall time of
torch.ops.mlellp.posterior (median of a few calls; one call for the largest)
and its peak extra memory (the workspace the kernel allocates, which it
computes exactly: p, q, checkpointed forward rows, one block of rows and two
backward rows). Writes large_bags.json, large_bags.md and large_bags.png.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import mlellp_ext  # noqa: F401


LANE_MAX_INSTANCES = 32  # kLaneMaxInstances in csrc/ops/bag_recursion.h


def workspace_bytes(n, y, itemsize):
    """Mirror of posterior_workspace() in csrc/ops/bag_recursion.h. (A bag of at
    most 32 instances runs in SIMD lanes instead, whose per-thread buffers are
    a fixed ~100 KB; the table marks those rows.)"""
    if n == 0:
        return 0
    w = min(y, n - y) + 1
    s = n if n <= 256 else next(k for k in range(int(n ** 0.5), n + 1) if k * k >= n)
    blocks = -(-n // s)
    return itemsize * (2 * n + (blocks + s) * w + 2 * w)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--max-n", type=int, default=100_000)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (10, 100, 1_000, 10_000, 100_000):
        if n > args.max_n:
            continue
        logits = torch.randn(n, generator=gen, dtype=torch.float64) * 2
        for frac in (0.5, 0.1):
            y = max(1, int(n * frac))
            for dtype in (torch.float64, torch.float32):
                z = logits.to(dtype)
                off, cnt = torch.tensor([0, n]), torch.tensor([y])
                repeats = 1 if n >= 100_000 else (3 if n >= 10_000 else 20)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    phi, ll = torch.ops.mlellp.posterior(z, off, cnt)
                    times.append(time.perf_counter() - t)
                rows.append({"n": n, "y": y, "dtype": str(dtype).replace("torch.", ""),
                             "seconds": statistics.median(times),
                             "workspace_bytes": workspace_bytes(n, y, z.element_size()),
                             "dense_table_bytes": z.element_size() * n * (min(y, n - y) + 1),
                             "log_likelihood": float(ll), "threads": torch.get_num_threads()})
                print(f"n={n:>7} y={y:>6} {rows[-1]['dtype']}: {rows[-1]['seconds']:.4f} s, "
                      f"workspace {rows[-1]['workspace_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "large_bags.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    lines = ["| n | y | dtype | seconds | peak extra memory | n·(W) table it avoids |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lanes = " (lanes)" if r["n"] <= LANE_MAX_INSTANCES else ""
        lines.append(f"| {r['n']:,} | {r['y']:,} | {r['dtype']} | {r['seconds']:.3g} | "
                     f"{r['workspace_bytes'] / 2**20:.2f} MiB{lanes} | {r['dense_table_bytes'] / 2**20:,.1f} MiB |")
    with open(os.path.join(args.out, "large_bags.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for frac, marker in ((0.5, "o"), (0.1, "s")):
        for dtype, ls in (("float64", "-"), ("float32", "--")):
            pts = [(r["n"], r["seconds"]) for r in rows if r["dtype"] == dtype and r["y"] == max(1, int(r["n"] * frac))]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], ls, marker=marker, label=f"y = n·{frac}, {dtype}")
    ax.set_xlabel("instances in the bag (n)")
    ax.set_ylabel("seconds per posterior call")
    ax.set_title(f"One bag, CPU, {torch.get_num_threads()} threads")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "large_bags.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
