"""Property suite: every op's and library function's contract on seeded random inputs.

Logits are drawn wild on purpose (magnitudes log-uniform from 1e-2 to 1e4, both signs,
a few exact ties, -inf/+inf and NaN where a property allows them), bags small and
ragged with counts biased towards the edges (0, 1, n - 1, n), where the recursions'
scaled arithmetic is most strained. Each case is seeded by the test's name and its
number, so a failure names a case that reproduces. The invariants:

* exact ops: finite logits never give NaN; phi in [0, 1], exactly 0 for y = 0 and 1
  for y = n; sum_i phi_i = E[S | observation]; enumeration agrees on small bags; a
  NaN stays in its bag (others bitwise unchanged); a bag's result does not depend on
  the bags around it; non-contiguous inputs give bitwise the contiguous result;
  one-hot posterior_weighted is posterior bit for bit;
* the approximate multi-class E-step: rows sum to 1 within the dtype's rounding,
  phi in [0, 1], NaN only in its own bag, none from finite logits;
* helpers and losses: finite in, finite out, reductions consistent, and what the
  contract forbids raises ValueError naming the op and the argument.

``pytest --properties-long`` runs 20 times the cases (before a release).
"""
import math
import zlib

import pytest
import torch

import mlellp_ext as M
from mlellp_ext import count_weights as cw
from mlellp_ext.reference import log_pmf_enumerate, posterior_enumerate

from conftest import DEVICES
from test_multiclass import brute_force as multiclass_brute_force

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24}


@pytest.fixture
def cases(request):
    """Seeded generators, one per case: the short run's count, 20x with --properties-long."""
    scale = 20 if request.config.getoption("--properties-long") else 1

    def make(count):
        base = zlib.crc32(request.node.nodeid.encode())
        return [torch.Generator().manual_seed(base * 1000 + k) for k in range(count * scale)]

    return make


def wild_logits(g, shape, tame=0.3):
    """Logits of magnitude log-uniform in [1e-2, 1e4] with random signs; a fraction
    ``tame`` ~ N(0, 3^2); some entries repeated exactly (ties)."""
    n = math.prod(shape)
    mag = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 2)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    z = torch.where(torch.rand(n, generator=g) < tame, torch.randn(n, generator=g, dtype=torch.float64) * 3,
                    sign * mag)
    if n > 1:
        ties = torch.rand(n, generator=g) < 0.1
        z[ties] = z[torch.randint(0, n, (int(ties.sum()),), generator=g)]
    return z.reshape(shape)


def edge_counts(g, sizes):
    """Counts in 0..n, half of them at an edge (0, 1, n - 1 or n)."""
    u = (torch.rand(len(sizes), generator=g, dtype=torch.float64) * (sizes + 1)).floor().long()
    edge = torch.stack([torch.zeros_like(sizes), torch.ones_like(sizes), sizes - 1, sizes], 1)
    pick = edge.gather(1, torch.randint(0, 4, (len(sizes), 1), generator=g)).squeeze(1)
    counts = torch.where(torch.rand(len(sizes), generator=g) < 0.5, pick, u)
    return counts.clamp(min=0).minimum(sizes)


def binary_case(g, num_bags=40, max_size=10):
    sizes = torch.randint(0, max_size + 1, (num_bags,), generator=g)
    z = wild_logits(g, (int(sizes.sum()),))
    return z, M.offsets_from_sizes(sizes), edge_counts(g, sizes), sizes


def multiclass_case(g, num_bags=12, max_size=5, C=None):
    C = C or int(torch.randint(2, 5, (1,), generator=g))
    sizes = torch.randint(0, max_size + 1, (num_bags,), generator=g)
    z = wild_logits(g, (int(sizes.sum()), C))
    labels = torch.randint(0, C, (int(sizes.sum()),), generator=g)
    bag = torch.repeat_interleave(torch.arange(num_bags), sizes)
    counts = torch.zeros(num_bags, C, dtype=torch.long).index_put_((bag, labels), torch.ones_like(labels),
                                                                    accumulate=True)
    # Some bags all of one class: counts at the lattice's edge.
    one = torch.rand(num_bags, generator=g) < 0.3
    c = torch.randint(0, C, (num_bags,), generator=g)
    counts[one] = 0
    counts[one, c[one]] = sizes[one]
    return z, M.offsets_from_sizes(sizes), counts, sizes


