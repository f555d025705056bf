"""The E-step under uncertain counts (posterior_weighted) beside posterior, measured
in the same run (part of `make bench`).

    python bench/weighted.py [--out bench/results] [--bags 100000]

100,000 bags of 2..12 instances (uniform sizes), logits ~ N(0, 2^2), true counts
drawn from the logits; float64 and float32, one thread and all threads.
Workloads, each timed as one call over all bags:
  * posterior with the exact counts (the baseline of this table);
  * posterior_weighted with one-hot weights (the same result, through the
    weighted op's layout);
  * posterior_weighted with an interval of width 3 around the true count
    ([y - 1, y + 1] clipped to 0..n);
  * posterior_weighted with discrete Laplace noise at epsilon = 1 (the weights of a
    privatised count, whose support is the whole of 0..n).
Writes weighted_cpu.json and weighted_cpu.md (instances/s; ratio to posterior).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import mlellp_ext
from mlellp_ext import count_weights as cw


def timed(fn, *args, min_seconds=0.5, max_calls=20):
    fn(*args)  # warm-up
    times = []
    while len(times) < max_calls and (sum(times) < min_seconds or len(times) < 3):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--bags", type=int, default=100_000)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 13, (args.bags,), generator=gen)
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    logits = torch.randn(int(sizes.sum()), generator=gen, dtype=torch.float64) * 2
    bag = torch.repeat_interleave(torch.arange(args.bags), sizes)
    counts = torch.zeros(args.bags, dtype=torch.int64).index_add_(
        0, bag, torch.bernoulli(torch.sigmoid(logits), generator=gen).long())
    released = cw.privatize(counts, 1.0, generator=gen)
    weights = {"one-hot": cw.exact(counts, sizes),
               "interval, width 3": cw.interval((counts - 1).clamp(min=0), torch.minimum(counts + 1, sizes), sizes),
               "Laplace, epsilon 1": cw.laplace(released.double(), 1.0, sizes)}
    threads = torch.get_num_threads()
    rows = []
    for dtype in (torch.float64, torch.float32):
        z = logits.to(dtype)
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            base = timed(torch.ops.mlellp.posterior, z, offsets, counts)
            rows.append({"dtype": str(dtype).replace("torch.", ""), "threads": n_threads, "workload": "posterior",
                         "seconds": base, "instances_per_s": z.numel() / base, "ratio_to_posterior": 1.0})
            for name, w in weights.items():
                wt = w.to(dtype)
                s = timed(torch.ops.mlellp.posterior_weighted, z, offsets, wt)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "threads": n_threads,
                             "workload": f"posterior_weighted, {name}", "seconds": s,
                             "instances_per_s": z.numel() / s, "ratio_to_posterior": base / s})
                print(rows[-1], file=sys.stderr)
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    meta = {"bags": args.bags, "instances": int(sizes.sum()), "torch": torch.__version__, "threads": threads}
    with open(os.path.join(args.out, "weighted_cpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# posterior_weighted beside posterior (CPU)", "",
             f"Made by `python bench/weighted.py`: {args.bags:,} bags of 2..12 instances "
             f"({meta['instances']:,} instances), torch {torch.__version__}; each time the median of several "
             f"calls over all bags.", "",
             "| dtype | threads | workload | instances/s | posterior's time / this |",
             "|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['workload']} | {r['instances_per_s'] / 1e6:.1f} M | "
                     f"{r['ratio_to_posterior']:.2f} |")
    with open(os.path.join(args.out, "weighted_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
