"""The binary E-step: mlellp::posterior and the ops of its derivatives,
mlellp::posterior_backward and mlellp::phi_jvp (fake kernels, autograd, vmap
rules), and :func:`posterior`, the Python API of all E-steps on exact counts.

For i in bag b, with sigma = sigmoid(z) and C_b = Cov(h | S_b = y_b), symmetric:
  d log P_b / dz_i = phi_i - sigma_i          (posterior_backward: times g[b])
  d phi / dz       = C_b                      (phi_jvp: C_b u, forward and reverse alike)
so the Hessian of log P_b is C_b - diag(sigma (1 - sigma)), and every first and
second derivative is one of these products. Third derivatives (of phi_jvp w.r.t.
the logits) have no kernel and raise instead of returning zeros.
"""
from __future__ import annotations

import functools

import torch

from ..bags import bag_index, split_nested
from ._checks import DEFAULT_MAX_STATES, check_backward_layout, check_layout, check_phi_jvp_layout, compute_dtype
from ._dispatch import (apply, bag_sums, batch_call, batched, below_autograd, empty_phi_log_lik, has_tangent,
                        register, tiled_offsets, vmap_phi_log_lik)
from .multiclass import posterior_multiclass

_THIRD_ORDER = "third derivatives of the E-step (derivatives of mlellp::phi_jvp w.r.t. the logits) are not supported"


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("mlellp::posterior")
def _posterior_fake(logits, offsets, counts):
    check_layout("posterior", logits, offsets, counts)
    return empty_phi_log_lik(logits, offsets.shape[0] - 1)


@torch.library.register_fake("mlellp::posterior_backward")
def _posterior_backward_fake(grad_log_likelihood, phi, logits, offsets):
    check_backward_layout("posterior_backward", grad_log_likelihood, phi, logits, offsets)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("mlellp::phi_jvp")
def _phi_jvp_fake(tangent, logits, offsets, counts):
    check_phi_jvp_layout("phi_jvp", tangent, logits, offsets, counts)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ vmap rules
_posterior_vmap = functools.partial(vmap_phi_log_lik, op="posterior")


def _posterior_backward_vmap(call, info, in_dims, grad_log_likelihood, phi, logits, offsets):
    batch = info.batch_size
    logits = batched(logits, in_dims[2], batch)
    tiled = tiled_offsets("posterior_backward", logits, offsets, in_dims[3], check_layout)
    grad = batch_call(call, logits, offsets, batched(grad_log_likelihood, in_dims[0], batch).reshape(-1),
                      batched(phi, in_dims[1], batch).reshape(-1), logits.reshape(-1), tiled)
    return grad.view(logits.shape), 0


def _phi_jvp_vmap(call, info, in_dims, tangent, logits, offsets, counts):
    batch = info.batch_size
    logits = batched(logits, in_dims[1], batch)
    tiled = tiled_offsets("phi_jvp", logits, offsets, in_dims[2], check_layout)
    out = batch_call(call, logits, offsets, batched(tangent, in_dims[0], batch).reshape(-1), logits.reshape(-1),
                     tiled, batched(counts, in_dims[3], batch).reshape(-1))
    return out.view(logits.shape), 0


# -------------------------------------------------------------------- autograd
def _instance_sums(values, offsets):
    """Per-bag sums of values (N,); 0 for an empty bag."""
    return bag_sums(values, bag_index(offsets, values.shape[0]), offsets.shape[0] - 1)


def _differentiable(*tensors):
    """Whether a derivative being computed from these tensors must itself be
    differentiable (create_graph, a torch.func transform, or forward-mode tangents on
    them): then the Functions below are applied, else the ops."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or has_tangent(tensors)


def _phi_jvp(tangent, logits, offsets, counts):
    if _differentiable(tangent, logits):
        return _PhiJvpFn.apply(tangent, logits, offsets, counts)
    return below_autograd("phi_jvp", tangent, logits, offsets, counts)


def _log_lik_grad(grad_log_likelihood, phi, logits, offsets):
    if _differentiable(grad_log_likelihood, phi, logits):
        return _PosteriorBackwardFn.apply(grad_log_likelihood, phi, logits, offsets)
    return below_autograd("posterior_backward", grad_log_likelihood, phi, logits, offsets)


def _input_grad_used(ctx, index):
    """Whether backward's gradient for input `index` will be used. needs_input_grad is
    fixed at the forward; autograd.grad(..., inputs=) may not ask for that input."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # private; assume used without it
    if node is None or will_execute is None:
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:
        return True