def bag_of(offsets):
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())


def bag_sums(values, offsets):
    return torch.zeros(len(offsets) - 1, *values.shape[1:], dtype=torch.float64).index_add_(
        0, bag_of(offsets), values.double())


def strided(t):
    """t's values in a non-contiguous view (every other element of a buffer twice as long)."""
    buf = torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    view = buf[::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def assert_same(a, b):
    """Bitwise equal (NaN equal to NaN)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def with_nan_in_one_bag(g, z, offsets, sizes):
    """z with a NaN in one instance of a random bag (for (N, C) logits, in one class of
    it, half the time beside a +inf in another class of the same row)."""
    nonempty = torch.nonzero(sizes > 0).flatten()
    b = int(nonempty[torch.randint(0, len(nonempty), (1,), generator=g)])
    i = int(offsets[b]) + int(torch.randint(0, int(sizes[b]), (1,), generator=g))
    bad = z.clone()
    if z.dim() == 1:
        bad[i] = float("nan")
    else:
        c = torch.randperm(z.shape[1], generator=g)[:2]
        bad[i, c[0]] = float("nan")
        if bool(torch.rand(1, generator=g) < 0.5):
            bad[i, c[1]] = float("inf")
    return bad, b


def assert_nan_only_in_bag(result_nan, result, offsets, b):
    """(phi, log_lik) of a call with a NaN in bag b: that bag all NaN, every other bag
    bitwise the result without the NaN."""
    (phi_n, ll_n), (phi, ll) = [(p.cpu(), l.cpu()) for p, l in (result_nan, result)]
    inside, others = bag_of(offsets) == b, torch.arange(len(ll)) != b
    assert phi_n[inside].isnan().all() and ll_n[b].isnan()
    assert_same(phi_n[~inside], phi[~inside]) and assert_same(ll_n[others], ll[others])


def some_bags(g, offsets, sizes):
    """A random subset of the bags: (bag numbers, their rows, their offsets)."""
    keep = torch.nonzero(torch.rand(len(sizes), generator=g) < 0.5).flatten()
    rows = torch.cat([torch.arange(int(offsets[k]), int(offsets[k + 1])) for k in keep] + [torch.zeros(0).long()])
    return keep, rows, M.offsets_from_sizes(sizes[keep])


# ---------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_posterior_properties(cases, device, dtype):
    for g in cases(36):
        z64, offsets, counts, sizes = binary_case(g)
        z = z64.to(dtype)
        phi, ll = M.posterior(z.to(device), offsets.to(device), counts.to(device))
        phi, ll = phi.cpu(), ll.cpu()
        assert not phi.isnan().any() and not ll.isnan().any(), (z, counts)
        assert ((phi >= 0) & (phi <= 1)).all()
        assert torch.isfinite(ll).all() and (ll <= 0).all()
        bag = bag_of(offsets)
        assert (phi[(counts == 0)[bag]] == 0).all() and (phi[(counts == sizes)[bag]] == 1).all()
        # sum_i phi_i = y, to rounding: phi is a function of logit differences, so an
        # error of eps |z| is inherent (the logits themselves are only that exact).
        eps = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
        err = (bag_sums(phi.float() if dtype in (torch.float16, torch.bfloat16) else phi, offsets) - counts).abs()
        rounding = 0.0 if dtype in (torch.float64, torch.float32) else (2.0 ** -8 if dtype == torch.float16 else 2.0 ** -7)
        zmax = torch.zeros(len(sizes), dtype=torch.float64).scatter_reduce(0, bag, z.double().abs(), "amax")
        assert (err <= sizes * (16 * eps * (1 + zmax) + rounding)).all(), err.max()
        # non-contiguous inputs: bitwise the same
        phi_s, ll_s = M.posterior(strided(z.to(device)), strided(offsets.to(device)), strided(counts.to(device)))
        assert_same(phi_s.cpu(), phi) and assert_same(ll_s.cpu(), ll)


@pytest.mark.parametrize("device", DEVICES)
def test_posterior_matches_enumeration_at_any_magnitude(cases, device):
    for g in cases(45):
        z, offsets, counts, _ = binary_case(g, num_bags=30, max_size=9)
        phi, ll = M.posterior(z.to(device), offsets.to(device), counts.to(device))
        ref_phi, ref_ll = posterior_enumerate(z, offsets, counts)
        assert (phi.cpu() - torch.from_numpy(ref_phi)).abs().max() <= 1e-9
        assert ((ll.cpu() - torch.from_numpy(ref_ll)).abs() <= 1e-12 * torch.from_numpy(ref_ll).abs() + 1e-9).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_nan_and_neighbours(cases, device, dtype):
    """A NaN stays in its bag; each bag's result is the same alone as among others."""
    for g in cases(30):
        z, offsets, counts, sizes = binary_case(g)
        z = z.to(dtype)
        phi, ll = M.posterior(z.to(device), offsets.to(device), counts.to(device))
        bad, b = with_nan_in_one_bag(g, z, offsets, sizes)
        assert_nan_only_in_bag(M.posterior(bad.to(device), offsets.to(device), counts.to(device)), (phi, ll),
                               offsets, b)
        keep, rows, sub = some_bags(g, offsets, sizes)
        phi_k, ll_k = M.posterior(z[rows].to(device), sub.to(device), counts[keep].to(device))
        assert_same(phi_k.cpu(), phi.cpu()[rows]) and assert_same(ll_k.cpu(), ll.cpu()[keep])


@pytest.mark.parametrize("device", DEVICES)
def test_posterior_infinite_logits(cases, device):
    """+-inf logits: phi in [0, 1] or NaN only where the count is impossible (log_lik -inf)."""
    for g in cases(30):
        z, offsets, counts, sizes = binary_case(g)
        inf = torch.rand(len(z), generator=g) < 0.2
        z = torch.where(inf, torch.where(z > 0, math.inf, -math.inf), z)
        phi, ll = M.posterior(z.to(device), offsets.to(device), counts.to(device))
        phi, ll = phi.cpu(), ll.cpu()
        assert not ll.isnan().any()
        ref_phi, ref_ll = posterior_enumerate(z, offsets, counts)
        assert torch.equal(ll == -math.inf, torch.from_numpy(ref_ll) == -math.inf)
        possible = (ll > -math.inf)[bag_of(offsets)]
        assert phi[~possible].isnan().all()
        assert ((phi[possible] >= 0) & (phi[possible] <= 1)).all()
        assert ((phi[possible] - torch.from_numpy(ref_phi)[possible]).abs() <= 1e-9).all()


# ---------------------------------------------------------------------------- log_pmf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_pmf_properties(cases, device, dtype):
    for g in cases(30):
        z, offsets, _, sizes = binary_case(g, max_size=9)
        out = M.log_pmf(z.to(dtype).to(device), offsets.to(device)).cpu()
        assert not out.isnan().any() and (out <= 0).all()
        where = torch.repeat_interleave(torch.arange(len(sizes)), sizes + 1)
        total = torch.full((len(sizes),), -math.inf, dtype=torch.float64).scatter_reduce(
            0, where, out.double(), "amax")
        mass = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, where, (out.double() - total[where]).exp())
        assert ((mass.log() + total).abs() <= 64 * EPS[dtype] * (sizes + 1)).all()
        if dtype == torch.float64:
            ref = torch.from_numpy(log_pmf_enumerate(z, offsets))
            finite = ref > -math.inf
            assert torch.equal(out > -math.inf, finite)
            assert ((out[finite] - ref[finite]).abs() <= 1e-12 * ref[finite].abs() + 1e-9).all()
        bad, b = with_nan_in_one_bag(g, z, offsets, sizes)
        out_n = M.log_pmf(bad.to(dtype).to(device), offsets.to(device)).cpu()
        assert out_n[where == b].isnan().all() and torch.equal(out_n[where != b], out[where != b])


