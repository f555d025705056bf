"""posterior_weighted (counts known up to a likelihood w_b(k)), log_pmf's gradient, and
the count_weights helpers: against enumeration of labelings, against posterior and
log_pmf, gradcheck, opcheck, compile, and every bad input."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mlellp_ext as M
from mlellp_ext import count_weights as cw

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force(z, sizes, logw):
    """phi and log P(o) of every bag by enumerating its 2^n labelings (float64)."""
    offsets = M.offsets_from_sizes(sizes)
    phis, lls = [], []
    for b, n in enumerate(sizes):
        zb = z[offsets[b]:offsets[b + 1]].double().cpu()
        wb = logw[int(offsets[b]) + b:int(offsets[b]) + b + n + 1].double().cpu()
        total = torch.tensor(-math.inf, dtype=torch.float64)
        num = torch.full((n,), -math.inf, dtype=torch.float64)
        for labels in itertools.product([0.0, 1.0], repeat=n):
            h = torch.tensor(labels, dtype=torch.float64)
            lp = (h * F.logsigmoid(zb) + (1 - h) * F.logsigmoid(-zb)).sum() + wb[int(h.sum())]
            total = torch.logaddexp(total, lp)
            num = torch.where(h > 0, torch.logaddexp(num, lp), num)
        phis.append((num - total).exp())
        lls.append(total)
    return torch.cat(phis), torch.stack(lls)


def random_bags(seed, max_n=12, num=12):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_n + 1, (num,), generator=g).tolist()
    z = torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 3
    logw = torch.randn(sum(sizes) + num, generator=g, dtype=torch.float64) * 2
    logw[torch.rand(logw.shape, generator=g) < 0.3] = -math.inf
    return sizes, z, logw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_enumeration(device, seed):
    sizes, z, logw = random_bags(seed)
    phi, ll = M.posterior_weighted(z.to(device), M.offsets_from_sizes(sizes).to(device), logw.to(device))
    ref_phi, ref_ll = brute_force(z, sizes, logw)
    # bags with all weights -inf: -inf and NaN in both
    assert torch.equal(torch.isnan(phi.cpu()), torch.isnan(ref_phi))
    assert torch.equal(torch.isinf(ll.cpu()), torch.isinf(ref_ll))
    ok = ~torch.isnan(ref_phi)
    assert (phi.cpu()[ok] - ref_phi[ok]).abs().max() <= 1e-10
    fin = torch.isfinite(ref_ll)
    assert (ll.cpu()[fin] - ref_ll[fin]).abs().max() <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_hot_weights_are_posterior_exactly(dtype):
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 5, 12, 40, 300, 1000]  # the tilted path of large bags too
    z = (torch.randn(sum(sizes), generator=g) * 2).to(dtype)
    counts = torch.tensor([torch.randint(0, n + 1, (), generator=g).item() for n in sizes])
    offsets = M.offsets_from_sizes(sizes)
    p1, l1 = M.posterior(z, offsets, counts)
    p2, l2 = M.posterior_weighted(z, offsets, cw.exact(counts, torch.tensor(sizes)).to(dtype))
    assert torch.equal(p1, p2) and torch.equal(l1, l2)


def test_interval_is_the_posterior_summed_over_it():
    g = torch.Generator().manual_seed(4)
    sizes = [6, 9, 30, 400]
    z = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    lo, hi = torch.tensor([1, 0, 10, 150]), torch.tensor([3, 9, 14, 160])
    offsets = M.offsets_from_sizes(sizes)
    phi, ll = M.posterior_weighted(z, offsets, cw.interval(lo, hi, torch.tensor(sizes)))
    for b, n in enumerate(sizes):
        zb = z[offsets[b]:offsets[b + 1]]
        per_k = [M.posterior(zb, M.offsets_from_sizes([n]), torch.tensor([k])) for k in range(lo[b], hi[b] + 1)]
        lls = torch.stack([l[0] for _, l in per_k])
        torch.testing.assert_close(ll[b], torch.logsumexp(lls, 0), rtol=0, atol=1e-10)
        mix = sum(p * (l - ll[b]).exp() for p, l in per_k)
        torch.testing.assert_close(phi[offsets[b]:offsets[b + 1]], mix, rtol=0, atol=1e-10)


def test_wide_support_on_a_large_bag():
    """Laplace weights (support 0..n) on a bag of 2,000: log P(o) = logsumexp(log w + log_pmf),
    and sum_i phi_i = E[S | o] = sum_k k P(S = k | o)."""
    g = torch.Generator().manual_seed(5)
    n = 2000
    z = torch.randn(n, generator=g, dtype=torch.float64) - 1
    offsets = M.offsets_from_sizes([n])
    w = cw.laplace(torch.tensor([700]), 3.0, torch.tensor([n]))
    phi, ll = M.posterior_weighted(z, offsets, w)
    lp = M.log_pmf(z, offsets)
    torch.testing.assert_close(ll[0], torch.logsumexp(w + lp, 0), rtol=1e-12, atol=1e-9)
    post = (w + lp - ll[0]).exp()
    torch.testing.assert_close(phi.sum(), (post * torch.arange(n + 1)).sum(), rtol=1e-9, atol=1e-7)
    p32, l32 = M.posterior_weighted(z.float(), offsets, w.float())
    torch.testing.assert_close(p32.double(), phi, rtol=0, atol=1e-4)


def test_gradients_by_gradcheck():
    sizes, z, logw = random_bags(6, max_n=7, num=6)
    logw = torch.randn_like(logw)  # finite weights: gradcheck perturbs them
    offsets = M.offsets_from_sizes(sizes)
    z.requires_grad_(True)
    logw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: M.posterior_weighted(a, offsets, w)[1], (z, logw))
    assert torch.autograd.gradcheck(lambda a: M.log_pmf(a, offsets), (z,))
    # The gradient w.r.t. the weights is the posterior of the true count.
    _, ll = M.posterior_weighted(z, offsets, logw)
    (gw,) = torch.autograd.grad(ll.sum(), logw)
    lp = M.log_pmf(z.detach(), offsets)
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes) + 1)
    torch.testing.assert_close(gw, (logw.detach() + lp - ll.detach()[bag]).exp())


def test_second_derivatives_raise():
    offsets = M.offsets_from_sizes([3])
    z = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(M.posterior_weighted(z, offsets, w)[1].sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()
    assert not M.posterior_weighted(z, offsets, w)[0].requires_grad  # phi: a fixed target


def test_nan_and_infinite_weights_and_logits_stay_in_their_bag():
    sizes = [2, 3, 2, 1, 1]
    offsets = M.offsets_from_sizes(sizes)
    z = torch.tensor([0.1, -0.3, 0.5, 0.2, 1.0, -math.inf, -math.inf, 0.3, math.nan], dtype=torch.float64)
    w = torch.zeros(sum(sizes) + len(sizes), dtype=torch.float64)
    w[4] = math.nan                       # bag 1: a NaN weight
    w[7:10] = torch.tensor([-math.inf, 0.0, 0.0])  # bag 2: both logits -inf, only counts 1, 2 allowed
    w[10:12] = -math.inf                  # bag 3: no count allowed
    phi, ll = M.posterior_weighted(z, offsets, w)
    assert torch.isfinite(ll[0]) and torch.isfinite(phi[:2]).all()
    assert torch.isnan(ll[1]) and torch.isnan(phi[2:5]).all()
    assert ll[2] == -math.inf and torch.isnan(phi[5:7]).all()
    assert ll[3] == -math.inf and torch.isnan(phi[7])
    assert torch.isnan(ll[4]) and torch.isnan(phi[8])  # a NaN logit
    w2 = w.clone()
    w2[4] = math.inf
    assert torch.isnan(M.posterior_weighted(z, offsets, w2)[1][1])
    w2[12:14] = -math.inf  # a NaN logit stays NaN beside weights that rule every count out
    assert torch.isnan(M.posterior_weighted(z, offsets, w2)[1][4])


@pytest.mark.parametrize("args, match", [
    (lambda z, o, w: (z, o, w[:-1]), r"count_log_weights must have len\(logits\) \+ num_bags = 5 \+ 2 = 7 elements"),
    (lambda z, o, w: (z, o, w.long()), "count_log_weights must be float32, float64, float16 or bfloat16, got Long"),
    (lambda z, o, w: (z, o, w.view(1, -1)), "count_log_weights must be 1-D"),
    (lambda z, o, w: (z.view(1, -1), o, w), "logits must be 1-D"),
    (lambda z, o, w: (z, o.int(), w), "offsets must be int64, got Int"),
    (lambda z, o, w: (z, torch.tensor([0, 4, 3]), w), r"offsets must be non-decreasing"),
    (lambda z, o, w: (z, torch.tensor([0, 2, 6]), w), r"offsets\[-1\]|offsets\[2\]"),
])
def test_bad_inputs_name_the_argument(args, match):
    z, o, w = torch.randn(5), M.offsets_from_sizes([2, 3]), torch.zeros(7)
    with pytest.raises(ValueError, match=match):
        M.posterior_weighted(*args(z, o, w))
    with pytest.raises(ValueError, match=match):  # the fake kernel says the same where it can tell
        torch.ops.mlellp.posterior_weighted(*args(z, o, w))


def test_low_precision_and_float32():
    sizes, z, logw = random_bags(7)
    offsets = M.offsets_from_sizes(sizes)
    ref_phi, ref_ll = M.posterior_weighted(z, offsets, logw)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        phi, ll = M.posterior_weighted(z.to(dtype), offsets, logw)
        assert phi.dtype == dtype and ll.dtype == torch.float32
    phi, ll = M.posterior_weighted(z.float(), offsets, logw.float())
    ok = ~torch.isnan(ref_phi)
    assert (phi.double()[ok] - ref_phi[ok]).abs().max() < 1e-4


def test_opcheck_and_compile():
    sizes, z, logw = random_bags(8, max_n=6, num=5)
    offsets = M.offsets_from_sizes(sizes)
    logw = torch.randn_like(logw)
    torch.library.opcheck(torch.ops.mlellp.posterior_weighted, (z.requires_grad_(True), offsets, logw))
    torch.library.opcheck(torch.ops.mlellp.log_pmf, (z, offsets))
    compiled = torch.compile(lambda a, o, w: M.posterior_weighted(a, o, w), fullgraph=True)
    p1, l1 = compiled(z.detach(), offsets, logw)
    p2, l2 = M.posterior_weighted(z.detach(), offsets, logw)
    assert torch.equal(p1, p2) and torch.equal(l1, l2)


# ---------------------------------------------------------------- count_weights


def test_helpers_against_their_formulas():
    sizes = torch.tensor([0, 3, 5])
    k = torch.cat([torch.arange(n + 1) for n in sizes.tolist()]).double()
    bag = torch.repeat_interleave(torch.arange(3), sizes + 1)
    assert torch.equal(cw.interval(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 5]), sizes) == 0,
                       torch.tensor([True, False, True, True, False, False, False, True, True, True, True]))
    obs, scale = torch.tensor([0.0, -1.0, 7.0]), 1.5
    a = math.exp(-1 / scale)
    expect = math.log((1 - a) / (1 + a)) - (obs[bag] - k).abs() / scale
    torch.testing.assert_close(cw.laplace(obs, scale, sizes), expect)
    # the discrete Laplace pmf sums to one over all integers
    e = torch.arange(-200, 201).double()
    torch.testing.assert_close(cw.laplace(torch.tensor([0.0]), scale, torch.tensor([0]))[0].exp()
                               * (a ** e.abs()).sum(), torch.tensor(1.0, dtype=torch.float64))
    sigma = torch.tensor([1.0, 0.5, 2.0])
    normal = torch.distributions.Normal(k, sigma[bag])
    torch.testing.assert_close(cw.gaussian(torch.tensor([0.3, 1.2, 4.4]), sigma, sizes),
                               normal.log_prob(torch.tensor([0.3, 1.2, 4.4])[bag]))


def test_randomized_response_against_enumeration():
    keep, n = 0.6, 4
    t, f = (1 + keep) / 2, (1 - keep) / 2
    w = cw.randomized_response(torch.tensor([2]), keep, torch.tensor([n])).exp()
    for k in range(n + 1):
        truth = [1] * k + [0] * (n - k)
        total = 0.0
        for reports in itertools.product([0, 1], repeat=n):
            if sum(reports) != 2:
                continue
            total += math.prod((t if h else f) if r else (1 - t if h else 1 - f) for h, r in zip(truth, reports))
        assert abs(float(w[k]) - total) < 1e-12


def test_privatize():
    counts = torch.full((200_000,), 5)
    noisy = cw.privatize(counts, 1.0, generator=torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.int64
    again = cw.privatize(counts, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    a = math.exp(-1.0)
    e = (noisy - 5).double()
    assert abs(float(e.mean())) < 0.02
    assert abs(float(e.var()) - 2 * a / (1 - a) ** 2) < 0.05 * 2 * a / (1 - a) ** 2
    assert abs(float((e == 0).double().mean()) - (1 - a) / (1 + a)) < 0.01
    assert torch.equal(cw.privatize(counts, math.inf), counts)


@pytest.mark.parametrize("call, match", [
    (lambda: cw.interval(torch.tensor([2]), torch.tensor([1]), torch.tensor([3])), "bag 0 of size 3 has lo = 2, hi = 1"),
    (lambda: cw.exact(torch.tensor([4]), torch.tensor([3])), "bag 0 of size 3 has count 4"),
    (lambda: cw.laplace(torch.tensor([1.0]), 0.0, torch.tensor([3])), "scale must be positive, got 0.0"),
    (lambda: cw.gaussian(torch.tensor([math.nan]), 1.0, torch.tensor([3])), "observed must be finite, got nan"),
    (lambda: cw.laplace(torch.tensor([1.0, 2.0]), 1.0, torch.tensor([3])), "observed must be a scalar or have one"),
    (lambda: cw.exact(torch.tensor([1.5]), torch.tensor([3])), "counts must be integers"),
    (lambda: cw.interval(0, 1, torch.tensor([[3]])), "sizes must be a 1-D integer tensor"),
    (lambda: cw.randomized_response(torch.tensor([4]), 0.5, torch.tensor([3])), "observed must be within 0..size"),
    (lambda: cw.randomized_response(torch.tensor([1]), 1.5, torch.tensor([3])), r"keep must be in \[0, 1\]"),
    (lambda: cw.privatize(torch.tensor([1]), 0.0), "epsilon must be positive, got 0.0"),
])
def test_helper_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_em_targets_take_count_weights():
    g = torch.Generator().manual_seed(9)
    sizes = torch.tensor([4, 0, 7, 3])
    offsets = M.offsets_from_sizes(sizes)
    counts = torch.tensor([1, 0, 5, 3])
    logits = torch.randn(int(sizes.sum()), generator=g)
    exact, weighted = M.EMTargets(offsets, counts), M.EMTargets(offsets, cw.exact(counts, sizes))
    torch.testing.assert_close(weighted.phi, exact.phi)  # the starting targets: y / n
    assert weighted.update(logits) == exact.update(logits)
    assert torch.equal(weighted.phi, exact.phi)
    noisy = M.EMTargets(offsets, cw.laplace(counts.double() + 0.0, 1.0, sizes))
    noisy.update(logits)
    phi, ll = M.posterior_weighted(logits, offsets, cw.laplace(counts.double(), 1.0, sizes))
    torch.testing.assert_close(noisy.phi, phi)
    with pytest.raises(ValueError, match="count_log_weights must have"):
        M.EMTargets(offsets, torch.zeros(3))
    with pytest.raises(ValueError, match=r"count_log_weights\[1\] = nan \(bag 0\)"):
        M.EMTargets(offsets, torch.tensor([0.0, math.nan, 0, 0, 0, 0.0] + [0.0] * 13).double()[:18])
    ruled_out = cw.exact(counts, sizes)
    ruled_out[5] = -math.inf  # bag 1 (empty) had only k = 0
    with pytest.raises(ValueError, match="bag 1 has no possible count"):
        M.EMTargets(offsets, ruled_out)
    with pytest.raises(ValueError, match="count log-weights always take the exact E-step"):
        M.EMTargets(offsets, cw.exact(counts, sizes), estep="auto")


def test_vmap_over_logits_and_weights():
    sizes, z, logw = random_bags(10, max_n=6, num=5)
    offsets = M.offsets_from_sizes(sizes)
    g = torch.Generator().manual_seed(10)
    zs = torch.randn(3, z.shape[0], generator=g, dtype=torch.float64)
    ws = torch.randn(3, logw.shape[0], generator=g, dtype=torch.float64)
    phi, ll = torch.vmap(lambda a, w: M.posterior_weighted(a, offsets, w))(zs, ws)
    for k in range(3):
        p, l = M.posterior_weighted(zs[k], offsets, ws[k])
        assert torch.equal(phi[k], p) and torch.equal(ll[k], l)
    phi, _ = torch.vmap(lambda a: torch.ops.mlellp.posterior_weighted(a, offsets, logw))(zs)
    assert torch.equal(phi[1], M.posterior_weighted(zs[1], offsets, logw)[0])


def test_log_pmf_gradient_edge_cases():
    """Impossible counts carry no derivative; a NaN gradient entry makes its bag NaN; the
    float32 result is the float64 one rounded (the VJP runs in float64); jacrev works."""
    z = torch.tensor([math.inf, 0.3, -0.2], dtype=torch.float64, requires_grad=True)
    offsets = M.offsets_from_sizes([3])
    (g,) = torch.autograd.grad(M.log_pmf(z, offsets), z, torch.tensor([5.0, 1, 0, 0], dtype=torch.float64))
    (ref,) = torch.autograd.grad(M.log_pmf(z, offsets), z, torch.tensor([0.0, 1, 0, 0], dtype=torch.float64))
    assert torch.equal(g, ref) and g[0] == 0 and bool(torch.isfinite(g).all())
    (g,) = torch.autograd.grad(M.log_pmf(z, offsets), z, torch.tensor([0.0, math.nan, 0, 0], dtype=torch.float64))
    assert bool(torch.isnan(g).all())
    gen = torch.Generator().manual_seed(11)
    z64 = torch.randn(60, generator=gen, dtype=torch.float64)
    off = M.offsets_from_sizes([60])
    v = torch.randn(61, generator=gen, dtype=torch.float64)
    z32 = z64.float().requires_grad_(True)
    (g32,) = torch.autograd.grad(M.log_pmf(z32, off), z32, v.float())
    zd = z32.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(M.log_pmf(zd, off), zd, v.float().double())
    assert (g32.double() - g64).abs().max() < 1e-5 * g64.abs().max()
    small = torch.randn(5, generator=gen, dtype=torch.float64)
    off2 = M.offsets_from_sizes([3, 2])
    jac = torch.func.jacrev(lambda a: M.log_pmf(a, off2))(small)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda a: M.log_pmf(a, off2), small))