class _PhiJvpFn(torch.autograd.Function):
    """tangent -> C_b tangent: linear in tangent with the same (symmetric) matrix."""

    @staticmethod
    def forward(tangent, logits, offsets, counts):
        return below_autograd("phi_jvp", tangent, logits, offsets, counts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _tangent, logits, offsets, counts = inputs
        ctx.set_materialize_grads(False)  # None, not zeros, for the logits' absent tangent
        ctx.save_for_backward(logits, offsets, counts)
        ctx.save_for_forward(logits, offsets, counts)

    @staticmethod
    def backward(ctx, grad):
        if _input_grad_used(ctx, 1):
            raise RuntimeError(_THIRD_ORDER)
        logits, offsets, counts = ctx.saved_tensors
        return None if grad is None else _phi_jvp(grad, logits, offsets, counts), None, None, None

    @staticmethod
    def jvp(ctx, tangent_tangent, tangent_logits, _tangent_offsets, _tangent_counts):
        if tangent_logits is not None:
            raise RuntimeError(_THIRD_ORDER)
        logits, offsets, counts = ctx.saved_tensors
        if tangent_tangent is None:
            return torch.zeros_like(logits)
        return _phi_jvp(tangent_tangent, logits, offsets, counts)


class _PosteriorBackwardFn(torch.autograd.Function):
    """(g, phi, z) -> g[b] (phi_i - sigma_i); phi's own dependence on z, if any, reaches
    the logits through posterior's backward (phi_jvp)."""

    @staticmethod
    def forward(grad_log_likelihood, phi, logits, offsets):
        return below_autograd("posterior_backward", grad_log_likelihood, phi, logits, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_log_likelihood, phi, logits, offsets = inputs
        ctx.save_for_backward(grad_log_likelihood, phi, logits, offsets)
        ctx.save_for_forward(grad_log_likelihood, phi, logits, offsets)

    @staticmethod
    def _terms(g, phi, logits, offsets):
        # In the compute dtype; sigma' = sigma (1 - sigma), exactly 0 at +-inf logits.
        dtype = compute_dtype(logits.dtype)
        sigma = torch.sigmoid(logits.to(dtype))
        g_i = g.to(dtype)[bag_index(offsets, logits.shape[0])]
        return phi.to(dtype) - sigma, g_i, sigma * (1 - sigma), dtype

    @staticmethod
    def backward(ctx, grad):
        g, phi, logits, offsets = ctx.saved_tensors
        slope, g_i, curvature, dtype = _PosteriorBackwardFn._terms(g, phi, logits, offsets)
        w = grad.to(dtype)
        return (_instance_sums(w * slope, offsets).to(g.dtype), (w * g_i).to(phi.dtype),
                (-w * g_i * curvature).to(logits.dtype), None)

    @staticmethod
    def jvp(ctx, tangent_g, tangent_phi, tangent_logits, _tangent_offsets):
        g, phi, logits, offsets = ctx.saved_tensors
        slope, g_i, curvature, dtype = _PosteriorBackwardFn._terms(g, phi, logits, offsets)
        out = torch.zeros_like(slope)
        if tangent_g is not None:
            out = out + tangent_g.to(dtype)[bag_index(offsets, logits.shape[0])] * slope
        if tangent_phi is not None:
            out = out + g_i * tangent_phi.to(dtype)
        if tangent_logits is not None:
            out = out - g_i * curvature * tangent_logits.to(dtype)
        return out.to(logits.dtype)


class _PosteriorFn(torch.autograd.Function):
    @staticmethod
    def forward(logits, offsets, counts):
        return below_autograd("posterior", logits, offsets, counts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, offsets, counts = inputs
        phi, _log_lik = output
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no phi_jvp for it
        ctx.save_for_backward(phi, logits, offsets, counts)
        ctx.save_for_forward(phi, logits, offsets, counts)

    @staticmethod
    def backward(ctx, grad_phi, grad_log_lik):
        phi, logits, offsets, counts = ctx.saved_tensors
        grad = None
        if grad_log_lik is not None:
            grad = _log_lik_grad(grad_log_lik, phi, logits, offsets)
        if grad_phi is not None:
            grad_phi = _phi_jvp(grad_phi, logits, offsets, counts)
            grad = grad_phi if grad is None else grad + grad_phi
        return grad, None, None

    @staticmethod
    def jvp(ctx, tangent_logits, _tangent_offsets, _tangent_counts):
        phi, logits, offsets, counts = ctx.saved_tensors
        dtype = compute_dtype(logits.dtype)
        slope = (phi.to(dtype) - torch.sigmoid(logits.to(dtype))) * tangent_logits.to(dtype)
        return _phi_jvp(tangent_logits, logits, offsets, counts), _instance_sums(slope, offsets)


register("posterior", _PosteriorFn, _posterior_vmap)
register("posterior_backward", _PosteriorBackwardFn, _posterior_backward_vmap)
register("phi_jvp", _PhiJvpFn, _phi_jvp_vmap)


# ------------------------------------------------------------------ Python API
def posterior(logits, offsets=None, counts=None, *, max_states: int = DEFAULT_MAX_STATES):
    """E-step: posterior marginals and log-likelihood of each bag's count.

    (N, C) logits with (B, C) counts are the multi-class case: see
    :func:`posterior_multiclass` (``max_states`` applies only there).

    With h_i ~ Bernoulli(sigmoid(logits[i])) independent and S_b the sum over
    bag b, returns ``(phi, log_likelihood)`` with
    ``phi[i] = P(h_i = 1 | S_b = counts[b])`` and
    ``log_likelihood[b] = log P(S_b = counts[b])``, computed exactly in
    O(n_b * min(y_b, n_b - y_b)) per bag.

    Args:
        logits: (N,) float32/float64 (float16/bfloat16 are computed in
            float32), any device the library was built for; or a
            ``torch.nested`` jagged tensor (B, j), in which case the second
            argument is ``counts``.
        offsets: (B + 1,) int64, ``offsets[0] = 0``, non-decreasing,
            ``offsets[B] = N``; bag b is ``logits[offsets[b]:offsets[b+1]]``.
        counts: (B,) int64 with ``0 <= counts[b] <= n_b``.

    Returns:
        phi: (N,) in the dtype of logits (nested if logits is nested).
            Exactly 0 where counts[b] = 0 and exactly 1 where counts[b] = n_b.
            Differentiable (d phi / dz = Cov(h | S_b = counts[b]), the op
            ``phi_jvp``, 10-15x the forward's cost): detach it where it is a
            fixed target, as in the EM's M-step.
        log_likelihood: (B,) float32 for float16/bfloat16/float32 logits,
            float64 for float64; differentiable w.r.t. logits. 0 for an empty
            bag. A bag whose count infinite logits make impossible gets
            -inf and NaN phi; a NaN logit makes its own bag NaN.

    Example:
        >>> logits = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.1])
        >>> offsets = offsets_from_sizes([3, 2])
        >>> phi, ll = posterior(logits, offsets, torch.tensor([1, 2]))
        >>> phi.shape, ll.shape
        (torch.Size([5]), torch.Size([2]))
    """
    if isinstance(logits, torch.Tensor) and not logits.is_nested and logits.dim() == 2:
        if isinstance(counts, torch.Tensor) and counts.dim() != 2:
            raise ValueError(f"posterior: logits of shape {list(logits.shape)} are read as (N, C) multi-class "
                             f"logits, which need (B, C) counts, got counts of shape {list(counts.shape)} "
                             f"(binary bags take 1-D logits)")
        return posterior_multiclass(logits, offsets, counts, max_states=max_states)
    flat, offsets, counts, nested = split_nested(logits, offsets, counts, "posterior")
    if counts is None:
        raise ValueError("posterior: counts is required")
    phi, log_lik = apply(_PosteriorFn, torch.ops.mlellp.posterior, flat, offsets, counts)
    if nested:
        phi = torch.nested.nested_tensor_from_jagged(phi, offsets)
    return phi, log_lik