# ---------------------------------------------------------------------------- posterior_weighted


def random_log_weights(g, sizes):
    """Per bag: one of exact, interval, laplace, gaussian, randomized response, or raw
    random log-weights with some -inf; at least one finite weight per bag."""
    parts = []
    for n in sizes.tolist():
        kind = int(torch.randint(0, 6, (1,), generator=g))
        one = torch.tensor([n])
        y = int(torch.randint(0, n + 1, (1,), generator=g))
        if kind == 0:
            w = cw.exact([y], one)
        elif kind == 1:
            w = cw.interval([min(y, n - 1) if n else 0], [n], one)
        elif kind == 2:
            w = cw.laplace([y + int(torch.randint(-3, 4, (1,), generator=g))],
                           10 ** (float(torch.rand(1, generator=g)) * 40 - 20), one)
        elif kind == 3:
            w = cw.gaussian([y + float(torch.randn(1, generator=g))], 10 ** (float(torch.rand(1, generator=g)) * 8 - 4), one)
        elif kind == 4:
            w = cw.randomized_response([y], float(torch.rand(1, generator=g)), one)
        else:
            w = torch.randn(n + 1, generator=g, dtype=torch.float64) * 10 ** float(torch.rand(1, generator=g) * 3)
            w[torch.rand(n + 1, generator=g) < 0.3] = -math.inf
            w[int(torch.randint(0, n + 1, (1,), generator=g))] = float(torch.randn(1, generator=g))
        assert not w.isnan().any() and (w > -math.inf).any(), (kind, n, w)
        parts.append(w)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_weighted_properties(cases, device, dtype):
    for g in cases(30):
        z, offsets, counts, sizes = binary_case(g, num_bags=25, max_size=9)
        logw = random_log_weights(g, sizes)
        zd, od = z.to(dtype).to(device), offsets.to(device)
        phi, ll = M.posterior_weighted(zd, od, logw.to(dtype).to(device))
        phi, ll = phi.cpu(), ll.cpu()
        assert not phi.isnan().any() and not ll.isnan().any() and torch.isfinite(ll).all()
        assert ((phi >= 0) & (phi <= 1)).all()
        # sum_i phi_i = E[S | o], from log_pmf and the weights
        where = torch.repeat_interleave(torch.arange(len(sizes)), sizes + 1)
        k = torch.arange(len(where)) - (offsets[:-1] + torch.arange(len(sizes)))[where]
        joint = logw.to(dtype).double() + M.log_pmf(z.to(dtype).double(), offsets)  # log w(k) P(S = k)
        top = torch.full((len(sizes),), -math.inf, dtype=torch.float64).scatter_reduce(0, where, joint, "amax")
        mass = (joint - top[where]).exp()
        expected = (torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, where, k * mass)
                    / torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, where, mass))
        tol = 1e-7 if dtype == torch.float64 else 2e-3
        assert ((bag_sums(phi, offsets) - expected).abs() <= tol * (sizes + 1)).all()
        # one-hot weights: posterior bit for bit
        exact = cw.exact(counts, sizes).to(dtype).to(device)
        assert_same(M.posterior_weighted(zd, od, exact)[0], M.posterior(zd, od, counts.to(device))[0])
        assert_same(M.posterior_weighted(zd, od, exact)[1], M.posterior(zd, od, counts.to(device))[1])
        # NaN (in a logit or in a weight) stays in its bag; non-contiguous: the same bits
        bad, b = with_nan_in_one_bag(g, z.to(dtype), offsets, sizes)
        bad_w = logw.clone()
        bad_w[int(offsets[b]) + b + int(torch.randint(0, int(sizes[b]) + 1, (1,), generator=g))] = math.nan
        for zz, ww in ((bad, logw), (z.to(dtype), bad_w)):
            assert_nan_only_in_bag(M.posterior_weighted(zz.to(device), od, ww.to(dtype).to(device)), (phi, ll),
                                   offsets, b)
        phi_s, ll_s = M.posterior_weighted(strided(zd), strided(od), strided(logw.to(dtype).to(device)))
        assert_same(phi_s.cpu(), phi) and assert_same(ll_s.cpu(), ll)


