"""Small CUDA cases for compute-sanitizer (part of `make gpu-check`; needs a CUDA device).

    compute-sanitizer --tool memcheck python bench/sanitizer_cases.py [--wide-only]

A plain script rather than pytest, so that the sanitizer's slow start is paid
once. Every op runs on fresh random inputs, per-bag kernels (small bags) and
the block kernel (bags whose rows are 64 or more wide) alike, plus empty bags,
y = 0 and y = n, infinite logits and rejected input, and the multi-class op on
random count vectors, the weighted op on random log-weights and augment_images on
random images and parameters; each result is compared with the CPU kernels. The ops allocate their own outputs, so before each call
blocks of the outputs' sizes are filled with NaN and freed into torch's caching
allocator, which most likely hands them to the op: an element no kernel wrote
then reads NaN where the CPU has a number. (gpu-check runs memcheck and
initcheck with the cache off instead, so that allocations have exact bounds.)
--wide-only keeps the block-kernel cases (racecheck is slow on shared memory).
Exits non-zero on any mismatch.
"""
import argparse
import sys

import torch

import mlellp_ext  # noqa: F401  (registers the ops)
from mlellp_ext import offsets_from_sizes

FAILURES = []


def bags(gen, sizes, dtype, inf=False):
    sizes = torch.as_tensor(sizes)
    logits = torch.randn(int(sizes.sum()), generator=gen, dtype=torch.float64) * 2
    if inf and logits.numel() > 3:
        logits[0], logits[2] = float("inf"), float("-inf")
    counts = torch.minimum((torch.rand(len(sizes), generator=gen) * (sizes + 1)).floor().long(), sizes)
    if len(sizes) > 2:  # the edges of the count range
        counts[0], counts[1] = 0, sizes[1]
    return logits.to(dtype), offsets_from_sizes(sizes), counts


def same(name, got, want, tol):
    got, want = got.cpu().double(), want.double()
    finite_match = torch.isfinite(got) == torch.isfinite(want)
    ok = bool(finite_match.all()) and torch.allclose(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=tol, atol=tol)
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        FAILURES.append(name)


def poison_cache(*like):
    """NaN-filled blocks of the sizes of `like`, freed at once and kept by the caching allocator."""
    for t in like:
        torch.full(t.shape, float("nan"), device="cuda", dtype=t.dtype)


def check_all_ops(label, logits, offsets, counts, gen):
    tol = 1e-10 if logits.dtype == torch.float64 else 2e-4
    dev = [t.cuda() for t in (logits, offsets, counts)]
    torch.cuda.synchronize()
    phi_c, ll_c = torch.ops.mlellp.posterior(logits, offsets, counts)
    poison_cache(phi_c, ll_c)
    phi_g, ll_g = torch.ops.mlellp.posterior(*dev)
    same(f"{label} posterior phi", phi_g, phi_c, tol)
    same(f"{label} posterior log_lik", ll_g, ll_c, tol)
    g = torch.randn(ll_c.shape, generator=gen, dtype=ll_c.dtype)
    poison_cache(phi_c)
    same(f"{label} posterior_backward",
         torch.ops.mlellp.posterior_backward(g.cuda(), phi_g, dev[0], dev[1]),
         torch.ops.mlellp.posterior_backward(g, phi_c, logits, offsets), tol)
    poison_cache(torch.empty(logits.numel() + counts.numel(), dtype=ll_c.dtype))
    same(f"{label} log_pmf", torch.ops.mlellp.log_pmf(dev[0], dev[1]), torch.ops.mlellp.log_pmf(logits, offsets), tol)
    u = torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
    poison_cache(phi_c)
    same(f"{label} phi_jvp", torch.ops.mlellp.phi_jvp(u.cuda(), *dev), torch.ops.mlellp.phi_jvp(u, logits, offsets, counts), tol)
    torch.cuda.synchronize()


def multiclass_bags(gen, num_bags, num_classes, dtype):
    """Random multi-class bags (sizes 0..9, count vectors of random labels), a few +-inf logits."""
    sizes = torch.randint(0, 10, (num_bags,), generator=gen)
    n = int(sizes.sum())
    logits = torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 3
    if n > 4:
        logits[0, 0], logits[3, 1] = float("inf"), float("-inf")
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    bag = torch.repeat_interleave(torch.arange(num_bags), sizes)
    counts = torch.zeros(num_bags, num_classes, dtype=torch.long).index_put_(
        (bag, labels), torch.ones_like(labels), accumulate=True)
    return logits.to(dtype), offsets_from_sizes(sizes), counts


