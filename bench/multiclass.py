"""Multi-class E-step (posterior_multiclass) on CIFAR-10-like workloads, against
pure-PyTorch baselines measured in the same run.

    python bench/multiclass.py [--out bench/results] [--bags 64]

C = 10 classes; bags of 8, 16 and 32 instances whose count vectors are those of
uniformly random labels; logits ~ N(0, 2^2); float64 and float32 (one thread
and all threads). Baselines, both computing the same phi and log-likelihood:
  * torch DP: the same lattice recursion in PyTorch, vectorised over the
    states of one layer of all bags at once: a gather of each state's C
    predecessors (padded to C with a -inf sentinel for classes it cannot come
    from) and a log-sum-exp, one step per layer; phi by autograd
    (phi = d log P / dz + softmax(z)). Its index tensors depend only on the
    counts, so they are built once, untimed (as EM would). Padding bags to one
    dense table instead would multiply the states by far more: the tables'
    shapes differ from bag to bag;
  * enumeration of all C^n labelings (tiny bags only, n = 4 and 5).
Beside them, the approximate E-step (posterior_multiclass_approx): its speed
and its error against the exact op on the same bags (mean and max absolute
error of phi). Writes multiclass_cpu.json and multiclass_cpu.md.
"""
import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

import mlellp_ext
from mlellp_ext import offsets_from_sizes

C = 10