# ---------------------------------------------------------------------------- posterior_multiclass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_multiclass_properties(cases, device, dtype):
    for g in cases(24):
        z64, offsets, counts, sizes = multiclass_case(g)
        z = z64.to(dtype)
        phi, ll = M.posterior_multiclass(z.to(device), offsets.to(device), counts.to(device))
        phi, ll = phi.cpu(), ll.cpu()
        bag = bag_of(offsets)
        assert not phi.isnan().any() and torch.isfinite(ll).all()
        assert ((phi >= 0) & (phi <= 1)).all() and (phi[counts[bag] == 0] == 0).all()
        assert ((phi.double().sum(1) - 1).abs() <= 4 * EPS[dtype] * z.shape[1]).all()
        # In log space each entry is good to about eps |log P(y)| (a + log p + g - log P
        # adds numbers of that size), so columns are held to that.
        tol = 8 * EPS[dtype] * (ll.double().abs() + z.shape[1])[bag]
        assert ((bag_sums(phi, offsets) - counts).abs() <= bag_sums(tol, offsets).unsqueeze(1) + 1e-12).all()
        if dtype == torch.float64:
            for b in range(len(sizes)):
                s, e = int(offsets[b]), int(offsets[b + 1])
                ref_phi, ref_ll = multiclass_brute_force(z[s:e], counts[b])
                assert abs(float(ll[b]) - ref_ll) <= 1e-12 * abs(ref_ll) + 1e-9
                if e > s:
                    assert (phi[s:e] - ref_phi).abs().max() <= 1e-9
        bad, b = with_nan_in_one_bag(g, z, offsets, sizes)
        assert_nan_only_in_bag(M.posterior_multiclass(bad.to(device), offsets.to(device), counts.to(device)),
                               (phi, ll), offsets, b)
        phi_s, ll_s = M.posterior_multiclass(strided(z.to(device)), strided(offsets.to(device)),
                                             strided(counts.to(device)))
        assert_same(phi_s.cpu(), phi) and assert_same(ll_s.cpu(), ll)


