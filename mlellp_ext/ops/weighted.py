"""The E-step under uncertain counts and the whole count distribution:
mlellp::posterior_weighted and mlellp::log_pmf (fake kernels, autograd, vmap
rules) and their Python API. Both lay out n_b + 1 values per bag, bag b's count k
at ``offsets[b] + b + k`` (:func:`mlellp_ext.bags.count_slot_offsets`).

Their first derivatives are Functions whose own derivatives raise (phi has no
derivative kernel here); forward mode raises too.
"""
from __future__ import annotations

import functools

import torch

from ..bags import bag_index, count_slot_bags, count_slot_offsets, split_nested
from ._checks import check_layout, check_not_nested, check_weighted_layout, compute_dtype
from ._dispatch import (FirstDerivativeFn, apply, bag_sums, batch_call, batched, below_autograd, empty_phi_log_lik,
                        refuse, register, tiled_offsets, vmap_phi_log_lik)

_SECOND_ORDER = ("second derivatives of mlellp::posterior_weighted and mlellp::log_pmf are not "
                 "supported (phi has no derivative there)")


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("mlellp::posterior_weighted")
def _posterior_weighted_fake(logits, offsets, count_log_weights):
    check_weighted_layout("posterior_weighted", logits, offsets, count_log_weights)
    return empty_phi_log_lik(logits, offsets.shape[0] - 1)


@torch.library.register_fake("mlellp::log_pmf")
def _log_pmf_fake(logits, offsets):
    check_layout("log_pmf", logits, offsets)
    size = logits.shape[0] + offsets.shape[0] - 1
    return logits.new_empty((size,), dtype=compute_dtype(logits.dtype))


# ------------------------------------------------------------------ vmap rules
def _log_pmf_vmap(call, info, in_dims, logits, offsets):
    logits = batched(logits, in_dims[0], info.batch_size)
    tiled = tiled_offsets("log_pmf", logits, offsets, in_dims[1], check_layout)
    # Entry k's bag b holds its n_b + 1 values from tiled[kB + b] + kB + b =
    # k (n + B) + offsets[b] + b: each entry's block is contiguous, laid out as unbatched.
    out = batch_call(call, logits, offsets, logits.reshape(-1), tiled)
    return out.view(logits.shape[0], logits.shape[1] + offsets.shape[0] - 1), 0


# Entry k's bag b has its weights at tiled[kB + b] + kB + b = k (N + B) + offsets[b] + b:
# each entry's weights contiguous, laid out as unbatched (as log_pmf's output), so the
# counts' rule serves.
_posterior_weighted_vmap = functools.partial(vmap_phi_log_lik, op="posterior_weighted")


# -------------------------------------------------------------------- autograd
def _log_pmf_vjp(grad, logits, offsets, log_pmf_out):
    """sum_k grad_b(k) d log P(S_b = k) / d logits (see _LogPmfFn). In float64 whatever
    the dtype: the weights log g - log P carry |log P| * eps of rounding into phi. Counts
    the logits make impossible (log P = -inf) carry no derivative; a NaN or infinite
    gradient entry makes its bag's result NaN."""
    g, lp, z = grad.double(), log_pmf_out.double(), logits.double()
    num_bags = offsets.shape[0] - 1
    bag_of_k = count_slot_bags(offsets, g.shape[0])
    possible = lp > -torch.inf
    g = torch.where(possible, g, torch.zeros_like(g))
    # Out-of-place sums (bag_sums) so that vmap can batch them (jacrev, vmap(grad)).
    bad = bag_sums((~torch.isfinite(g)).double(), bag_of_k, num_bags) > 0
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    sigma = torch.sigmoid(z)
    index = bag_index(offsets, logits.shape[0])
    out = torch.zeros_like(sigma)
    for sign, part in ((1.0, g.clamp(min=0)), (-1.0, (-g).clamp(min=0))):
        total = bag_sums(part, bag_of_k, num_bags)
        logw = torch.where(part > 0, part.log() - lp, torch.full_like(part, -torch.inf))
        phi, _ = below_autograd("posterior_weighted", z, offsets, logw)
        used = (total > 0)[index]
        out = out + sign * torch.where(used, total[index] * (phi - sigma), torch.zeros_like(sigma))
    out = torch.where(bad[index], torch.full_like(out, torch.nan), out)
    return out.to(logits.dtype)


