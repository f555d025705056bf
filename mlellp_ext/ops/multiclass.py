"""The exact multi-class E-step: mlellp::posterior_multiclass (fake kernel,
autograd, vmap rule) and :func:`posterior_multiclass`."""
from __future__ import annotations

import torch

from ..bags import bag_index
from ._checks import DEFAULT_MAX_STATES, check_max_states, check_multiclass_layout, check_not_nested, compute_dtype
from ._dispatch import (FirstDerivativeFn, apply, batch_call, batched, below_autograd, empty_phi_log_lik, refuse,
                        register, tiled_offsets)


@torch.library.register_fake("mlellp::posterior_multiclass")
def _posterior_multiclass_fake(logits, offsets, counts, max_states=DEFAULT_MAX_STATES):
    check_multiclass_layout("posterior_multiclass", logits, offsets, counts, max_states)
    return empty_phi_log_lik(logits, offsets.shape[0] - 1)


def _posterior_multiclass_vmap(call, info, in_dims, logits, offsets, counts, max_states=DEFAULT_MAX_STATES):
    batch = info.batch_size
    logits = batched(logits, in_dims[0], batch)  # (batch, N, C)
    counts = batched(counts, in_dims[2], batch)  # (batch, B, C)
    tiled = tiled_offsets("posterior_multiclass", logits, offsets, in_dims[1])
    phi, log_lik = batch_call(call, logits, offsets, logits.reshape(batch * logits.shape[1], *logits.shape[2:]),
                              tiled, counts.reshape(batch * counts.shape[1], *counts.shape[2:]), max_states)
    return (phi.view(logits.shape), log_lik.view(batch, counts.shape[1])), (0, 0)


def log_softmax_exact(logits):
    """log_softmax over the last dimension, reading infinities as the op does
    (multiclass_recursion.h, log_softmax_row): m entries of +inf share the mass
    (log_softmax itself gives NaN there)."""
    posinf = torch.isposinf(logits)
    m = posinf.sum(-1, keepdim=True)
    certain = torch.where(posinf, -torch.log(m.clamp(min=1).to(logits.dtype)), torch.full_like(logits, -torch.inf))
    return torch.where(m > 0, certain, torch.log_softmax(logits.masked_fill(posinf, 0), -1))


class _PosteriorMulticlassFn(torch.autograd.Function):
    """Reverse mode w.r.t. the logits through log_likelihood only:
    d log P(y_b) / dz_ic = phi_ic - softmax(z_i)_c. phi is returned as a
    non-differentiable output (like sort's indices: it does not require grad), since
    its derivative (a conditional covariance over pairs of instances) has no kernel;
    second derivatives and forward mode raise rather than return wrong numbers
    (_MulticlassLogLikGradFn)."""

    @staticmethod
    def forward(logits, offsets, counts, max_states=DEFAULT_MAX_STATES):
        # The dispatcher leaves a defaulted max_states out of the Autograd kernel's arguments.
        return below_autograd("posterior_multiclass", logits, offsets, counts, max_states)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, offsets = inputs[0], inputs[1]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[0])
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(output[0], logits, offsets)

    @staticmethod
    def backward(ctx, _grad_phi, grad_log_lik):
        rest = (None,) * (ctx.num_inputs - 1)
        if grad_log_lik is None:
            return (None,) + rest
        phi, logits, offsets = ctx.saved_tensors
        # Through a Function whose own derivative raises: the gradient's dependence on
        # the logits goes through phi, which has no derivative here, so a second
        # derivative (create_graph, torch.func) must not silently drop it.
        return (_MulticlassLogLikGradFn.apply(grad_log_lik, phi, logits, offsets),) + rest

    jvp = refuse("mlellp::posterior_multiclass has no forward-mode derivative")


class _MulticlassLogLikGradFn(FirstDerivativeFn):
    """(g, phi, z) -> g[b] (phi_i - softmax(z_i)); differentiating it raises."""

    backward = jvp = refuse("second derivatives of mlellp::posterior_multiclass are not supported "
                            "(its phi has no derivative)")

    @staticmethod
    def forward(grad_log_lik, phi, logits, offsets):
        dtype = compute_dtype(logits.dtype)
        g = grad_log_lik.to(dtype)[bag_index(offsets, logits.shape[0])].unsqueeze(1)
        return (g * (phi.to(dtype) - log_softmax_exact(logits.to(dtype)).exp())).to(logits.dtype)


register("posterior_multiclass", _PosteriorMulticlassFn, _posterior_multiclass_vmap)


def posterior_multiclass(logits, offsets, counts, *, max_states: int = DEFAULT_MAX_STATES):
    """Multi-class E-step: class posteriors and log-likelihood of each bag's count vector.

    With h_i ~ Categorical(softmax(logits[i])) independent, returns
    ``(phi, log_likelihood)`` with ``phi[i, c] = P(h_i = c | counts[b])`` and
    ``log_likelihood[b] = log P(counts[b])`` (the probability that bag b holds
    exactly ``counts[b, c]`` instances of each class c), computed exactly over
    the lattice of count vectors below ``counts[b]``: O(C * S_b) time and
    2 S_b table entries per bag, ``S_b = prod_c (counts[b, c] + 1)``
    (:func:`mlellp_ext.bags.lattice_states`).

    Args:
        logits: (N, C) float32/float64 (float16/bfloat16 computed in float32), C >= 2.
        offsets: (B + 1,) int64, the bag layout of :func:`posterior`.
        counts: (B, C) int64, non-negative, row b summing to bag b's size.
        max_states: a bag with more than this many states S_b is an error
            naming it (the default, 2^24, keeps its tables within 256 MiB; at
            most 2^40); such bags need :func:`posterior_multiclass_approx`. A
            bag within the budget whose tables cannot be allocated raises
            ``torch.OutOfMemoryError`` naming it, its states and the bytes.

    Returns:
        phi: (N, C) in the dtype of logits, rows summing to 1; exactly 0 in
            classes whose count is 0. Not differentiable: returned as a
            tensor that does not require grad (EM's fixed target).
        log_likelihood: (B,) float32 for float16/bfloat16/float32 logits,
            float64 for float64; differentiable w.r.t. logits,
            ``d/dz_ic = phi_ic - softmax(z_i)_c`` (first order). A bag whose
            counts infinite logits make impossible gets -inf and NaN phi; a NaN
            logit makes its own bag NaN. With C = 2 it is :func:`posterior` of
            ``logits[:, 1] - logits[:, 0]`` with counts ``counts[:, 1]``.

    Example:
        >>> logits = torch.randn(5, 3)
        >>> phi, ll = posterior_multiclass(logits, offsets_from_sizes([3, 2]),
        ...                                torch.tensor([[1, 1, 1], [0, 2, 0]]))
        >>> phi.shape, ll.shape
        (torch.Size([5, 3]), torch.Size([2]))
    """
    if offsets is None or counts is None:
        raise ValueError("posterior_multiclass: offsets and counts are required")
    check_not_nested("posterior_multiclass", (("logits", logits), ("offsets", offsets), ("counts", counts)))
    check_max_states("posterior_multiclass", max_states)
    return apply(_PosteriorMulticlassFn, torch.ops.mlellp.posterior_multiclass, logits, offsets, counts,
                 int(max_states))
