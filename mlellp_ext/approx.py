"""An approximate multi-class E-step for bags whose lattice is too large.

The exact :func:`~mlellp_ext.posterior_multiclass` costs O(C * prod_c (y_c + 1))
per bag, which grows without bound with the bag size (a bag of 64 over 10
classes has hundreds of millions of count vectors). :func:`posterior_multiclass_approx`
costs O(C * n * y) instead:

1. For each class c alone, the exact binary posterior of "instance i is of
   class c" given that the bag holds y_c of them (the binary op on the logit
   of softmax_c, ``z_ic - logsumexp_{d != c} z_id``): a matrix (n, C) whose
   column c sums to y_c exactly but whose rows need not sum to 1.
2. Iterative proportional fitting (Sinkhorn) of that matrix to rows summing to
   1 and columns summing to y: alternately scale each column to y_c and divide
   each row by its sum, bag by bag, until a bag's columns hold within ``tol``.
   Every step ends on the rows, so rows sum to 1 and phi stays in [0, 1] even
   where the columns have not converged.

For C = 2 step 1 already gives the exact posterior. Its error against the exact
op is measured in ``bench/multiclass.py`` (docs/multiclass.md).
:func:`posterior_multiclass_auto` takes the exact E-step where the budget allows
and this one elsewhere, and says which bags it approximated.
"""
from __future__ import annotations

import torch

from .bags import bag_index, bag_positions, check_count_vectors, lattice_states, offsets_from_sizes
from .ops import DEFAULT_MAX_STATES, posterior, posterior_multiclass
from .ops._checks import check_multiclass_layout, compute_dtype
from .ops._dispatch import tile_offsets
from .ops.multiclass import log_softmax_exact


def posterior_multiclass_approx(logits: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, *,
                                max_iterations: int = 200, tol: float = 1e-6):
    """Approximate class posteriors of each bag given its count vector (see the module).

    Args:
        logits, offsets, counts: as in :func:`~mlellp_ext.posterior_multiclass`.
        max_iterations: Sinkhorn iterations at most.
        tol: stop when every column of every bag sums to its count within ``tol``.

    Returns:
        phi: (N, C) in the dtype of logits, in [0, 1], rows summing to 1 (to the
            dtype's rounding), 0 where ``counts[b, c] = 0``; column c of bag b sums to
            ``counts[b, c]`` within ``tol`` once the bag converged. Each bag is fitted
            on its own; one still off after ``max_iterations`` (confident logits
            converge slowly) keeps its rows summing to 1 and its columns as far
            as the fitting got. Not differentiable.
        log_likelihood: (B,) the composite log-likelihood
            ``sum_c log P(S_bc = counts[b, c])`` of the per-class counts, each
            exact, treated as independent. It is not ``log P(counts[b])`` (for C = 2
            it is twice it); EM uses it only through its changes. A bag that some
            class count makes impossible gets -inf and NaN phi; a NaN logit makes
            its own bag NaN.
    """
    op = "posterior_multiclass_approx"
    check_multiclass_layout(op, logits, offsets, counts, 1)
    check_count_vectors(op, logits.shape[0], offsets, counts)
    if not (isinstance(max_iterations, int) and max_iterations >= 1):
        raise ValueError(f"{op}: max_iterations must be a positive integer, got {max_iterations!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{op}: tol must be a positive number, got {tol!r}")
    with torch.no_grad():
        return _approx(logits, offsets, counts, max_iterations, float(tol))


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, without cancellation (-inf at x = 0)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _approx(logits, offsets, counts, max_iterations, tol):
    # float64 throughout: the fitting divides by row sums that float32 would underflow.
    dtype = torch.float64
    z = logits.to(dtype)
    N, C = z.shape
    B = counts.shape[0]
    # logit of softmax_c: z_c - logsumexp of the other classes (exact where
    # log p_c - log(1 - p_c) would round p_c to 1); rows with +inf as the op reads them.
    others = torch.stack([torch.logsumexp(torch.cat([z[:, :c], z[:, c + 1:]], 1), 1) for c in range(C)], 1)
    u = z - others
    has_posinf = torch.isposinf(z).any(1, keepdim=True)
    if bool(has_posinf.any()):
        lp = log_softmax_exact(z)
        u = torch.where(has_posinf, lp - _log1mexp(lp), u)
    # A NaN anywhere in a row makes its bag NaN, as in the exact op (the +inf
    # reading above would otherwise pass over a NaN beside a +inf).
    u = u.masked_fill(z.isnan().any(1, keepdim=True), float("nan"))
    # All classes in one call: class c's bags are the bags again, shifted by c * N.
    phi_c, ll_c = posterior(u.T.reshape(-1).contiguous(), tile_offsets(offsets, C, N),
                            counts.T.reshape(-1).contiguous())
    phi = phi_c.view(C, N).T.contiguous()
    log_lik = ll_c.view(C, B).sum(0)
    bag = bag_index(offsets, N)
    target = counts.to(dtype)
    bad = ~torch.isfinite(log_lik)  # NaN or impossible: phi NaN below, left out of the fitting
    phi = phi.masked_fill(bad[bag].unsqueeze(1), 0.0)
    # A row whose posteriors all underflowed to 0 (a confident prediction its bag's
    # counts rule out) restarts uniform over the bag's classes.
    active = (counts > 0)[bag].to(dtype)
    empty = phi.sum(1) == 0
    phi = torch.where(empty.unsqueeze(1), active, phi)
    phi = _rows_to_one(phi)
    # Each bag is fitted until its own columns hold: a bag's result never depends on
    # another bag (a NaN or a slow bag elsewhere would otherwise add iterations).
    # Every step ends on the rows, so rows sum to 1 and phi lies in [0, 1] whether or
    # not the columns converged.
    sizes = offsets.diff()
    for _ in range(max_iterations):
        sums = _bag_sums(phi, sizes)
        moving = ~(((sums - target).abs() <= tol).all(1) | bad)
        if not bool(moving.any()):
            break
        scale = torch.where(target > 0, target / sums, torch.zeros_like(sums))
        rows = moving[bag].unsqueeze(1)
        phi = torch.where(rows, _rows_to_one(phi * scale[bag]), phi)
    phi = phi.masked_fill(bad[bag].unsqueeze(1), float("nan"))
    return phi.to(logits.dtype), log_lik.to(compute_dtype(logits.dtype))


