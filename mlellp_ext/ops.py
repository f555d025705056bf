"""The E-step as torch ops: autograd and fake kernels, and the Python API.

The kernels are C++/CUDA (csrc/ops); this file registers what Python adds:
``register_fake`` (shapes for torch.compile / meta tensors) and
``register_autograd`` (d log P(S=y) / dz_i = phi_i - sigmoid(z_i)).
"""
from __future__ import annotations

import torch

from .bags import split_nested

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# ---------------------------------------------------------------- fake kernels
# The checks of csrc/ops/checks.cpp that need no tensor data. The dispatcher runs
# these kernels for meta tensors, under torch.compile, and whenever any argument is
# on the meta device (a CPU tensor beside a meta one included), so without them
# bad shapes, dtypes or devices would pass here and give garbage.
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOATING_TEXT = "float32, float64, float16 or bfloat16"
# c10's names, so that messages match the C++ kernels' word for word
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                 torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                 torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                 torch.complex128: "ComplexDouble"}


def _check(op, ok, message):
    torch._check_value(ok, lambda: f"{op}: {message()}")


def _check_dtype(op, name, t, dtypes, text):
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be {text}, got {_SCALAR_NAMES.get(t.dtype, t.dtype)}")


def _check_device(op, name, t, logits):
    if t.device != logits.device:
        raise ValueError(f"{op}: {name} is on {t.device} but logits is on {logits.device}")


def _check_layout_fake(op, logits, offsets, counts=None):
    """check_bag_layout of csrc/ops/checks.cpp, in the same order and words."""
    _check(op, logits.dim() == 1,
           lambda: f"logits must be 1-D (all instances of all bags, flat), got shape {list(logits.shape)}")
    _check_dtype(op, "logits", logits, _FLOATING, _FLOATING_TEXT)
    _check(op, offsets.dim() == 1, lambda: f"offsets must be 1-D of length num_bags + 1, got shape {list(offsets.shape)}")
    _check_dtype(op, "offsets", offsets, (torch.int64,), "int64")
    _check(op, offsets.shape[0] >= 1,
           lambda: "offsets must have at least one element (offsets[0] = 0), got an empty tensor")
    _check_device(op, "offsets", offsets, logits)
    if counts is not None:
        _check(op, counts.dim() == 1, lambda: f"counts must be 1-D of length num_bags, got shape {list(counts.shape)}")
        _check_dtype(op, "counts", counts, (torch.int64,), "int64")
        _check(op, counts.shape[0] == offsets.shape[0] - 1,
               lambda: f"counts must have num_bags = len(offsets) - 1 = {offsets.shape[0] - 1} elements, "
                       f"got {counts.shape[0]}")
        _check_device(op, "counts", counts, logits)


@torch.library.register_fake("mlellp::posterior")
def _posterior_fake(logits, offsets, counts):
    _check_layout_fake("posterior", logits, offsets, counts)
    num_bags = offsets.shape[0] - 1
    phi = torch.empty_like(logits, memory_format=torch.contiguous_format)
    log_lik = logits.new_empty((num_bags,), dtype=_compute_dtype(logits.dtype))
    return phi, log_lik