def compare_phi_and_log_lik(label, name, *args):
    """torch.ops.mlellp.<name>(*args) on the GPU against the CPU: (phi, log_likelihood)."""
    op = getattr(torch.ops.mlellp, name)
    tol = 1e-10 if args[0].dtype == torch.float64 else 2e-4
    phi_c, ll_c = op(*args)
    poison_cache(phi_c, ll_c)
    phi_g, ll_g = op(*(a.cuda() for a in args))
    same(f"{label} {name} phi", phi_g, phi_c, tol)
    same(f"{label} {name} log_lik", ll_g, ll_c, tol)
    torch.cuda.synchronize()


def check_multiclass(label, logits, offsets, counts):
    compare_phi_and_log_lik(label, "posterior_multiclass", logits, offsets, counts)


def check_rejected():
    """Bad input must raise before any kernel reads out of bounds."""
    logits = torch.randn(10, device="cuda")
    cases = {
        "count above its bag": (torch.tensor([0, 4, 10], device="cuda"), torch.tensor([5, 1], device="cuda")),
        "negative count": (torch.tensor([0, 4, 10], device="cuda"), torch.tensor([1, -1], device="cuda")),
        "offsets past the end": (torch.tensor([0, 4, 12], device="cuda"), torch.tensor([1, 1], device="cuda")),
        "decreasing offsets": (torch.tensor([0, 7, 4, 10], device="cuda"), torch.tensor([1, 1, 1], device="cuda")),
    }
    logits2 = torch.randn(10, 3, device="cuda")
    cases2 = {
        "count vector not summing to its bag": (torch.tensor([0, 4, 10], device="cuda"),
                                                torch.tensor([[1, 1, 1], [2, 2, 2]], device="cuda")),
        "negative count in a vector": (torch.tensor([0, 4, 10], device="cuda"),
                                       torch.tensor([[5, -1, 0], [2, 2, 2]], device="cuda")),
        "bag over the state budget": (torch.tensor([0, 4, 10], device="cuda"),
                                      torch.tensor([[2, 1, 1], [2, 2, 2]], device="cuda")),
    }
    for name, (offsets, counts) in cases2.items():
        try:
            torch.ops.mlellp.posterior_multiclass(logits2, offsets, counts, max_states=20)
            torch.cuda.synchronize()
            print(f"FAIL posterior_multiclass accepted: {name}", flush=True)
            FAILURES.append(f"posterior_multiclass {name}")
        except ValueError as err:
            print(f"ok   posterior_multiclass rejects {name}: {str(err).splitlines()[0][:90]}", flush=True)
    for name, (offsets, counts) in cases.items():
        for op, args in (("posterior", (logits, offsets, counts)), ("phi_jvp", (logits, logits, offsets, counts))):
            try:
                getattr(torch.ops.mlellp, op)(*args)
                torch.cuda.synchronize()
                print(f"FAIL {op} accepted: {name}", flush=True)
                FAILURES.append(f"{op} {name}")
            except ValueError as err:
                print(f"ok   {op} rejects {name}: {str(err).splitlines()[0][:90]}", flush=True)


def check_weighted(label, logits, offsets, gen):
    """posterior_weighted with random log-weights (some -inf, one bag all -inf, one NaN)."""
    n_w = logits.numel() + offsets.numel() - 1
    logw = torch.randn(n_w, generator=gen, dtype=torch.float64)
    logw[torch.rand(n_w, generator=gen) < 0.3] = float("-inf")
    if n_w > 3:
        logw[1] = float("nan")
    compare_phi_and_log_lik(label, "posterior_weighted", logits, offsets, logw)


def check_weighted_wide(label, logits, offsets, gen):
    """posterior_weighted on bags whose weights' support is wide (random log-weights over
    all counts; a single count of bag 2 at its middle)."""
    n_w = logits.numel() + offsets.numel() - 1
    logw = torch.randn(n_w, generator=gen, dtype=torch.float64)
    start = int(offsets[2]) + 2
    logw[start:start + int(offsets[3] - offsets[2]) + 1] = float("-inf")
    logw[start + 100] = 0.0
    compare_phi_and_log_lik(label, "posterior_weighted", logits, offsets, logw)


