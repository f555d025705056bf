"""Likelihoods of what was observed of each bag's count, in :func:`~mlellp_ext.posterior_weighted`'s layout.

Each helper returns ``count_log_weights``, a flat (N + B,) float64 tensor holding
bag b's ``log w_b(k) = log P(o_b | S_b = k)`` for k = 0..n_b at positions
``offsets[b] + b + k`` (``offsets = offsets_from_sizes(sizes)``; the layout of
:func:`~mlellp_ext.log_pmf`'s output), on the device of ``sizes``. Constant
factors do not matter to the posteriors; the ones below are normalised as
stated so that log-likelihoods compare across noise models.

* :func:`exact`: ``w(k) = 1{k = y}``.
* :func:`interval`: ``w(k) = 1{lo <= k <= hi}`` ("3 or 4"; "at most one").
* :func:`laplace`: o = S + e with e discrete Laplace (two-sided geometric),
  ``P(e) = (1 - a) / (1 + a) * a^|e|``, ``a = exp(-1 / scale)``: the label-DP
  mechanism of :func:`privatize`.
* :func:`gaussian`: o = S + e with e ~ N(0, sigma^2) (o real):
  ``w(k) = exp(-(o - k)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``.
* :func:`randomized_response`: every instance label is reported truthfully with
  probability ``keep`` and replaced by a fair coin otherwise, and o is the sum of
  the reports: ``w(k) = P(Bin(k, keep + (1 - keep)/2) + Bin(n - k, (1 - keep)/2) = o)``.

:func:`privatize` releases counts with the discrete Laplace mechanism at a given
epsilon (label differential privacy by aggregation).
"""
from __future__ import annotations

import math

import torch

from .bags import count_slots, offsets_from_sizes

__all__ = ["exact", "gaussian", "interval", "laplace", "privatize", "randomized_response"]


def _sizes(sizes, op) -> torch.Tensor:
    sizes = torch.as_tensor(sizes)
    if sizes.dim() != 1 or sizes.is_floating_point() or sizes.dtype == torch.bool:
        raise ValueError(f"count_weights.{op}: sizes must be a 1-D integer tensor (bag sizes), got dtype "
                         f"{sizes.dtype}, shape {list(sizes.shape)}")
    if sizes.numel() and int(sizes.min()) < 0:
        raise ValueError(f"count_weights.{op}: sizes must be non-negative, got {int(sizes.min())}")
    return sizes.long()


def _per_bag(value, sizes, name, op, integer=False) -> torch.Tensor:
    # Python numbers in float64 (as_tensor would read 0.6 as float32, off by 2e-8).
    t = torch.as_tensor(value, device=sizes.device,
                        dtype=None if integer or isinstance(value, torch.Tensor) else torch.float64)
    if t.dim() == 0:
        t = t.expand(sizes.shape[0])
    if t.shape != sizes.shape:
        raise ValueError(f"count_weights.{op}: {name} must be a scalar or have one entry per bag "
                         f"({sizes.shape[0]}), got shape {list(t.shape)}")
    if integer and (t.is_floating_point() or t.dtype == torch.bool):
        raise ValueError(f"count_weights.{op}: {name} must be integers, got dtype {t.dtype}")
    if not integer:
        t = t.double()
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0])
            raise ValueError(f"count_weights.{op}: {name} must be finite, got {float(t[b])} for bag {b}")
    return t


def _positive(t, name, op) -> torch.Tensor:
    if bool((t <= 0).any()):
        b = int(torch.nonzero(t <= 0)[0])
        raise ValueError(f"count_weights.{op}: {name} must be positive, got {float(t[b])} for bag {b}")
    return t


def _grid(sizes):
    """(k, bag) of every position of the layout: k = 0..n_b of bag b, bag after bag."""
    return count_slots(offsets_from_sizes(sizes))


def exact(counts, sizes) -> torch.Tensor:
    """``log w_b(k) = 0`` at ``k = counts[b]``, -inf elsewhere (an exact count;
    :func:`~mlellp_ext.posterior_weighted` then equals :func:`~mlellp_ext.posterior`)."""
    return interval(counts, counts, sizes, _op="exact")


def interval(lo, hi, sizes, *, _op="interval") -> torch.Tensor:
    """``log w_b(k) = 0`` for ``lo[b] <= k <= hi[b]``, -inf elsewhere: the true count lies
    in [lo, hi] (inclusive), nothing else known. Needs ``0 <= lo <= hi <= n``."""
    sizes = _sizes(sizes, _op)
    lo = _per_bag(lo, sizes, "lo" if _op == "interval" else "counts", _op, integer=True)
    hi = _per_bag(hi, sizes, "hi", _op, integer=True)
    bad = (lo < 0) | (hi < lo) | (hi > sizes)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        what = (f"lo = {int(lo[b])}, hi = {int(hi[b])}" if _op == "interval" else f"count {int(lo[b])}")
        raise ValueError(f"count_weights.{_op}: bag {b} of size {int(sizes[b])} has {what}; need "
                         f"0 <= {'lo <= hi' if _op == 'interval' else 'count'} <= size")
    k, bag = _grid(sizes)
    inside = (k >= lo[bag]) & (k <= hi[bag])
    return torch.where(inside, 0.0, -math.inf).double()