# ---------------------------------------------------------------------------- approximate E-step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_approximate_estep_properties(cases, device, dtype):
    for g in cases(36):
        z64, offsets, counts, sizes = multiclass_case(g, num_bags=15, max_size=8)
        z = z64.to(dtype)
        iterations = int(torch.randint(1, 200, (1,), generator=g))  # converged or not, rows hold
        phi, ll = M.posterior_multiclass_approx(z.to(device), offsets.to(device), counts.to(device),
                                                max_iterations=iterations)
        phi, ll = phi.cpu(), ll.cpu()
        bag = bag_of(offsets)
        assert not phi.isnan().any() and torch.isfinite(ll).all(), (z, counts)
        assert ((phi >= 0) & (phi <= 1)).all() and (phi[counts[bag] == 0] == 0).all()
        assert ((phi.double().sum(1) - 1).abs() <= 4 * EPS[dtype] * z.shape[1]).all()
        bad, b = with_nan_in_one_bag(g, z, offsets, sizes)
        assert_nan_only_in_bag(M.posterior_multiclass_approx(bad.to(device), offsets.to(device), counts.to(device),
                                                             max_iterations=iterations), (phi, ll), offsets, b)
        # each bag is fitted on its own: the same alone as among others
        for k in torch.randperm(len(sizes), generator=g)[:4].tolist():
            rows = slice(int(offsets[k]), int(offsets[k + 1]))
            phi_k, ll_k = M.posterior_multiclass_approx(z[rows].to(device), offsets[k:k + 2].to(device) - offsets[k],
                                                        counts[k:k + 1].to(device), max_iterations=iterations)
            assert_same(phi_k.cpu(), phi[rows]) and assert_same(ll_k.cpu(), ll[k:k + 1])


def test_approximate_estep_converged_columns(cases):
    """Where it converges, columns sum to the counts within tol. Logits ~ N(0, 1): with
    confident instances the fitted matrix nears one with zeros, and Sinkhorn slows to
    thousands of iterations a digit (N(0, 2^2) already gives such bags now and then)."""
    for g in cases(15):
        sizes = torch.randint(0, 9, (10,), generator=g)
        z = torch.randn(int(sizes.sum()), 4, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 4, (len(z),), generator=g)
        bag = torch.repeat_interleave(torch.arange(10), sizes)
        counts = torch.zeros(10, 4, dtype=torch.long).index_put_((bag, labels), torch.ones_like(labels),
                                                                  accumulate=True)
        offsets = M.offsets_from_sizes(sizes)
        phi, _ = M.posterior_multiclass_approx(z, offsets, counts, max_iterations=10_000, tol=1e-9)
        assert ((bag_sums(phi, offsets) - counts).abs() <= 1e-9).all()