def workload(num_bags, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (num_bags, n), generator=gen)
    counts = torch.nn.functional.one_hot(labels, C).sum(1)
    logits = (torch.randn(num_bags * n, C, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return logits, offsets_from_sizes(torch.full((num_bags,), n)), counts


def lattice_index(offsets, counts):
    """The lattice of every bag as flat index tensors, grouped by layer (built once
    per set of counts, as EM would; not timed). State 0 of the flat table is a
    sentinel holding -inf; each bag's states follow in mixed-radix order."""
    import numpy as np

    offsets, counts = offsets.numpy(), counts.numpy()
    num_classes = counts.shape[1]
    layers = {}  # layer -> lists of (state, predecessors (C,), instance row)
    final, start = [], 1
    for b in range(counts.shape[0]):
        y = counts[b]
        radix = y + 1
        strides = np.concatenate([[1], np.cumprod(radix)[:-1]])
        S = int(np.prod(radix))
        idx = np.arange(S)
        digits = (idx[:, None] // strides[None, :]) % radix[None, :]
        layer = digits.sum(1)
        pred = np.where(digits > 0, start + idx[:, None] - strides[None, :], 0)  # 0: the sentinel
        for L in range(1, int(layer.max(initial=0)) + 1):
            sel = layer == L
            entry = layers.setdefault(L, ([], [], []))
            entry[0].append(start + idx[sel])
            entry[1].append(pred[sel])
            entry[2].append(np.full(int(sel.sum()), offsets[b] + L - 1))
        final.append(start + S - 1)
        start += S
    by_layer = [(torch.from_numpy(np.concatenate(s)), torch.from_numpy(np.concatenate(p)),
                 torch.from_numpy(np.concatenate(r))) for _, (s, p, r) in sorted(layers.items())]
    starts = torch.tensor([0] + final[:-1]) + 1  # each bag's state 0 (the empty count vector)
    return start, starts, torch.tensor(final), by_layer, num_classes


def torch_dp(logits, lattice):
    """phi and log P(y) by the lattice recursion in PyTorch, vectorised over all bags'
    states of a layer (gather of predecessors, log-sum-exp over classes), phi by
    autograd (phi = d log P / dz + softmax(z))."""
    total, starts, final, by_layer, _ = lattice
    z = logits.detach().clone().requires_grad_()
    lp = torch.log_softmax(z, -1)
    alpha = torch.full((total,), -math.inf, dtype=z.dtype).index_fill(0, starts, 0.0)
    for states, pred, rows in by_layer:
        alpha = alpha.index_put((states,), torch.logsumexp(alpha[pred] + lp[rows], 1))
    ll = alpha[final]
    grad, = torch.autograd.grad(ll.sum(), z)
    return grad + torch.softmax(z.detach(), -1), ll.detach()


def enumeration(logits, offsets, counts):
    phis, lls = [], []
    for b in range(counts.shape[0]):
        z = logits[offsets[b]:offsets[b + 1]].double()
        n = z.shape[0]
        lp = torch.log_softmax(z, -1)
        labelings = torch.tensor(list(itertools.product(range(C), repeat=n)))
        labelings = labelings[(torch.nn.functional.one_hot(labelings, C).sum(1) == counts[b]).all(1)]
        scores = lp.gather(1, labelings.T).sum(0)
        ll = torch.logsumexp(scores, 0)
        w = (scores - ll).exp()
        phi = torch.zeros(n, C, dtype=torch.float64)
        for i in range(n):
            phi[i].index_add_(0, labelings[:, i], w)
        phis.append(phi)
        lls.append(ll)
    return torch.cat(phis), torch.stack(lls)


def timed(fn, *args, min_seconds=0.5, max_calls=20, warm_up=True):
    if warm_up:  # first calls pay one-time costs (allocations, thread pools, lazy imports)
        fn(*args)
    times, out = [], None
    while not times or (sum(times) < min_seconds and len(times) < max_calls):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--bags", type=int, default=64, help="bags per workload (the baselines see fewer)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    rows = []

    def add(name, n, dtype, baseline, bags, seconds_op, seconds_base, error, op_threads):
        rows.append({"workload": name, "n": n, "dtype": str(dtype).replace("torch.", ""), "baseline": baseline,
                     "bags": bags, "op_threads": op_threads, "op_instances_per_s": bags * n / seconds_op,
                     "baseline_instances_per_s": bags * n / seconds_base, "speedup": seconds_base / seconds_op,
                     "max_abs_error_phi": error})
        r = rows[-1]
        print(f"{name} n={n} {r['dtype']} threads={op_threads}: op {r['op_instances_per_s']:,.0f}/s, "
              f"{baseline} {r['baseline_instances_per_s']:,.0f}/s, x{r['speedup']:.1f}, error {error:.1e}",
              file=sys.stderr)

    for n in (8, 16, 32):
        for dtype in (torch.float64, torch.float32):
            logits, offsets, counts = workload(args.bags, n, dtype)
            base_bags = args.bags if n < 32 else max(1, args.bags // 8)  # bags of 32: the baseline's tables are large
            b_logits, b_offsets, b_counts = logits[:base_bags * n], offsets[:base_bags + 1], counts[:base_bags]
            lattice = lattice_index(b_offsets, b_counts)
            t_base, (phi_ref, _) = timed(torch_dp, b_logits, lattice, min_seconds=1.0, max_calls=5, warm_up=n < 32)
            for op_threads in sorted({1, threads}):
                torch.set_num_threads(op_threads)
                t_op, (phi, _) = timed(torch.ops.mlellp.posterior_multiclass, logits, offsets, counts)
                t_op_per_bag = t_op / args.bags
                torch.set_num_threads(threads)
                error = float((phi[:base_bags * n].double() - phi_ref.double()).abs().max())
                add(f"C=10, bags of {n}", n, dtype, "torch DP", base_bags, t_op_per_bag * base_bags, t_base, error,
                    op_threads)
    approx_rows = []
    for n in (8, 16, 32):
        logits, offsets, counts = workload(args.bags, n, torch.float64)
        t_exact, (phi, _) = timed(torch.ops.mlellp.posterior_multiclass, logits, offsets, counts)
        t_approx, (phi_a, _) = timed(mlellp_ext.posterior_multiclass_approx, logits, offsets, counts)
        err = (phi_a - phi).abs()
        approx_rows.append({"n": n, "bags": args.bags, "threads": threads,
                            "exact_instances_per_s": args.bags * n / t_exact,
                            "approx_instances_per_s": args.bags * n / t_approx,
                            "mean_abs_error_phi": float(err.mean()), "max_abs_error_phi": float(err.max())})
        print(f"approx n={n}: {approx_rows[-1]}", file=sys.stderr)
    for n in (4, 5):
        logits, offsets, counts = workload(8, n, torch.float64)
        t_base, (phi_ref, _) = timed(enumeration, logits, offsets, counts, min_seconds=0.5, max_calls=3, warm_up=False)
        torch.set_num_threads(1)
        t_op, (phi, _) = timed(torch.ops.mlellp.posterior_multiclass, logits, offsets, counts)
        torch.set_num_threads(threads)
        add(f"C=10, bags of {n}", n, torch.float64, "enumeration", 8, t_op, t_base,
            float((phi - phi_ref).abs().max()), 1)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multiclass_cpu.json"), "w") as f:
        json.dump({"torch": torch.__version__, "mlellp_ext": mlellp_ext.__version__, "threads": threads,
                   "rows": rows, "approximate": approx_rows}, f, indent=2)
    lines = ["| workload | dtype | op threads | op (instances/s) | baseline | baseline (instances/s) | speed-up | "
             "max abs error of phi |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['op_threads']} | {r['op_instances_per_s']:,.0f} | "
                     f"{r['baseline']} | {r['baseline_instances_per_s']:,.0f} | {r['speedup']:,.1f}× | "
                     f"{r['max_abs_error_phi']:.1e} |")
    with open(os.path.join(args.out, "multiclass_cpu.md"), "w") as f:
        f.write(f"Made by `python bench/multiclass.py` (torch {torch.__version__}, {threads} threads).\n\n")
        f.write("\n".join(lines) + "\n")
        f.write("\nThe approximate E-step (posterior_multiclass_approx) on the same kind of bags (float64), "
                "against the exact op:\n\n| bags of | exact (instances/s) | approximate (instances/s) | "
                "mean abs error of phi | max abs error of phi |\n|---:|---:|---:|---:|---:|\n")
        for r in approx_rows:
            f.write(f"| {r['n']} | {r['exact_instances_per_s']:,.0f} | {r['approx_instances_per_s']:,.0f} | "
                    f"{r['mean_abs_error_phi']:.4f} | {r['max_abs_error_phi']:.3f} |\n")


if __name__ == "__main__":
    main()