def laplace(observed, scale, sizes) -> torch.Tensor:
    """o = S + e, e discrete Laplace (the two-sided geometric mechanism):
    ``P(e) = (1 - a) / (1 + a) * a^|e|``, ``a = exp(-1 / scale)``, so
    ``log w_b(k) = log((1 - a) / (1 + a)) - |o_b - k| / scale``. ``observed``: integers
    (may lie outside 0..n); ``scale`` > 0 (1/epsilon for :func:`privatize`'s counts)."""
    sizes = _sizes(sizes, "laplace")
    o = _per_bag(observed, sizes, "observed", "laplace")
    s = _positive(_per_bag(scale, sizes, "scale", "laplace"), "scale", "laplace")
    k, bag = _grid(sizes)
    # log(1 - a) as log(-expm1(-1/s)): 1 - a rounds to 0 for scales past ~1e16.
    log_norm = torch.log(-torch.expm1(-1.0 / s)) - torch.log1p(torch.exp(-1.0 / s))
    return log_norm[bag] - (o[bag] - k.double()).abs() / s[bag]


def gaussian(observed, sigma, sizes) -> torch.Tensor:
    """o = S + e, e ~ N(0, sigma^2): ``log w_b(k) = -(o_b - k)^2 / (2 sigma^2) -
    log(sigma sqrt(2 pi))``. ``observed``: real numbers; ``sigma`` > 0."""
    sizes = _sizes(sizes, "gaussian")
    o = _per_bag(observed, sizes, "observed", "gaussian")
    sd = _positive(_per_bag(sigma, sizes, "sigma", "gaussian"), "sigma", "gaussian")
    k, bag = _grid(sizes)
    # Divide before squaring: sigma^2 underflows to 0 below ~1e-154 (0 / 0 at k = o).
    return -0.5 * ((o[bag] - k.double()) / sd[bag]) ** 2 - torch.log(sd[bag]) - 0.5 * math.log(2 * math.pi)


def randomized_response(observed, keep, sizes) -> torch.Tensor:
    """Each instance reports its label truthfully with probability ``keep`` and a fair
    coin otherwise; ``observed`` is the bag's number of reported positives (0..n).
    ``w_b(k) = P(Bin(k, t) + Bin(n - k, f) = o)`` with ``t = (1 + keep) / 2``,
    ``f = (1 - keep) / 2`` (a convolution of two binomials, computed in log space).
    Not differentiable w.r.t. ``keep`` (``laplace`` and ``gaussian`` are, in their
    scale and observation)."""
    sizes = _sizes(sizes, "randomized_response")
    o = _per_bag(observed, sizes, "observed", "randomized_response", integer=True)
    p = _per_bag(keep, sizes, "keep", "randomized_response")
    bad = (o < 0) | (o > sizes)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(f"count_weights.randomized_response: observed must be within 0..size, got "
                         f"{int(o[b])} for bag {b} of size {int(sizes[b])}")
    if bool(((p < 0) | (p > 1)).any()):
        b = int(torch.nonzero((p < 0) | (p > 1))[0])
        raise ValueError(f"count_weights.randomized_response: keep must be in [0, 1], got {float(p[b])} for bag {b}")
    out = []
    for b in range(sizes.shape[0]):  # O(n^2) per bag; these bags are small, and this is set up once
        n, ob = int(sizes[b]), int(o[b])
        t, f = (1 + float(p[b])) / 2, (1 - float(p[b])) / 2
        row = []
        for k in range(n + 1):
            j = torch.arange(0, min(k, ob) + 1, dtype=torch.float64)  # true positives reported positive
            r = ob - j  # true negatives reported positive
            ok = r <= n - k
            terms = (_log_binom(k, j, t) + _log_binom(n - k, r, f))[ok]
            row.append(torch.logsumexp(terms, 0) if terms.numel() else torch.tensor(-math.inf, dtype=torch.float64))
        out.append(torch.stack(row))
    return torch.cat(out).to(sizes.device) if out else torch.zeros(0, dtype=torch.float64, device=sizes.device)


def _log_binom(n, j, prob):
    """log P(Bin(n, prob) = j) for a tensor j (-inf outside 0..n; prob may be 0 or 1)."""
    j = torch.as_tensor(j, dtype=torch.float64)
    lc = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    with torch.no_grad():
        lp = torch.xlogy(j, torch.tensor(prob, dtype=torch.float64)) + \
            torch.xlogy(n - j, torch.tensor(1 - prob, dtype=torch.float64))
    return torch.where((j >= 0) & (j <= n), lc + lp, torch.full_like(j, -math.inf))


def privatize(counts, epsilon: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Counts released with epsilon-label differential privacy: ``counts + e`` with e
    discrete Laplace of scale 1/epsilon (each instance's label changes a count by at
    most 1, so this is the geometric mechanism of Ghosh et al. 2009). Returns int64
    noisy counts (they may be negative or exceed the bag size; do not clip them
    before :func:`laplace`, which models them as released). ``epsilon = inf`` returns
    the counts unchanged. Seeded by ``generator`` (CPU)."""
    counts = torch.as_tensor(counts)
    if counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(f"count_weights.privatize: counts must be integers, got dtype {counts.dtype}")
    epsilon = float(epsilon)
    if not epsilon > 0:
        raise ValueError(f"count_weights.privatize: epsilon must be positive, got {epsilon}")
    if math.isinf(epsilon):
        return counts.long().clone()
    a = math.exp(-epsilon)
    # The difference of two geometric variables (failures before a success, success
    # probability 1 - a) is discrete Laplace with parameter a.
    u = torch.rand((2, *counts.shape), generator=generator, dtype=torch.float64)
    geo = torch.floor(torch.log1p(-u) / math.log(a)).long() if a > 0 else torch.zeros_like(u, dtype=torch.long)
    return counts.long() + (geo[0] - geo[1]).to(counts.device)
