"""GPU benchmark of the E-step (part of `make gpu-check`; needs a CUDA device).

    python bench/gpu_bench.py --out bench/results/gpu_<device>.json

For 1,000,000 bags of sizes 2..12, and for a few large bags, measures
torch.ops.mlellp.posterior against (a) the padded pure-PyTorch DP on the same
GPU and (b) a device-to-device copy of the same bytes (the op's bandwidth
floor: logits, offsets and counts read, phi and log-likelihood written).
Timings are CUDA-event medians after warm-up. Writes JSON and prints a table.
"""
import argparse
import json
import os
import statistics
import sys

import torch

import mlellp_ext
from mlellp_ext.reference import posterior_padded_dp

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_workload  # noqa: E402


def cuda_time(fn, repeats=10, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(name, logits, offsets, counts, with_dp=True):
    n_inst = logits.numel()
    phi, ll = torch.ops.mlellp.posterior(logits, offsets, counts)
    nbytes = (logits.numel() * logits.element_size() + offsets.numel() * 8 + counts.numel() * 8
              + phi.numel() * phi.element_size() + ll.numel() * ll.element_size())
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_ours = cuda_time(lambda: torch.ops.mlellp.posterior(logits, offsets, counts))
    t_copy = cuda_time(lambda: dst.copy_(src))
    row = {"case": name, "instances": n_inst, "bags": offsets.numel() - 1, "dtype": str(logits.dtype),
           "seconds": t_ours, "instances_per_s": n_inst / t_ours, "bytes": nbytes,
           "copy_seconds": t_copy, "fraction_of_copy_bandwidth": t_copy / t_ours}
    if with_dp:
        t_dp = cuda_time(lambda: posterior_padded_dp(logits, offsets, counts), repeats=3, warmup=1)
        ref_phi, _ = posterior_padded_dp(logits, offsets, counts)
        row.update(dp_seconds=t_dp, speedup_vs_padded_dp=t_dp / t_ours,
                   max_abs_diff_vs_dp=float((phi.float() - ref_phi.float()).abs().max()))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bags", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    rows = []
    for dtype in (torch.float32, torch.float64):
        rows.append(measure("1M bags 2..12", *make_workload(args.bags, device="cuda", dtype=dtype)))
    gen = torch.Generator().manual_seed(0)
    for n, num_bags in ((100, 10_000), (1_000, 100), (10_000, 2)):
        for frac in (0.5, 0.1):
            logits = (torch.randn(n * num_bags, generator=gen) * 2).cuda()
            offsets = (torch.arange(num_bags + 1) * n).cuda()
            counts = torch.full((num_bags,), int(n * frac), dtype=torch.long).cuda()
            rows.append(measure(f"{num_bags} bags of n={n}, y={frac}n", logits, offsets, counts, with_dp=n <= 1000))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device: {result['device']}, torch {result['torch']}")
    print(f"{'case':34s} {'dtype':14s} {'inst/s':>12s} {'vs copy':>8s} {'vs DP':>8s}")
    for r in rows:
        dp = f"{r['speedup_vs_padded_dp']:.1f}x" if "speedup_vs_padded_dp" in r else "-"
        print(f"{r['case']:34s} {r['dtype']:14s} {r['instances_per_s']:12.3e} {r['fraction_of_copy_bandwidth']:8.3f} {dp:>8s}")


if __name__ == "__main__":
    sys.exit(main())
