"""Every op on the GPU beside the same op on this machine's CPU threads, in one run
(`make gpu-check`'s benchmark step; the acceptance figures of the GPU kernels).

    python bench/gpu_summary.py --out bench/results/gpu_summary_<device>.json
    python bench/gpu_summary.py --device cpu --scale 0.001 --out /tmp/s.json   # a dry run without a GPU

For each workload: the op's instances/s on --device (CUDA-event medians after
warm-up), the same op on the same inputs on the CPU with all its threads (the
ratio GPU / CPU), and the fraction of copy bandwidth: the time of a device copy
of the op's bytes (inputs read, outputs written) over the op's time (1 = at the
bandwidth floor). Workloads (bags of 2..12 are bench/workloads.py's):

  posterior            1M bags of 2..12, float32 and float64
  posterior_weighted   the same bags, Laplace weights at epsilon = 1 (float32)
  log_pmf, phi_jvp     the same bags (float32)
  posterior_multiclass C = 10, 20,000 bags of 16; C = 4, 200,000 bags of 2..12;
                       C = 3, 20,000 bags of 32 (float32, counts of random labels)
  augment_images       16,384 uint8 images 3x32x32, every operation on

The JSON is written after each row, so a run cut short keeps what it measured;
each row also carries the figure the GPU issue asks of it, where there is one.
--scale shrinks every workload (for a quick check; the figures need 1).
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

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import cuda_time  # noqa: E402
from workloads import make_workload  # noqa: E402

# What the GPU issue asks of each workload: instances/s, ratio to the CPU threads,
# fraction of copy bandwidth (None: no figure asked).
TARGETS = {
    "posterior, bags of 2..12, float32": {"fraction_of_copy_bandwidth": 0.25},
    "posterior_weighted, Laplace eps 1, bags of 2..12, float32": {"instances_per_s": 1e9},
    "posterior_multiclass, C = 10, bags of 16, float32": {"instances_per_s": 3e7, "ratio_to_cpu_threads": 30.0},
}


def timer(device):
    """fn -> median seconds of a call (CUDA events on a GPU, wall clock on the CPU)."""
    def on_cpu(fn, repeats=5, warmup=1):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return cuda_time if torch.device(device).type == "cuda" else on_cpu


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def copy_seconds(device, total, time_fn):
    src = torch.empty(max(total // 2, 1), dtype=torch.uint8, device=device)  # read + write = total bytes
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src))


def run_case(name, op, inputs, units, device, results, write):
    """Time op(*inputs) on `device` and on the CPU; units = instances (or images) per call."""
    on_device = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
    on_cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs]
    time_dev, time_cpu = timer(device), timer("cpu")
    out = op(*on_device)
    outs = out if isinstance(out, tuple) else (out,)
    total = nbytes(on_device) + nbytes(outs)
    t_dev = time_dev(lambda: op(*on_device))
    t_cpu = time_cpu(lambda: op(*on_cpu))
    t_copy = copy_seconds(device, total, time_dev)
    row = {"case": name, "units": units, "instances_per_s": units / t_dev, "seconds": t_dev,
           "cpu_instances_per_s": units / t_cpu, "cpu_threads": torch.get_num_threads(),
           "ratio_to_cpu_threads": t_cpu / t_dev, "bytes": total, "copy_seconds": t_copy,
           "fraction_of_copy_bandwidth": t_copy / t_dev}
    want = TARGETS.get(name)
    if want:
        row["asked"] = want
        row["meets"] = all(row[k] >= v for k, v in want.items())
    results["rows"].append(row)
    write()
    print(f"{name:62s} {row['instances_per_s']:10.3e}/s  x{row['ratio_to_cpu_threads']:7.2f} CPU  "
          f"{row['fraction_of_copy_bandwidth']:.4f} of copy", flush=True)


def multiclass_workload(num_bags, sizes, C, gen):
    sizes = torch.as_tensor(sizes).expand(num_bags) if not isinstance(sizes, tuple) else \
        torch.randint(sizes[0], sizes[1] + 1, (num_bags,), generator=gen)
    labels = torch.randint(0, C, (int(sizes.sum()),), generator=gen)
    bag = torch.repeat_interleave(torch.arange(num_bags), sizes)
    counts = torch.zeros(num_bags, C, dtype=torch.long).index_put_((bag, labels), torch.ones_like(labels),
                                                                    accumulate=True)
    logits = torch.randn(int(sizes.sum()), C, generator=gen) * 2
    return logits, mlellp_ext.offsets_from_sizes(sizes), counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's size (default 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (--device cpu for a dry run)")
    torch.set_num_threads(os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
               "scale": args.scale, "rows": []}

    def write():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    def n(count):
        return max(1, int(count * args.scale))

    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    gen = torch.Generator().manual_seed(0)
    ops = torch.ops.mlellp
    for dtype in (torch.float32, torch.float64):
        z, off, cnt = make_workload(n(1_000_000), dtype=dtype)
        run_case(f"posterior, bags of 2..12, {str(dtype)[6:]}", ops.posterior, (z, off, cnt), z.numel(), device,
                 results, write)
    z, off, cnt = make_workload(n(1_000_000))
    sizes = off.diff()
    released = cw.privatize(cnt, 1.0, generator=gen)
    logw = cw.laplace(released.double(), 1.0, sizes).float()
    run_case("posterior_weighted, Laplace eps 1, bags of 2..12, float32", ops.posterior_weighted, (z, off, logw),
             z.numel(), device, results, write)
    run_case("log_pmf, bags of 2..12, float32", ops.log_pmf, (z, off), z.numel(), device, results, write)
    tangent = torch.randn(z.shape, generator=gen)
    run_case("phi_jvp, bags of 2..12, float32", ops.phi_jvp, (tangent, z, off, cnt), z.numel(), device, results, write)
    del z, off, cnt, logw, tangent
    for C, num_bags, bag_sizes in ((10, 20_000, 16), (4, 200_000, (2, 12)), (3, 20_000, 32)):
        z, off, cnt = multiclass_workload(n(num_bags), bag_sizes, C, gen)
        what = f"bags of {bag_sizes}" if not isinstance(bag_sizes, tuple) else "bags of 2..12"
        run_case(f"posterior_multiclass, C = {C}, {what}, float32", ops.posterior_multiclass,
                 (z, off, cnt, 1 << 24), z.shape[0], device, results, write)
    B = n(16_384)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=gen)
    params = (torch.rand(B, generator=gen) < 0.5, torch.rand(B, generator=gen, dtype=torch.float64) + 0.1,
              torch.stack([torch.randperm(4, generator=gen) for _ in range(B)]),
              torch.stack([torch.rand(B, generator=gen, dtype=torch.float64) * 0.4 + 0.8] * 3
                          + [torch.rand(B, generator=gen, dtype=torch.float64) * 0.2 - 0.1], 1))
    run_case("augment_images, 3x32x32 uint8 (images)", ops.augment_images, (images, *params), B, device, results,
             write)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