def check_augment(label, images, gen, params_on_gpu=False):
    """augment_images with random per-image parameters (every op in random orders, blurs, flips),
    the parameters on the CPU (the trainer's way) or on the GPU."""
    from mlellp_ext.image_ops import augment_images

    n = images.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    sigma = torch.where(torch.rand(n, generator=gen) < 0.5, 0.1 + torch.rand(n, generator=gen), 0.0)
    order = torch.rand(n, 4, generator=gen).argsort(1)
    order[torch.rand(n, generator=gen) < 0.3] = -1
    factors = torch.cat((0.8 + 0.4 * torch.rand(n, 3, generator=gen), 0.04 * torch.rand(n, 1, generator=gen) - 0.02), 1)
    dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    want = augment_images(images, flip, sigma.to(dtype), order, factors.to(dtype))
    poison_cache(want)
    params = (flip, sigma.to(dtype), order, factors.to(dtype))
    got = augment_images(images.cuda(), *(p.cuda() if params_on_gpu else p for p in params))
    torch.cuda.synchronize()
    same(f"{label} augment_images", got, want, tol)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide-only", action="store_true")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    gen = torch.Generator().manual_seed(1234)
    for dtype in (torch.float32, torch.float64):
        if not args.wide_only:
            sizes = torch.randint(0, 13, (300,), generator=gen)
            check_all_ops(f"small bags {dtype}", *bags(gen, sizes, dtype, inf=True), gen)
        logits, offsets, _ = bags(gen, [150, 3, 300, 0, 129], dtype)
        # Rows 64 or more wide (bags 0, 2 and 4) go to the block kernel.
        check_all_ops(f"wide bags {dtype}", logits, offsets, torch.tensor([75, 3, 140, 0, 64]), gen)
        # posterior_weighted's block kernel: supports wide enough (bags 0 and 2), one of a
        # single count (the posterior path under a block), beside small bags
        logits, offsets, _ = bags(gen, [300, 0, 200, 5, 40], dtype)
        check_weighted_wide(f"weighted wide bags {dtype}", logits, offsets, gen)
    # augment_images: a thread block per image (shared-memory reductions: racecheck too)
    # 45x45 and 5x300: each thread's (row, column) step wraps around a row; 300 > the block
    for shape in [(40, 3, 32, 32), (3, 3, 45, 45), (2, 3, 5, 300), (5, 3, 1, 5), (7, 3, 17, 3), (0, 3, 8, 8)]:
        check_augment(f"augment {shape} uint8", torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8), gen)
        for dtype in (torch.float32, torch.float64):
            check_augment(f"augment {shape} {dtype}", torch.rand(shape, generator=gen, dtype=dtype), gen)
            check_augment(f"augment {shape} {dtype}, parameters on the GPU", torch.rand(shape, generator=gen,
                                                                                      dtype=dtype), gen, True)
    if not args.wide_only:
        check_all_ops("no bags", torch.empty(0), torch.zeros(1, dtype=torch.long), torch.empty(0, dtype=torch.long), gen)
        for dtype in (torch.float32, torch.float64, torch.float16):
            check_multiclass(f"multi-class bags {dtype}", *multiclass_bags(gen, 200, 4, dtype))
        check_multiclass("multi-class, no bags", torch.empty(0, 3), torch.zeros(1, dtype=torch.long),
                         torch.empty(0, 3, dtype=torch.long))
        for dtype in (torch.float32, torch.float64):
            logits, offsets, _ = bags(gen, torch.randint(0, 13, (200,), generator=gen), dtype, inf=True)
            check_weighted(f"weighted bags {dtype}", logits, offsets, gen)
            logits, offsets, _ = bags(gen, [300, 0, 40], dtype)
            check_weighted(f"weighted large bags {dtype}", logits, offsets, gen)
        check_weighted("weighted, no bags", torch.empty(0), torch.zeros(1, dtype=torch.long), gen)
        check_rejected()
    print(f"sanitizer cases: {len(FAILURES)} failures", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
