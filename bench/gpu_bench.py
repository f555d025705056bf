"""GPU benchmark of the E-step (part of `make gpu-check`; needs a CUDA device).

    python bench/gpu_bench.py --out bench/results/gpu_<device>.json
    python bench/gpu_bench.py --markdown-from bench/results/gpu_<device>.json   # table only, no GPU

For 1,000,000 bags of sizes 2..12, and for a few large bags, measures
torch.ops.mlellp.posterior against (a) the padded pure-PyTorch DP on the same
GPU and (b) a device-to-device copy of the same bytes (the op's bandwidth
floor: logits, offsets and counts read, phi and log-likelihood written).
torch.ops.mlellp.phi_jvp is measured on the same small bags against autograd's
second derivatives through the padded DP (phi_jvp_padded_dp).
Timings are CUDA-event medians after warm-up. Writes JSON and a Markdown table
beside it (same name, .md) and prints the table.
"""
import argparse
import json
import os
import statistics
import sys

import torch

import mlellp_ext
from mlellp_ext.reference import phi_jvp_padded_dp, posterior_padded_dp

sys.path.insert(0, os.path.dirname(__file__))
from workloads import make_workload  # noqa: E402


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


def measure_phi_jvp(name, logits, offsets, counts):
    tangent = torch.randn(logits.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda",
                          dtype=logits.dtype)
    out = torch.ops.mlellp.phi_jvp(tangent, logits, offsets, counts)
    t_ours = cuda_time(lambda: torch.ops.mlellp.phi_jvp(tangent, logits, offsets, counts))
    t_dp = cuda_time(lambda: phi_jvp_padded_dp(tangent, logits, offsets, counts), repeats=3, warmup=1)
    ref = phi_jvp_padded_dp(tangent, logits, offsets, counts)
    n_inst = logits.numel()
    return {"case": f"phi_jvp {name}", "instances": n_inst, "bags": offsets.numel() - 1, "dtype": str(logits.dtype),
            "seconds": t_ours, "instances_per_s": n_inst / t_ours, "dp_seconds": t_dp,
            "speedup_vs_padded_dp": t_dp / t_ours, "max_abs_diff_vs_dp": float((out - ref).abs().max())}


def profile(fn, calls=5):
    """Where one call's device time goes: each kernel's and copy's total over `calls` calls, per call
    (the op launches a validation pass, prefix sums, a sync and the bag kernels)."""
    try:
        from torch.profiler import ProfilerActivity
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", None)
            if dev is None:
                dev = getattr(e, "self_cuda_time_total", 0)
            if dev > 0:
                rows.append({"name": e.key[:90], "device_us_per_call": dev / calls, "count_per_call": e.count / calls})
        rows.sort(key=lambda r: -r["device_us_per_call"])
        device_us = sum(r["device_us_per_call"] for r in rows)
        print(f"profile of one call ({device_us:.0f} us of device time, summed over its kernels and copies):")
        for r in rows[:12]:
            print(f"  {r['device_us_per_call']:9.1f} us  x{r['count_per_call']:.0f}  {r['name']}")
        return rows
    except Exception as err:  # a profiler problem must not cost the benchmark
        print(f"profile skipped: {err}")
        return [{"error": str(err)}]


def markdown(result):
    """The results as a Markdown table; 'vs copy' is the copy's time over the op's (1 = at the bandwidth floor)."""
    lines = [f"GPU benchmark on {result['device']}, torch {result['torch']} (`bench/gpu_bench.py`; "
             "CUDA-event medians; the baselines measured in the same run).", "",
             "| case | dtype | instances/s | vs padded DP | vs copy of the same bytes | max abs diff vs DP |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        dp = f"{r['speedup_vs_padded_dp']:.1f}x" if "speedup_vs_padded_dp" in r else "-"
        copy = f"{r['fraction_of_copy_bandwidth']:.3f}" if "fraction_of_copy_bandwidth" in r else "-"
        diff = f"{r['max_abs_diff_vs_dp']:.1e}" if "max_abs_diff_vs_dp" in r else "-"
        lines.append(f"| {r['case']} | {r['dtype'].replace('torch.', '')} | {r['instances_per_s']:.3g} | {dp} | {copy} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--bags", type=int, default=1_000_000)
    parser.add_argument("--markdown-from", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown(json.load(f)), end="")
        return 0
    if not args.out:
        parser.error("--out is required (or --markdown-from)")
    assert torch.cuda.is_available(), "needs a CUDA device"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print(f"device: {result['device']}, torch {result['torch']}")
    print(f"{'case':42s} {'dtype':14s} {'inst/s':>12s} {'vs copy':>8s} {'vs DP':>8s}", flush=True)

    def add(row):  # printed and saved as it comes, so a cut-off run keeps what it measured
        result["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(result))
        dp = f"{row['speedup_vs_padded_dp']:.1f}x" if "speedup_vs_padded_dp" in row else "-"
        copy = f"{row['fraction_of_copy_bandwidth']:.3f}" if "fraction_of_copy_bandwidth" in row else "-"
        print(f"{row['case']:42s} {row['dtype']:14s} {row['instances_per_s']:12.3e} {copy:>8s} {dp:>8s}", flush=True)

    for dtype in (torch.float32, torch.float64):
        add(measure("1M bags 2..12", *make_workload(args.bags, device="cuda", dtype=dtype)))
    small = make_workload(args.bags, device="cuda", dtype=torch.float32)
    result["profile_posterior_1M_float32"] = profile(lambda: torch.ops.mlellp.posterior(*small))
    del small
    for dtype in (torch.float32, torch.float64):
        add(measure_phi_jvp("1M bags 2..12", *make_workload(args.bags, device="cuda", dtype=dtype)))
    gen = torch.Generator().manual_seed(0)
    for n, num_bags in ((100, 10_000), (1_000, 100), (10_000, 2)):
        for frac in (0.5, 0.1):
            logits = (torch.randn(n * num_bags, generator=gen) * 2).cuda()
            offsets = (torch.arange(num_bags + 1) * n).cuda()
            counts = torch.full((num_bags,), int(n * frac), dtype=torch.long).cuda()
            add(measure(f"{num_bags} bags of n={n}, y={frac}n", logits, offsets, counts, with_dp=n <= 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