class _LogPmfFn(torch.autograd.Function):
    """Reverse mode through posterior_weighted: for bag b and a gradient g_b(k) of
    log P(S_b = k), sum_k g_b(k) (P(h_i = 1 | S_b = k) - sigma_i) = G (phi^w_i - sigma_i)
    with weights w(k) = g_b(k) / P(S_b = k) and G = sum_k g_b(k) (phi^w: the op's
    phi under those weights); g's positive and negative parts take one pass each."""

    @staticmethod
    def forward(logits, offsets):
        return below_autograd("log_pmf", logits, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, offsets = inputs
        ctx.save_for_backward(logits, offsets, output)

    @staticmethod
    def backward(ctx, grad):
        logits, offsets, out = ctx.saved_tensors
        return _LogPmfVjpFn.apply(grad, logits, offsets, out), None

    jvp = refuse("mlellp::log_pmf has no forward-mode derivative (reverse mode works)")


class _LogPmfVjpFn(FirstDerivativeFn):
    """log_pmf's vector-Jacobian product."""

    backward = jvp = refuse(_SECOND_ORDER)

    @staticmethod
    def forward(grad, logits, offsets, log_pmf_out):
        return _log_pmf_vjp(grad, logits, offsets, log_pmf_out)


class _PosteriorWeightedFn(torch.autograd.Function):
    """Reverse mode through log_likelihood: w.r.t. the logits g_b (phi_i - sigma_i),
    w.r.t. count_log_weights g_b P(S_b = k | o_b), the posterior of the true count
    (from log_pmf). phi is a non-differentiable output (as posterior_multiclass's);
    second derivatives and forward mode raise."""

    @staticmethod
    def forward(logits, offsets, count_log_weights):
        return below_autograd("posterior_weighted", logits, offsets, count_log_weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, offsets, count_log_weights = inputs
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[0])
        ctx.save_for_backward(output[0], output[1], logits, offsets, count_log_weights)

    @staticmethod
    def backward(ctx, _grad_phi, grad_log_lik):
        if grad_log_lik is None:
            return None, None, None
        phi, log_lik, logits, offsets, logw = ctx.saved_tensors
        return _WeightedLogLikGradFn.apply(grad_log_lik, phi, log_lik, logits, offsets, logw,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[2])

    jvp = refuse("mlellp::posterior_weighted has no forward-mode derivative")


class _WeightedLogLikGradFn(FirstDerivativeFn):
    """(g, phi, log_lik, z, log w) -> (grad of the logits, grad of the log-weights)."""

    backward = jvp = refuse(_SECOND_ORDER)

    @staticmethod
    def forward(grad_log_lik, phi, log_lik, logits, offsets, logw, want_logits, want_weights):
        grad_logits = grad_weights = None
        if want_logits:
            grad_logits = below_autograd("posterior_backward", grad_log_lik, phi, logits, offsets)
        if want_weights:
            dtype = compute_dtype(logits.dtype)
            lp = below_autograd("log_pmf", logits, offsets).to(dtype)
            bag_of_k = count_slot_bags(offsets, lp.shape[0])
            w = logw.to(dtype)
            post = torch.where(w > -torch.inf, (w + lp - log_lik.to(dtype)[bag_of_k]).exp(), torch.zeros_like(w))
            grad_weights = (grad_log_lik.to(dtype)[bag_of_k] * post).to(logw.dtype)
        return grad_logits, None, grad_weights


register("log_pmf", _LogPmfFn, _log_pmf_vmap)
register("posterior_weighted", _PosteriorWeightedFn, _posterior_weighted_vmap)


# ------------------------------------------------------------------ Python API
def log_pmf(logits, offsets=None):
    """Whole log-PMF of every bag's count: ``log P(S_b = k)`` for k = 0..n_b.

    Args:
        logits: (N,) or a ``torch.nested`` jagged tensor (then omit offsets).
        offsets: (B + 1,) int64 as in :func:`posterior`.

    Returns:
        (N + B,) flat tensor; bag b's ``log P(S_b = k)`` is at
        ``offsets[b] + b + k``. Returned as a jagged nested tensor (B, n_b + 1)
        when logits is nested. dtype as ``log_likelihood`` of
        :func:`posterior`. Differentiable w.r.t. logits in reverse mode (first
        order; each backward is two :func:`posterior_weighted` passes); for the
        log-likelihood of observed counts :func:`bag_log_likelihood` is cheaper.

    Example:
        >>> out = log_pmf(torch.tensor([0.0, 0.0]), offsets_from_sizes([2]))
        >>> out.exp()  # P(S = 0, 1, 2) of two fair coins
        tensor([0.2500, 0.5000, 0.2500])
    """
    flat, offsets, _, nested = split_nested(logits, offsets, None, "log_pmf", takes_counts=False)
    out = apply(_LogPmfFn, torch.ops.mlellp.log_pmf, flat, offsets)
    if nested:
        out = torch.nested.nested_tensor_from_jagged(out, count_slot_offsets(offsets))
    return out


def posterior_weighted(logits, offsets, count_log_weights):
    """E-step under uncertain counts: posteriors and log-likelihood of each bag's observation.

    Bag b's observation o_b is given by its likelihood ``w_b(k) = P(o_b | S_b = k)`` for
    every true count k = 0..n_b (an exact count: one-hot; an interval: 1 inside, 0
    outside; additive noise o = S + e: ``P_e(o - k)``; :mod:`mlellp_ext.count_weights`
    builds them). Returns ``(phi, log_likelihood)`` with
    ``phi[i] = P(h_i = 1 | o_b)`` and
    ``log_likelihood[b] = log sum_k w_b(k) P(S_b = k)``, exactly, in
    O(n_b * (min(hi, n_b - lo) + 1)) per bag for weights supported on [lo, hi] (as
    :func:`posterior` for one count in that range).

    Args:
        logits: (N,) float32/float64 (float16/bfloat16 computed in float32).
        offsets: (B + 1,) int64, the bag layout of :func:`posterior`.
        count_log_weights: (N + B,) floating, ``log w_b(k)`` at ``offsets[b] + b + k``
            (the layout of :func:`log_pmf`'s output); -inf for a count the
            observation rules out. Only ratios within a bag matter to phi; the
            scale adds to log_likelihood.

    Returns:
        phi: (N,) in the dtype of logits; not differentiable (a tensor that does
            not require grad: EM's fixed target).
        log_likelihood: (B,), dtype as :func:`posterior`'s; differentiable (first
            order) w.r.t. logits (``g_b (phi_i - sigmoid(z_i))``) and w.r.t.
            count_log_weights (``g_b P(S_b = k | o_b)``, the posterior of the true
            count, e.g. to learn a noise model's parameters).
        A bag whose weights are all -inf, or -inf wherever the logits allow mass,
        gets log_likelihood -inf and NaN phi; a NaN (or +inf) weight or a NaN logit
        makes its own bag NaN. One-hot weights give :func:`posterior`'s results
        exactly.

    Example:
        >>> from mlellp_ext import count_weights
        >>> offsets, sizes = offsets_from_sizes([3, 2]), torch.tensor([3, 2])
        >>> w = count_weights.interval(torch.tensor([1, 0]), torch.tensor([2, 1]), sizes)
        >>> phi, ll = posterior_weighted(torch.randn(5), offsets, w)
        >>> phi.shape, ll.shape
        (torch.Size([5]), torch.Size([2]))
    """
    if offsets is None or count_log_weights is None:
        raise ValueError("posterior_weighted: offsets and count_log_weights are required")
    check_not_nested("posterior_weighted", (("logits", logits), ("offsets", offsets),
                                            ("count_log_weights", count_log_weights)))
    return apply(_PosteriorWeightedFn, torch.ops.mlellp.posterior_weighted, logits, offsets, count_log_weights)
