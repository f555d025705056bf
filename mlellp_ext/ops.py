"""The E-step as torch ops: autograd and fake kernels, and the Python API.

The kernels are C++/CUDA (csrc/ops); this file registers what Python adds:
fake kernels (shapes for torch.compile / meta tensors), Autograd kernels
(d log P(S=y) / dz_i = phi_i - sigmoid(z_i), reverse and forward mode) and vmap
rules, and holds the Python API, which also serves torch.func transforms.
"""
from __future__ import annotations

import functools
import numbers

import torch
import torch.autograd.forward_ad as _forward_ad

from .bags import bag_index, check_reduction, reduce_over_bags, split_nested

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# posterior_multiclass's default state budget per bag (the schema's default): 2^24
# count vectors, two tables of 16 bytes per state, 256 MiB.
DEFAULT_MAX_STATES = 1 << 24
MAX_STATES_LIMIT = 1 << 40  # csrc/ops/checks.cpp: 16 TiB of tables, far from int64 overflow


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


@torch.library.register_fake("mlellp::phi_jvp")
def _phi_jvp_fake(tangent, logits, offsets, counts):
    op = "phi_jvp"  # check_phi_jvp_layout of csrc/ops/checks.cpp
    _check_layout_fake(op, logits, offsets, counts)
    _check(op, tangent.shape == logits.shape,
           lambda: f"tangent must have the shape of logits {list(logits.shape)}, got {list(tangent.shape)}")
    _check_dtype(op, "tangent", tangent, _FLOATING, _FLOATING_TEXT)
    _check_device(op, "tangent", tangent, logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _check_multiclass_layout_fake(op, logits, offsets, counts, max_states):
    """check_multiclass_layout of csrc/ops/checks.cpp, in the same order and words."""
    _check(op, logits.dim() == 2,
           lambda: f"logits must be 2-D (num_instances, num_classes), got shape {list(logits.shape)}")
    _check(op, logits.shape[1] >= 2,
           lambda: f"logits must have at least 2 classes (columns), got shape {list(logits.shape)}")
    _check_dtype(op, "logits", logits, _FLOATING, _FLOATING_TEXT)
    _check(op, offsets.dim() == 1, lambda: f"offsets must be 1-D of length num_bags + 1, got shape {list(offsets.shape)}")
    _check_dtype(op, "offsets", offsets, (torch.int64,), "int64")
    _check(op, offsets.shape[0] >= 1,
           lambda: "offsets must have at least one element (offsets[0] = 0), got an empty tensor")
    _check_device(op, "offsets", offsets, logits)
    _check(op, counts.dim() == 2, lambda: f"counts must be 2-D (num_bags, num_classes), got shape {list(counts.shape)}")
    _check_dtype(op, "counts", counts, (torch.int64,), "int64")
    _check(op, counts.shape[0] == offsets.shape[0] - 1,
           lambda: f"counts must have num_bags = len(offsets) - 1 = {offsets.shape[0] - 1} rows, "
                   f"got shape {list(counts.shape)}")
    _check(op, counts.shape[1] == logits.shape[1],
           lambda: f"counts must have one column per class of logits ({logits.shape[1]}), got shape {list(counts.shape)}")
    _check_device(op, "counts", counts, logits)
    _check_max_states(op, max_states)


def _check_max_states(op, max_states):
    # A float (1.5) would pass the range test and be truncated by int() on its way to the op.
    _check(op, isinstance(max_states, (numbers.Integral, torch.SymInt)) and not isinstance(max_states, bool),
           lambda: f"max_states must be an integer, got {max_states!r}")
    _check(op, bool(1 <= max_states <= MAX_STATES_LIMIT),
           lambda: f"max_states must be between 1 and 2^40 = {MAX_STATES_LIMIT}, got {max_states}")


@torch.library.register_fake("mlellp::posterior_multiclass")
def _posterior_multiclass_fake(logits, offsets, counts, max_states=DEFAULT_MAX_STATES):
    _check_multiclass_layout_fake("posterior_multiclass", logits, offsets, counts, max_states)
    phi = torch.empty_like(logits, memory_format=torch.contiguous_format)
    log_lik = logits.new_empty((offsets.shape[0] - 1,), dtype=_compute_dtype(logits.dtype))
    return phi, log_lik


def _check_weighted_layout_fake(op, logits, offsets, count_log_weights):
    """check_weighted_layout of csrc/ops/checks.cpp, in the same order and words."""
    _check_layout_fake(op, logits, offsets)
    expected = logits.shape[0] + offsets.shape[0] - 1
    _check(op, count_log_weights.dim() == 1,
           lambda: f"count_log_weights must be 1-D (log w_b(k) at offsets[b] + b + k, k = 0..n_b), got shape "
                   f"{list(count_log_weights.shape)}")
    _check_dtype(op, "count_log_weights", count_log_weights, _FLOATING, _FLOATING_TEXT)
    _check(op, count_log_weights.shape[0] == expected,
           lambda: f"count_log_weights must have len(logits) + num_bags = {logits.shape[0]} + "
                   f"{offsets.shape[0] - 1} = {expected} elements (n_b + 1 per bag), got {count_log_weights.shape[0]}")
    _check_device(op, "count_log_weights", count_log_weights, logits)


@torch.library.register_fake("mlellp::posterior_weighted")
def _posterior_weighted_fake(logits, offsets, count_log_weights):
    _check_weighted_layout_fake("posterior_weighted", logits, offsets, count_log_weights)
    phi = torch.empty_like(logits, memory_format=torch.contiguous_format)
    log_lik = logits.new_empty((offsets.shape[0] - 1,), dtype=_compute_dtype(logits.dtype))
    return phi, log_lik


@torch.library.register_fake("mlellp::log_pmf")
def _log_pmf_fake(logits, offsets):
    _check_layout_fake("log_pmf", logits, offsets)
    size = logits.shape[0] + offsets.shape[0] - 1
    return logits.new_empty((size,), dtype=_compute_dtype(logits.dtype))


# -------------------------------------------------------------------- autograd
# For i in bag b, with sigma = sigmoid(z) and C_b = Cov(h | S_b = y_b), symmetric:
#   d log P_b / dz_i = phi_i - sigma_i          (posterior_backward: times g[b])
#   d phi / dz       = C_b                      (phi_jvp: C_b u, forward and reverse alike)
# so the Hessian of log P_b is C_b - diag(sigma (1 - sigma)), and every first and
# second derivative is one of these products. Third derivatives (of phi_jvp w.r.t.
# the logits) have no kernel and raise instead of returning zeros.
#
# The Autograd kernels are registered by hand, not with torch.library.register_autograd,
# whose autograd.Function has no jvp: dual tensors would pass through with no tangent.
# The same autograd.Functions, applied from the Python API, also serve torch.func
# transforms (they need setup_context and a vmap rule, which a kernel cannot give).
_THIRD_ORDER = "third derivatives of the E-step (derivatives of mlellp::phi_jvp w.r.t. the logits) are not supported"


def _has_tangent(tensors):
    return any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _bag_sums(values, offsets):
    """Per-bag sums of values (N,); 0 for an empty bag."""
    # Zeros that vmap (jacfwd) batches as it batches values: index_add cannot add a
    # batched source into a fresh, unbatched zeros tensor.
    zeros = torch.zeros_like(values.sum()).expand(offsets.shape[0] - 1)
    return zeros.index_add(0, bag_index(offsets, values.shape[0]), values)


def _batched(t, dim, batch):
    """t with its vmapped dimension first, or expanded to the batch if it has none."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)


def _tiled_offsets(op, logits, offsets, offsets_dim):
    """Offsets of a batch (batch, n) of logits laid end to end, each entry's bags in turn."""
    if offsets_dim is not None:
        raise ValueError(f"{op}: vmap over offsets is not supported (every batch entry must share "
                         f"the bag layout); vmap over logits and counts instead")
    batch = logits.shape[0]
    _check_layout_fake(op, logits[0] if batch else logits.new_empty(logits.shape[1:]), offsets)
    n = logits.shape[1]
    # The kernel checks offsets[0..B-1] of the tiled layout as it would the original
    # (entry 0 comes first), but a wrong offsets[-1] would shift the bags instead.
    last = int(offsets[-1])
    if last != n:
        raise ValueError(f"{op}: offsets[-1] must equal len(logits) = {n}, got offsets[{offsets.numel() - 1}] = {last}")
    shift = torch.arange(batch, device=offsets.device, dtype=offsets.dtype).unsqueeze(1) * n
    return torch.cat([(offsets[:-1].unsqueeze(0) + shift).reshape(-1), offsets.new_tensor([batch * n])])


# vmap rules: each batch entry becomes a run of extra bags (_tiled_offsets), so one
# kernel call does the whole batch. `call` is the op or its autograd.Function's apply.
def _batch_call(call, logits, offsets, *args):
    """call(*args), with the batched layout explained in its errors (they index the flat call)."""
    try:
        return call(*args)
    except ValueError as e:
        num_bags, n = offsets.shape[0] - 1, logits.shape[1]
        raise ValueError(f"{e} (under vmap the batch runs as one flat call: its bag k*{num_bags} + b and "
                         f"instance k*{n} + i are bag b and instance i of batch entry k)") from None


def _posterior_vmap(call, info, in_dims, logits, offsets, counts, *, op="posterior"):
    batch = info.batch_size
    logits = _batched(logits, in_dims[0], batch)
    tiled = _tiled_offsets(op, logits, offsets, in_dims[1])
    counts = _batched(counts, in_dims[2], batch)
    phi, log_lik = _batch_call(call, logits, offsets, logits.reshape(-1), tiled, counts.reshape(-1))
    return (phi.view(logits.shape), log_lik.view(batch, offsets.shape[0] - 1)), (0, 0)


def _posterior_backward_vmap(call, info, in_dims, grad_log_likelihood, phi, logits, offsets):
    batch = info.batch_size
    logits = _batched(logits, in_dims[2], batch)
    tiled = _tiled_offsets("posterior_backward", logits, offsets, in_dims[3])
    grad = _batch_call(call, logits, offsets, _batched(grad_log_likelihood, in_dims[0], batch).reshape(-1),
                       _batched(phi, in_dims[1], batch).reshape(-1), logits.reshape(-1), tiled)
    return grad.view(logits.shape), 0


def _phi_jvp_vmap(call, info, in_dims, tangent, logits, offsets, counts):
    batch = info.batch_size
    logits = _batched(logits, in_dims[1], batch)
    tiled = _tiled_offsets("phi_jvp", logits, offsets, in_dims[2])
    out = _batch_call(call, logits, offsets, _batched(tangent, in_dims[0], batch).reshape(-1), logits.reshape(-1),
                      tiled, _batched(counts, in_dims[3], batch).reshape(-1))
    return out.view(logits.shape), 0


def _log_pmf_vmap(call, info, in_dims, logits, offsets):
    logits = _batched(logits, in_dims[0], info.batch_size)
    tiled = _tiled_offsets("log_pmf", logits, offsets, in_dims[1])
    # Entry k's bag b holds its n_b + 1 values from tiled[kB + b] + kB + b =
    # k (n + B) + offsets[b] + b: each entry's block is contiguous, laid out as unbatched.
    out = _batch_call(call, logits, offsets, logits.reshape(-1), tiled)
    return out.view(logits.shape[0], logits.shape[1] + offsets.shape[0] - 1), 0


def _posterior_weighted_vmap(call, info, in_dims, logits, offsets, count_log_weights):
    # Entry k's bag b has its weights at tiled[kB + b] + kB + b = k (N + B) + offsets[b] + b:
    # each entry's weights contiguous, laid out as unbatched (as log_pmf's output), so the
    # counts' rule serves.
    return _posterior_vmap(call, info, in_dims, logits, offsets, count_log_weights, op="posterior_weighted")


def _posterior_multiclass_vmap(call, info, in_dims, logits, offsets, counts, max_states=DEFAULT_MAX_STATES):
    op = "posterior_multiclass"
    if in_dims[1] is not None:
        raise ValueError(f"{op}: vmap over offsets is not supported (every batch entry must share the bag "
                         f"layout); vmap over logits and counts instead")
    batch = info.batch_size
    logits = _batched(logits, in_dims[0], batch)  # (batch, N, C)
    counts = _batched(counts, in_dims[2], batch)  # (batch, B, C)
    n = logits.shape[1]
    if offsets.numel() and int(offsets[-1]) != n:
        raise ValueError(f"{op}: offsets[-1] must equal len(logits) = {n}, got offsets[{offsets.numel() - 1}] = "
                         f"{int(offsets[-1])}")
    shift = torch.arange(batch, device=offsets.device, dtype=offsets.dtype).unsqueeze(1) * n
    tiled = torch.cat([(offsets[:-1].unsqueeze(0) + shift).reshape(-1), offsets.new_tensor([batch * n])])
    phi, log_lik = _batch_call(call, logits, offsets, logits.reshape(batch * n, *logits.shape[2:]), tiled,
                               counts.reshape(batch * counts.shape[1], *counts.shape[2:]), max_states)
    return (phi.view(logits.shape), log_lik.view(batch, counts.shape[1])), (0, 0)


def _below_autograd(name, *args):
    """torch.ops.mlellp.<name> straight to its CPU/CUDA kernel (no autograd layer)."""
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(torch.ops.mlellp, name)(*args)


def _differentiable(*tensors):
    """Whether a derivative being computed from these tensors must itself be
    differentiable (create_graph, a torch.func transform, or forward-mode tangents on
    them): then the Functions below are applied, else the ops."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or _has_tangent(tensors)


def _phi_jvp(tangent, logits, offsets, counts):
    if _differentiable(tangent, logits):
        return _PhiJvpFn.apply(tangent, logits, offsets, counts)
    return _below_autograd("phi_jvp", tangent, logits, offsets, counts)


def _log_lik_grad(grad_log_likelihood, phi, logits, offsets):
    if _differentiable(grad_log_likelihood, phi, logits):
        return _PosteriorBackwardFn.apply(grad_log_likelihood, phi, logits, offsets)
    return _below_autograd("posterior_backward", grad_log_likelihood, phi, logits, offsets)


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
        return _below_autograd("phi_jvp", tangent, logits, offsets, counts)

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

    vmap = staticmethod(lambda info, in_dims, *args: _phi_jvp_vmap(_PhiJvpFn.apply, info, in_dims, *args))


class _PosteriorBackwardFn(torch.autograd.Function):
    """(g, phi, z) -> g[b] (phi_i - sigma_i); phi's own dependence on z, if any, reaches
    the logits through posterior's backward (phi_jvp)."""

    @staticmethod
    def forward(grad_log_likelihood, phi, logits, offsets):
        return _below_autograd("posterior_backward", grad_log_likelihood, phi, logits, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_log_likelihood, phi, logits, offsets = inputs
        ctx.save_for_backward(grad_log_likelihood, phi, logits, offsets)
        ctx.save_for_forward(grad_log_likelihood, phi, logits, offsets)

    @staticmethod
    def _terms(g, phi, logits, offsets):
        # In the compute dtype; sigma' = sigma (1 - sigma), exactly 0 at +-inf logits.
        dtype = _compute_dtype(logits.dtype)
        sigma = torch.sigmoid(logits.to(dtype))
        g_i = g.to(dtype)[bag_index(offsets, logits.shape[0])]
        return phi.to(dtype) - sigma, g_i, sigma * (1 - sigma), dtype

    @staticmethod
    def backward(ctx, grad):
        g, phi, logits, offsets = ctx.saved_tensors
        slope, g_i, curvature, dtype = _PosteriorBackwardFn._terms(g, phi, logits, offsets)
        w = grad.to(dtype)
        return (_bag_sums(w * slope, offsets).to(g.dtype), (w * g_i).to(phi.dtype),
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

    vmap = staticmethod(lambda info, in_dims, *args: _posterior_backward_vmap(
        _PosteriorBackwardFn.apply, info, in_dims, *args))


class _PosteriorFn(torch.autograd.Function):
    @staticmethod
    def forward(logits, offsets, counts):
        return _below_autograd("posterior", logits, offsets, counts)

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
        dtype = _compute_dtype(logits.dtype)
        slope = (phi.to(dtype) - torch.sigmoid(logits.to(dtype))) * tangent_logits.to(dtype)
        return _phi_jvp(tangent_logits, logits, offsets, counts), _bag_sums(slope, offsets)

    vmap = staticmethod(lambda info, in_dims, *args: _posterior_vmap(_PosteriorFn.apply, info, in_dims, *args))


class _LogPmfFn(torch.autograd.Function):
    """Reverse mode through posterior_weighted: for bag b and a gradient g_b(k) of
    log P(S_b = k), sum_k g_b(k) (P(h_i = 1 | S_b = k) - sigma_i) = G (phi^w_i - sigma_i)
    with weights w(k) = g_b(k) / P(S_b = k) and G = sum_k g_b(k) (phi^w: the op's
    phi under those weights); g's positive and negative parts take one pass each."""

    @staticmethod
    def forward(logits, offsets):
        return _below_autograd("log_pmf", logits, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, offsets = inputs
        ctx.save_for_backward(logits, offsets, output)

    @staticmethod
    def backward(ctx, grad):
        logits, offsets, out = ctx.saved_tensors
        return _LogPmfVjpFn.apply(grad, logits, offsets, out), None

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError("mlellp::log_pmf has no forward-mode derivative (reverse mode works)")

    vmap = staticmethod(lambda info, in_dims, *args: _log_pmf_vmap(_LogPmfFn.apply, info, in_dims, *args))


_WEIGHTED_SECOND_ORDER = ("second derivatives of mlellp::posterior_weighted and mlellp::log_pmf are not "
                          "supported (phi has no derivative there)")


def _log_pmf_vjp(grad, logits, offsets, log_pmf_out):
    """sum_k grad_b(k) d log P(S_b = k) / d logits (see _LogPmfFn). In float64 whatever
    the dtype: the weights log g - log P carry |log P| * eps of rounding into phi. Counts
    the logits make impossible (log P = -inf) carry no derivative; a NaN or infinite
    gradient entry makes its bag's result NaN."""
    g, lp, z = grad.double(), log_pmf_out.double(), logits.double()
    num_bags = offsets.shape[0] - 1
    bag_of_k = torch.repeat_interleave(torch.arange(num_bags, device=offsets.device), offsets.diff() + 1,
                                       output_size=g.shape[0])
    possible = lp > -torch.inf
    g = torch.where(possible, g, torch.zeros_like(g))
    # Out-of-place sums (as _bag_sums) so that vmap can batch them (jacrev, vmap(grad)).
    sums = lambda v: torch.zeros_like(v.sum()).expand(num_bags).index_add(0, bag_of_k, v)  # noqa: E731
    bad = sums((~torch.isfinite(g)).double()) > 0
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    sigma = torch.sigmoid(z)
    index = bag_index(offsets, logits.shape[0])
    out = torch.zeros_like(sigma)
    for sign, part in ((1.0, g.clamp(min=0)), (-1.0, (-g).clamp(min=0))):
        total = sums(part)
        logw = torch.where(part > 0, part.log() - lp, torch.full_like(part, -torch.inf))
        phi, _ = _below_autograd("posterior_weighted", z, offsets, logw)
        used = (total > 0)[index]
        out = out + sign * torch.where(used, total[index] * (phi - sigma), torch.zeros_like(sigma))
    out = torch.where(bad[index], torch.full_like(out, torch.nan), out)
    return out.to(logits.dtype)


class _FirstDerivativeFn(torch.autograd.Function):
    """A first derivative of posterior_weighted or log_pmf as a Function whose own
    derivatives raise (they would need phi's, which has no kernel here)."""

    generate_vmap_rule = True  # forwards of torch ops and ops with vmap rules: jacrev, vmap(grad) work

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_WEIGHTED_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_WEIGHTED_SECOND_ORDER)


class _LogPmfVjpFn(_FirstDerivativeFn):
    """log_pmf's vector-Jacobian product."""

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
        return _below_autograd("posterior_weighted", logits, offsets, count_log_weights)

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

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError("mlellp::posterior_weighted has no forward-mode derivative")

    vmap = staticmethod(lambda info, in_dims, *args: _posterior_weighted_vmap(
        _PosteriorWeightedFn.apply, info, in_dims, *args))


class _WeightedLogLikGradFn(_FirstDerivativeFn):
    """(g, phi, log_lik, z, log w) -> (grad of the logits, grad of the log-weights)."""

    @staticmethod
    def forward(grad_log_lik, phi, log_lik, logits, offsets, logw, want_logits, want_weights):
        grad_logits = grad_weights = None
        if want_logits:
            grad_logits = _below_autograd("posterior_backward", grad_log_lik, phi, logits, offsets)
        if want_weights:
            dtype = _compute_dtype(logits.dtype)
            lp = _below_autograd("log_pmf", logits, offsets).to(dtype)
            bag_of_k = torch.repeat_interleave(torch.arange(offsets.shape[0] - 1, device=offsets.device),
                                               offsets.diff() + 1, output_size=lp.shape[0])
            w = logw.to(dtype)
            post = torch.where(w > -torch.inf, (w + lp - log_lik.to(dtype)[bag_of_k]).exp(), torch.zeros_like(w))
            grad_weights = (grad_log_lik.to(dtype)[bag_of_k] * post).to(logw.dtype)
        return grad_logits, None, grad_weights


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
        return _below_autograd("posterior_multiclass", logits, offsets, counts, max_states)

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

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError("mlellp::posterior_multiclass has no forward-mode derivative")

    vmap = staticmethod(lambda info, in_dims, *args: _posterior_multiclass_vmap(
        _PosteriorMulticlassFn.apply, info, in_dims, *args))


_MULTICLASS_SECOND_ORDER = ("second derivatives of mlellp::posterior_multiclass are not supported "
                            "(its phi has no derivative)")


class _MulticlassLogLikGradFn(torch.autograd.Function):
    """(g, phi, z) -> g[b] (phi_i - softmax(z_i)); differentiating it raises."""

    @staticmethod
    def forward(grad_log_lik, phi, logits, offsets):
        return _multiclass_log_lik_grad(grad_log_lik, phi, logits, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_MULTICLASS_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_MULTICLASS_SECOND_ORDER)

    generate_vmap_rule = True  # its forward is plain torch ops: vmap(grad(...)) works


def _log_softmax_exact(logits):
    """log_softmax over the last dimension, reading infinities as the op does
    (multiclass_recursion.h, log_softmax_row): m entries of +inf share the mass
    (log_softmax itself gives NaN there)."""
    posinf = torch.isposinf(logits)
    m = posinf.sum(-1, keepdim=True)
    certain = torch.where(posinf, -torch.log(m.clamp(min=1).to(logits.dtype)), torch.full_like(logits, -torch.inf))
    return torch.where(m > 0, certain, torch.log_softmax(logits.masked_fill(posinf, 0), -1))


def _multiclass_log_lik_grad(grad_log_lik, phi, logits, offsets):
    dtype = _compute_dtype(logits.dtype)
    g = grad_log_lik.to(dtype)[bag_index(offsets, logits.shape[0])].unsqueeze(1)
    return (g * (phi.to(dtype) - _log_softmax_exact(logits.to(dtype)).exp())).to(logits.dtype)


def _needs_autodiff(*tensors):
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or _has_tangent(tensors)


def _is_functorch_wrapped(*args):
    return any(isinstance(a, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args)


def _autograd_kernel(name, fn):
    def kernel(*args):
        if not _needs_autodiff(*[a for a in args if isinstance(a, torch.Tensor)]):
            return _below_autograd(name, *args)
        if torch._C._are_functorch_transforms_active():
            # A kernel cannot serve torch.func's grad/jvp (the transform must see the
            # autograd.Function itself), so say where they work.
            raise RuntimeError(f"mlellp::{name} under torch.func grad/jvp/jacrev/jacfwd: call it through "
                               f"mlellp_ext (posterior, bag_log_likelihood, log_pmf), not torch.ops.mlellp")
        return fn.apply(*args)

    return kernel


def _ctx_in_forward(fn):
    """fn in the form with ctx as forward's first argument. The kernels use it: apply
    binds a setup_context Function's arguments by signature on every call (~15 us),
    and only torch.func, which the kernels do not serve, needs that form."""
    def forward(ctx, *args):
        out = fn.forward(*args)
        fn.setup_context(ctx, args, out)
        return out

    return type(fn.__name__ + "Kernel", (fn,), {"forward": staticmethod(forward),
                                                "setup_context": torch.autograd.Function.setup_context})


_lib = torch.library.Library("mlellp", "IMPL")
for _name, _fn in (("posterior", _PosteriorFn), ("posterior_backward", _PosteriorBackwardFn), ("phi_jvp", _PhiJvpFn),
                   ("log_pmf", _LogPmfFn), ("posterior_multiclass", _PosteriorMulticlassFn),
                   ("posterior_weighted", _PosteriorWeightedFn)):
    _lib.impl(_name, _autograd_kernel(_name, _ctx_in_forward(_fn)), "Autograd")
# For torch.vmap over torch.ops.mlellp.* called directly (without these, vmap loops over the batch).
for _name, _rule in (("posterior", _posterior_vmap), ("posterior_backward", _posterior_backward_vmap),
                     ("phi_jvp", _phi_jvp_vmap), ("log_pmf", _log_pmf_vmap),
                     ("posterior_multiclass", _posterior_multiclass_vmap),
                     ("posterior_weighted", _posterior_weighted_vmap)):
    torch.library.register_vmap(f"mlellp::{_name}", functools.partial(_rule, getattr(torch.ops.mlellp, _name)),
                                lib=_lib)


# ------------------------------------------------------------------ Python API
def _apply(fn, op, *args):
    """The op, or under a torch.func transform its autograd.Function (which the
    transform needs to see to differentiate or batch it)."""
    if not torch.compiler.is_compiling() and _is_functorch_wrapped(*args):
        return fn.apply(*args)
    return op(*args)


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
    phi, log_lik = _apply(_PosteriorFn, torch.ops.mlellp.posterior, flat, offsets, counts)
    if nested:
        phi = torch.nested.nested_tensor_from_jagged(phi, offsets)
    return phi, log_lik


def posterior_multiclass(logits, offsets, counts, *, max_states: int = DEFAULT_MAX_STATES):
    """Multi-class E-step: class posteriors and log-likelihood of each bag's count vector.

    With h_i ~ Categorical(softmax(logits[i])) independent, returns
    ``(phi, log_likelihood)`` with ``phi[i, c] = P(h_i = c | counts[b])`` and
    ``log_likelihood[b] = log P(counts[b])`` (the probability that bag b holds
    exactly ``counts[b, c]`` instances of each class c), computed exactly over
    the lattice of count vectors below ``counts[b]``: O(C * S_b) time and
    2 S_b table entries per bag, ``S_b = prod_c (counts[b, c] + 1)``.

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
    for name, t in (("logits", logits), ("offsets", offsets), ("counts", counts)):
        if getattr(t, "is_nested", False):
            raise ValueError(f"posterior_multiclass: {name} must be a plain tensor, got a nested tensor")
    _check_max_states("posterior_multiclass", max_states)
    return _apply(_PosteriorMulticlassFn, torch.ops.mlellp.posterior_multiclass, logits, offsets, counts,
                  int(max_states))


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
    out = _apply(_LogPmfFn, torch.ops.mlellp.log_pmf, flat, offsets)
    if nested:
        pmf_offsets = offsets + torch.arange(offsets.numel(), device=offsets.device)
        out = torch.nested.nested_tensor_from_jagged(out, pmf_offsets)
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
    for name, t in (("logits", logits), ("offsets", offsets), ("count_log_weights", count_log_weights)):
        if getattr(t, "is_nested", False):
            raise ValueError(f"posterior_weighted: {name} must be a plain tensor, got a nested tensor")
    return _apply(_PosteriorWeightedFn, torch.ops.mlellp.posterior_weighted, logits, offsets, count_log_weights)


def bag_log_likelihood(logits, offsets=None, counts=None, reduction: str = "mean", *,
                       max_states: int = DEFAULT_MAX_STATES):
    """Differentiable log-likelihood ``log P(S_b = counts[b])`` of observed bag counts.

    Maximise it (minimise its negative) to fit logits to bag counts directly;
    its gradient w.r.t. logits[i] is ``phi[i] - sigmoid(logits[i])``.

    Args:
        logits, offsets, counts: as in :func:`posterior` (nested logits too;
            (N, C) logits with (B, C) counts for multi-class bags).
        reduction: ``'none'`` (per bag, shape (B,)), ``'mean'`` over bags
            (default; over zero bags it is 0, the empty sum, with a zero gradient)
            or ``'sum'``.
        max_states: multi-class bags only, :func:`posterior_multiclass`'s state budget.

    Example:
        >>> z = torch.randn(5, requires_grad=True)
        >>> loss = -bag_log_likelihood(z, offsets_from_sizes([3, 2]), torch.tensor([1, 2]))
        >>> loss.backward()
    """
    check_reduction("bag_log_likelihood", reduction)
    _, log_lik = posterior(logits, offsets, counts, max_states=max_states)
    return reduce_over_bags(log_lik, reduction)