@torch.library.register_fake("mlellp::posterior_backward")
def _posterior_backward_fake(grad_log_likelihood, phi, logits, offsets):
    op = "posterior_backward"  # check_backward_layout of csrc/ops/checks.cpp
    _check_layout_fake(op, logits, offsets)
    num_bags = offsets.shape[0] - 1
    _check(op, grad_log_likelihood.dim() == 1 and grad_log_likelihood.shape[0] == num_bags,
           lambda: f"grad_log_likelihood must have shape [{num_bags}], got {list(grad_log_likelihood.shape)}")
    _check(op, phi.shape == logits.shape,
           lambda: f"phi must have the shape of logits {list(logits.shape)}, got {list(phi.shape)}")
    _check_dtype(op, "grad_log_likelihood", grad_log_likelihood, _FLOATING, _FLOATING_TEXT)
    _check_dtype(op, "phi", phi, _FLOATING, _FLOATING_TEXT)
    _check_device(op, "grad_log_likelihood", grad_log_likelihood, logits)
    _check_device(op, "phi", phi, logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("mlellp::log_pmf")
def _log_pmf_fake(logits, offsets):
    _check_layout_fake("log_pmf", logits, offsets)
    size = logits.shape[0] + offsets.shape[0] - 1
    return logits.new_empty((size,), dtype=_compute_dtype(logits.dtype))


# -------------------------------------------------------------------- autograd
def _posterior_setup_context(ctx, inputs, output):
    logits, offsets, _counts = inputs
    phi, _log_lik = output
    ctx.mark_non_differentiable(phi)
    ctx.save_for_backward(phi, logits, offsets)


def _posterior_backward(ctx, _grad_phi, grad_log_lik):
    phi, logits, offsets = ctx.saved_tensors
    grad = torch.ops.mlellp.posterior_backward(grad_log_lik, phi, logits, offsets)
    return grad, None, None


torch.library.register_autograd(
    "mlellp::posterior", _posterior_backward, setup_context=_posterior_setup_context
)


def _no_setup_context(ctx, inputs, output):
    pass


def _posterior_backward_backward(ctx, grad):
    # Without this, autograd's fallback would return zeros (with only a warning)
    # for second derivatives: a silently wrong Hessian.
    raise RuntimeError(
        "mlellp::posterior_backward is not differentiable: second derivatives of the bag "
        "log-likelihood (double backward, Hessians) are not supported"
    )


torch.library.register_autograd("mlellp::posterior_backward", _posterior_backward_backward,
                                setup_context=_no_setup_context)


def _log_pmf_backward(ctx, grad):
    raise RuntimeError(
        "mlellp::log_pmf is not differentiable; for a differentiable log-likelihood of observed "
        "counts use mlellp_ext.bag_log_likelihood (or torch.ops.mlellp.posterior)"
    )


torch.library.register_autograd("mlellp::log_pmf", _log_pmf_backward, setup_context=_no_setup_context)


# ------------------------------------------------------------------ Python API
def _refuse_untracked_autodiff(op, logits):
    """Forward-mode AD and torch.func transforms would pass through the ops with a
    None or zero tangent (the ops have backward formulas only): refuse them here."""
    if torch.compiler.is_compiling():
        return
    # Private hooks (torch has no public test for either); skipped where a torch lacks them.
    is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if is_wrapped is not None and is_wrapped(logits):
        raise RuntimeError(f"{op}: torch.func transforms (grad, vmap, jacrev, jacfwd, jvp) are not supported; "
                           f"use torch.autograd (loss.backward() or torch.autograd.grad)")
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0 and \
            torch.autograd.forward_ad.unpack_dual(logits).tangent is not None:
        raise RuntimeError(f"{op}: forward-mode AD is not supported (backward only); "
                           f"use torch.autograd (loss.backward() or torch.autograd.grad)")


def posterior(logits, offsets=None, counts=None):
    """E-step: posterior marginals and log-likelihood of each bag's count.

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
        phi: (N,) in the dtype of logits (nested if logits is nested); not
            differentiable. Exactly 0 where counts[b] = 0 and exactly 1 where
            counts[b] = n_b.
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
    flat, offsets, counts, nested = split_nested(logits, offsets, counts, "posterior")
    _refuse_untracked_autodiff("posterior", flat)
    if counts is None:
        raise ValueError("posterior: counts is required")
    phi, log_lik = torch.ops.mlellp.posterior(flat, offsets, counts)
    if nested:
        phi = torch.nested.nested_tensor_from_jagged(phi, offsets)
    return phi, log_lik


def log_pmf(logits, offsets=None):
    """Whole log-PMF of every bag's count: ``log P(S_b = k)`` for k = 0..n_b.

    Args:
        logits: (N,) or a ``torch.nested`` jagged tensor (then omit offsets).
        offsets: (B + 1,) int64 as in :func:`posterior`.

    Returns:
        (N + B,) flat tensor; bag b's ``log P(S_b = k)`` is at
        ``offsets[b] + b + k``. Returned as a jagged nested tensor (B, n_b + 1)
        when logits is nested. dtype as ``log_likelihood`` of
        :func:`posterior`. Not differentiable (backward raises): use
        :func:`bag_log_likelihood` for gradients.

    Example:
        >>> out = log_pmf(torch.tensor([0.0, 0.0]), offsets_from_sizes([2]))
        >>> out.exp()  # P(S = 0, 1, 2) of two fair coins
        tensor([0.2500, 0.5000, 0.2500])
    """
    flat, offsets, _, nested = split_nested(logits, offsets, None, "log_pmf", takes_counts=False)
    _refuse_untracked_autodiff("log_pmf", flat)
    out = torch.ops.mlellp.log_pmf(flat, offsets)
    if nested:
        pmf_offsets = offsets + torch.arange(offsets.numel(), device=offsets.device)
        out = torch.nested.nested_tensor_from_jagged(out, pmf_offsets)
    return out


_REDUCTIONS = ("none", "mean", "sum")


def bag_log_likelihood(logits, offsets=None, counts=None, reduction: str = "mean"):
    """Differentiable log-likelihood ``log P(S_b = counts[b])`` of observed bag counts.

    Maximise it (minimise its negative) to fit logits to bag counts directly;
    its gradient w.r.t. logits[i] is ``phi[i] - sigmoid(logits[i])``.

    Args:
        logits, offsets, counts: as in :func:`posterior` (nested logits too).
        reduction: ``'none'`` (per bag, shape (B,)), ``'mean'`` over bags
            (default) or ``'sum'``.

    Example:
        >>> z = torch.randn(5, requires_grad=True)
        >>> loss = -bag_log_likelihood(z, offsets_from_sizes([3, 2]), torch.tensor([1, 2]))
        >>> loss.backward()
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"bag_log_likelihood: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _, log_lik = posterior(logits, offsets, counts)
    if reduction == "mean":
        return log_lik.mean()
    if reduction == "sum":
        return log_lik.sum()
    return log_lik
