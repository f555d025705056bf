"""Candidate small-bag CUDA kernels against the shipped op (part of `make gpu-check`; needs a CUDA device).

    python bench/cuda_variants.py --out bench/results/cuda_variants_<device>.json

JIT-builds bench/cuda_variants.cu (the same bag_recursion.h as the op) and, on
1,000,000 bags of sizes 2..12, times with CUDA events (median after warm-up):
  * op:         torch.ops.mlellp.posterior, everything included (checks, prefix sums, sync)
  * variant 0:  the op's small-bag kernel alone (workspace in global memory)
  * variant 1:  workspace in a per-thread array instead
  * variant 2:  variant 1 capped at 64 registers a thread
  * variant 3:  a warp per 32 bags, logits and phi staged through shared memory
                (csrc/ops/bag_group.h; coalesced loads and stores)
  * copy:       a device-to-device copy of the op's bytes (the floor)
Each variant's phi and log-likelihood must equal the op's bit for bit (same
arithmetic); a mismatch fails the run. The predictions these test are in
docs/gpu.md. Writes JSON and prints a table.
"""
import argparse
import json
import os
import sys
import tempfile

import torch
from torch.utils import cpp_extension

import mlellp_ext  # noqa: F401  (registers the ops)

sys.path.insert(0, os.path.dirname(__file__))
from workloads import make_workload  # noqa: E402
from gpu_bench import cuda_time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(build_dir=None):
    """JIT-build the variants for this GPU (or for TORCH_CUDA_ARCH_LIST where set: CI compiles them
    without a GPU, so that the harness keeps up with bag_recursion.h)."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "%d.%d" % torch.cuda.get_device_capability()
    return cpp_extension.load(
        name="mlellp_cuda_variants", sources=[os.path.join(ROOT, "bench", "cuda_variants.cu")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "ops")],
        extra_cuda_cflags=["-O3", "-lineinfo", "-fmad=false", "--expt-relaxed-constexpr", "-Xptxas=-v"],
        build_directory=build_dir or tempfile.mkdtemp(prefix="mlellp_variants_"), verbose=True)  # ptxas -v: registers, spills


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bags", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    ext = build()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    failures = []
    print(f"{'dtype':8s} {'what':10s} {'ms':>8s} {'inst/s':>10s} {'copy/this':>9s} bitwise")
    for dtype in (torch.float32, torch.float64):
        logits, offsets, counts = make_workload(args.bags, device="cuda", dtype=dtype)
        # The variants leave wide bags (rows of 64 or more) to the block kernel and do not write
        # them; with n <= 126 there are none, so every output is theirs to match.
        assert int((offsets[1:] - offsets[:-1]).max()) <= 126, "the variants cover small bags only"
        phi_ref, ll_ref = torch.ops.mlellp.posterior(logits, offsets, counts)
        need = ext.workspace_sizes(offsets, counts)
        ws_off = torch.cumsum(need, 0) - need
        ws = torch.empty(int(need.sum()), device="cuda", dtype=dtype)
        phi, ll = torch.empty_like(phi_ref), torch.empty_like(ll_ref)
        nbytes = (logits.numel() * logits.element_size() + offsets.numel() * 8 + counts.numel() * 8
                  + phi.numel() * phi.element_size() + ll.numel() * ll.element_size())
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = cuda_time(lambda: dst.copy_(src))
        timings = {"op": (cuda_time(lambda: torch.ops.mlellp.posterior(logits, offsets, counts)), None)}
        for v in (0, 1, 2, 3):
            phi.fill_(float("nan"))
            ll.fill_(float("nan"))
            ext.run_variant(v, logits, offsets, counts, ws_off, ws, phi, ll)
            same = bool(torch.equal(phi, phi_ref) and torch.equal(ll, ll_ref))
            if not same:
                failures.append(f"variant {v} {dtype}")
            timings[f"variant {v}"] = (cuda_time(lambda v=v: ext.run_variant(v, logits, offsets, counts, ws_off, ws,
                                                                             phi, ll)), same)
        for what, (seconds, same) in timings.items():
            row = {"dtype": str(dtype).replace("torch.", ""), "what": what, "seconds": seconds,
                   "instances_per_s": logits.numel() / seconds, "copy_seconds": t_copy,
                   "fraction_of_copy_bandwidth": t_copy / seconds, "bitwise_equal_to_op": same}
            result["rows"].append(row)
            print(f"{row['dtype']:8s} {what:10s} {seconds * 1e3:8.3f} {row['instances_per_s']:10.3e} "
                  f"{row['fraction_of_copy_bandwidth']:9.3f} {'-' if same is None else same}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if failures:
        print("not bitwise equal to the op: " + ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