# ---------------------------------------------------------------------------- phi_jvp


@pytest.mark.parametrize("device", DEVICES)
def test_phi_jvp_properties(cases, device):
    """J = Cov(h | S = y): J 1 = 0 (Cov(h_i, S | S) = 0), <u, J v> = <v, J u>, finite."""
    for g in cases(30):
        z, offsets, counts, sizes = binary_case(g, max_size=9)
        u, v = torch.randn(len(z), generator=g, dtype=torch.float64), torch.randn(len(z), generator=g, dtype=torch.float64)
        jvp = lambda t: torch.ops.mlellp.phi_jvp(t.to(device), z.to(device), offsets.to(device),  # noqa: E731
                                                 counts.to(device)).cpu()
        ju, jv, j1 = jvp(u), jvp(v), jvp(torch.ones_like(z))
        assert torch.isfinite(ju).all() and torch.isfinite(j1).all()
        assert (bag_sums(j1.abs(), offsets) <= 1e-9 * (sizes + 1)).all()
        assert ((bag_sums(u * jv, offsets) - bag_sums(v * ju, offsets)).abs() <= 1e-9 * (sizes + 1) ** 2).all()


# ---------------------------------------------------------------------------- helpers and losses


def test_count_weights_at_any_scale(cases):
    """Never NaN or +inf at scales 1e-300..1e300; where the observation is a count of
    the bag, its own weight is finite and the largest; and each noise model is a
    probability distribution (its weights over a wide enough bag sum to 1)."""
    for g in cases(60):
        sizes = torch.randint(1, 12, (6,), generator=g)
        scale = 10 ** (torch.rand(6, generator=g, dtype=torch.float64) * 600 - 300)  # 1e-300 .. 1e300
        observed = torch.minimum((torch.rand(6, generator=g, dtype=torch.float64) * (sizes + 1)).floor(), sizes)
        where = torch.repeat_interleave(torch.arange(6), sizes + 1)
        at_o = torch.arange(len(where)) == (M.offsets_from_sizes(sizes)[:-1] + torch.arange(6) + observed.long())[where]
        for w in (cw.laplace(observed, scale, sizes), cw.gaussian(observed, scale, sizes)):
            assert not w.isnan().any() and (w < math.inf).all()
            assert torch.isfinite(w[at_o]).all()
            top = torch.full((6,), -math.inf, dtype=torch.float64).scatter_reduce(0, where, w, "amax")
            assert torch.equal(w[at_o], top)
        off = cw.gaussian(observed + 0.5, scale, sizes)  # between two counts: all -inf only at tiny sigma
        assert not off.isnan().any() and (off < math.inf).all()
        keep = torch.rand(6, generator=g, dtype=torch.float64)
        rr = cw.randomized_response(observed.long(), keep, sizes)  # log P(o | S = k): probabilities
        assert not rr.isnan().any() and (rr <= 1e-12).all()
        # normalised: the weights of a wide bag around o sum to 1, the Laplace noise's
        # at scales 0.3..30; the Gaussian's, a density at integers, at sigma 1..30
        s = float(10 ** (torch.rand(1, generator=g) * 2 - 0.5))
        wide = torch.tensor([2000])
        for w in (cw.laplace([1000], s, wide),
                  cw.gaussian([1000.0 + float(torch.rand(1, generator=g))], max(s, 1.0), wide)):
            assert abs(float(w.exp().sum()) - 1) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_losses_properties(cases, device):
    for g in cases(30):
        z, offsets, counts, sizes = binary_case(g)
        args = (z.to(device).requires_grad_(), offsets.to(device), counts.to(device))
        for fn in (M.dllp_loss, M.bag_log_likelihood):
            per_bag = fn(*args, reduction="none")
            assert not per_bag.isnan().any()
            assert torch.allclose(fn(*args, reduction="mean") * len(sizes), fn(*args, reduction="sum"))
            grad, = torch.autograd.grad(fn(*args).sum(), args[0])
            assert torch.isfinite(grad).all()
        assert (M.dllp_loss(*args, reduction="none") >= 0).all()
    for fn in (M.dllp_loss, M.bag_log_likelihood):  # zero bags: 0, the empty sum, with a zero gradient
        z = torch.zeros(0, requires_grad=True)
        loss = fn(z, torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        assert loss.item() == 0
        loss.backward()
        assert z.grad is not None and z.grad.numel() == 0


@pytest.mark.parametrize("estep", ["exact", "approx", "auto"])
def test_em_targets_properties(cases, estep):
    for g in cases(12):
        z, offsets, counts, sizes = multiclass_case(g, num_bags=10, max_size=6)
        em = M.EMTargets(offsets, counts, estep=estep, max_states=64)
        L = em.update(z)
        assert math.isfinite(L)
        t = em.targets(torch.arange(len(z)))
        assert ((t >= 0) & (t <= 1)).all() and ((t.double().sum(1) - 1).abs() <= 1e-5).all()
        with pytest.raises(IndexError, match=f"position {len(z)} is out of range"):
            em.targets(torch.tensor([0, len(z)]))


# ---------------------------------------------------------------------------- what the contract forbids


def _binary_mutations(z, offsets, counts, sizes, g):
    """(argument, logits, offsets, counts) with one thing wrong."""
    nonempty = torch.nonzero(sizes > 0).flatten()
    b = int(nonempty[torch.randint(0, len(nonempty), (1,), generator=g)])
    over, neg = counts.clone(), counts.clone()
    over[b] = sizes[b] + 1
    neg[b] = -1
    back = offsets.clone()
    back[b + 1] = back[b] - 1 if back[b] > 0 else -1
    short = offsets.clone()
    short[-1] -= 1
    return [("counts", z, offsets, over), ("counts", z, offsets, neg), ("offsets", z, back, counts),
            ("offsets", z, short, counts), ("offsets", z, offsets.double(), counts),
            ("counts", z, offsets, counts.double()), ("logits", z.long(), offsets, counts),
            ("offsets", z, offsets.unsqueeze(0), counts), ("counts", z, offsets, counts[:-1])]


@pytest.mark.parametrize("device", DEVICES)
def test_forbidden_inputs_raise_value_errors_naming_the_argument(cases, device):
    for g in cases(9):
        z, offsets, counts, sizes = binary_case(g, num_bags=8, max_size=6)
        sizes[0] = max(int(sizes[0]), 1)
        z = wild_logits(g, (int(sizes.sum()),))
        offsets = M.offsets_from_sizes(sizes)
        counts = edge_counts(g, sizes)
        for name, zz, oo, cc in _binary_mutations(z, offsets, counts, sizes, g):
            zz, oo, cc = zz.to(device), oo.to(device), cc.to(device)
            calls = {
                "posterior": lambda: M.posterior(zz, oo, cc),
                "dllp_loss": lambda: M.dllp_loss(zz, oo, cc),
                "phi_jvp": lambda: torch.ops.mlellp.phi_jvp(torch.ones_like(zz, dtype=torch.float64), zz, oo, cc),
            }
            if name != "counts":
                calls["log_pmf"] = lambda: M.log_pmf(zz, oo)
            for op, call in calls.items():
                with pytest.raises(ValueError, match=rf"{op}: .*\b{name}\b"):
                    call()
        # multi-class: a count vector that does not sum to its bag's size
        zm, om, cm, sm = multiclass_case(g, num_bags=6)
        cm = cm.clone()
        cm[int(torch.nonzero(sm >= 0)[0]), 0] += 1
        for op, fn in (("posterior_multiclass", M.posterior_multiclass),
                       ("posterior_multiclass_approx", M.posterior_multiclass_approx)):
            with pytest.raises(ValueError, match=rf"{op}: counts\[\d+\]"):
                fn(zm.to(device), om.to(device), cm.to(device))
    with pytest.raises(ValueError, match="max_states must be an integer, got 1.5"):
        M.posterior_multiclass(torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([[1, 1]]), max_states=1.5)