def _bag_sums(phi, sizes):
    """(B, C) column sums of each bag. segment_reduce sums each bag on its own, in a
    fixed order on either device (index_add_ uses atomics on CUDA, whose order, and
    so whose rounding, would depend on the other bags)."""
    if sizes.numel() == 0:
        return phi.new_zeros(0, phi.shape[1])
    return torch.segment_reduce(phi, "sum", lengths=sizes, axis=0)


def _rows_to_one(phi):
    """Each row divided by its sum (rows are never all 0 here: see _approx)."""
    return phi / phi.sum(1, keepdim=True)


def posterior_multiclass_auto(logits: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, *,
                              max_states: int = DEFAULT_MAX_STATES):
    """The exact E-step for bags within ``max_states`` states, the approximate one
    (:func:`posterior_multiclass_approx`) for the others.

    Returns ``(phi, log_likelihood, approximated)``, the last a (B,) bool tensor
    marking the bags that took the approximation (their log-likelihood is the
    composite one)."""
    op = "posterior_multiclass_auto"
    check_multiclass_layout(op, logits, offsets, counts, max_states)
    check_count_vectors(op, logits.shape[0], offsets, counts)
    approximated = lattice_states(counts) > max_states
    if not bool(approximated.any()):
        return (*posterior_multiclass(logits, offsets, counts, max_states=max_states), approximated)
    if bool(approximated.all()):
        return (*posterior_multiclass_approx(logits, offsets, counts), approximated)
    dtype = compute_dtype(logits.dtype)
    phi = torch.empty_like(logits)
    log_lik = torch.empty(counts.shape[0], dtype=dtype, device=logits.device)
    for mask, fn in ((~approximated, lambda *a: posterior_multiclass(*a, max_states=max_states)),
                     (approximated, posterior_multiclass_approx)):
        which = torch.nonzero(mask).squeeze(1)
        rows = bag_positions(offsets, which)
        sub_phi, sub_ll = fn(logits[rows], offsets_from_sizes(offsets.diff()[which]), counts[which])
        phi[rows] = sub_phi
        log_lik[which] = sub_ll.to(dtype)
    return phi, log_lik, approximated
