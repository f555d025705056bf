"""How the op families register with the dispatcher, and what they share to do it.

The kernels are C++/CUDA (csrc/ops); each family module registers what Python
adds: fake kernels (shapes for torch.compile / meta tensors), Autograd kernels and
vmap rules, and holds its Python API, which also serves torch.func transforms.

The Autograd kernels are registered by hand (:func:`register`), not with
torch.library.register_autograd, whose autograd.Function has no jvp: dual tensors
would pass through with no tangent. The same autograd.Functions, applied from the
Python API (:func:`apply`), also serve torch.func transforms (they need
setup_context and a vmap rule, which a kernel cannot give).
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as forward_ad

from ._checks import check_layout, compute_dtype

lib = torch.library.Library("mlellp", "IMPL")


def register(name, fn, vmap_rule):
    """Register the autograd.Function ``fn`` as mlellp::<name>'s Autograd kernel, and
    ``vmap_rule(call, info, in_dims, *args)`` as the vmap rule of both: of ``fn``
    (torch.func over the Python API) calling ``fn.apply``, and of the op (torch.vmap
    over torch.ops.mlellp.<name> called directly; without it vmap loops over the
    batch) calling the op."""
    fn.vmap = staticmethod(functools.partial(vmap_rule, fn.apply))
    lib.impl(name, _autograd_kernel(name, _ctx_in_forward(fn)), "Autograd")
    torch.library.register_vmap(f"mlellp::{name}", functools.partial(vmap_rule, getattr(torch.ops.mlellp, name)),
                                lib=lib)


def apply(fn, op, *args):
    """The op, or under a torch.func transform its autograd.Function (which the
    transform needs to see to differentiate or batch it)."""
    if not torch.compiler.is_compiling() and _is_functorch_wrapped(*args):
        return fn.apply(*args)
    return op(*args)


def below_autograd(name, *args):
    """torch.ops.mlellp.<name> straight to its CPU/CUDA kernel (no autograd layer)."""
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(torch.ops.mlellp, name)(*args)


def has_tangent(tensors):
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _needs_autodiff(*tensors):
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or has_tangent(tensors)


def _is_functorch_wrapped(*args):
    return any(isinstance(a, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args)


def _autograd_kernel(name, fn):
    def kernel(*args):
        if not _needs_autodiff(*[a for a in args if isinstance(a, torch.Tensor)]):
            return below_autograd(name, *args)
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


def refuse(message):
    """A backward or jvp for a derivative that has no kernel: it raises ``message``
    rather than return wrong numbers (or zeros)."""
    def derivative(ctx, *grads):
        raise RuntimeError(message)

    return staticmethod(derivative)


class FirstDerivativeFn(torch.autograd.Function):
    """A first derivative (of log-likelihoods whose phi has no derivative kernel) as a
    Function; subclasses give forward and ``backward = jvp = refuse(message)``, since
    its own derivatives would need phi's."""

    generate_vmap_rule = True  # forwards of torch ops and ops with vmap rules: jacrev, vmap(grad) work

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


def empty_phi_log_lik(logits, num_bags):
    """A fake kernel's outputs of an E-step op: phi shaped as logits, a log-likelihood per bag."""
    phi = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return phi, logits.new_empty((num_bags,), dtype=compute_dtype(logits.dtype))


def bag_sums(values, bag, num_bags):
    """Per-bag sums of values (0 for an empty bag), given the bag of each entry."""
    # Zeros that vmap (jacfwd, jacrev) batches as it batches values: index_add cannot
    # add a batched source into a fresh, unbatched zeros tensor.
    zeros = torch.zeros_like(values.sum()).expand(num_bags)
    return zeros.index_add(0, bag, values)


# ------------------------------------------------------------------ vmap rules
# Each batch entry becomes a run of extra bags (tiled_offsets), so one kernel call
# does the whole batch. `call` is the op or its autograd.Function's apply.
def batched(t, dim, batch):
    """t with its vmapped dimension first, or expanded to the batch if it has none."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)


def tile_offsets(offsets, copies, n):
    """Offsets of ``copies`` inputs of n instances laid end to end, each with the bags
    of ``offsets`` in turn (copy k's bag b is bag k * B + b)."""
    shift = torch.arange(copies, device=offsets.device, dtype=offsets.dtype).unsqueeze(1) * n
    return torch.cat([(offsets[:-1].unsqueeze(0) + shift).reshape(-1), offsets.new_tensor([copies * n])])


def tiled_offsets(op, logits, offsets, offsets_dim, check=None):
    """The offsets of a batch (batch, n, ...) of logits laid end to end (tile_offsets),
    after ``check(op, logits of one entry, offsets)`` if given (a layout check)."""
    if offsets_dim is not None:
        raise ValueError(f"{op}: vmap over offsets is not supported (every batch entry must share "
                         f"the bag layout); vmap over logits and counts instead")
    batch, n = logits.shape[0], logits.shape[1]
    if check is not None:
        check(op, logits[0] if batch else logits.new_empty(logits.shape[1:]), offsets)
    # The kernel checks offsets[0..B-1] of the tiled layout as it would the original
    # (entry 0 comes first), but a wrong offsets[-1] would shift the bags instead.
    if offsets.numel() and int(offsets[-1]) != n:
        raise ValueError(f"{op}: offsets[-1] must equal len(logits) = {n}, got offsets[{offsets.numel() - 1}] = "
                         f"{int(offsets[-1])}")
    return tile_offsets(offsets, batch, n)


def batch_call(call, logits, offsets, *args):
    """call(*args), with the batched layout explained in its errors (they index the flat call)."""
    try:
        return call(*args)
    except ValueError as e:
        num_bags, n = offsets.shape[0] - 1, logits.shape[1]
        raise ValueError(f"{e} (under vmap the batch runs as one flat call: its bag k*{num_bags} + b and "
                         f"instance k*{n} + i are bag b and instance i of batch entry k)") from None


def vmap_phi_log_lik(call, info, in_dims, logits, offsets, values, *, op):
    """The vmap rule of a binary E-step op (logits, offsets, values) -> (phi, log_likelihood),
    whose values (counts, or count log-weights in log_pmf's layout) are laid out so that
    each batch entry's are contiguous in the tiled call."""
    batch = info.batch_size
    logits = batched(logits, in_dims[0], batch)
    tiled = tiled_offsets(op, logits, offsets, in_dims[1], check_layout)
    values = batched(values, in_dims[2], batch)
    phi, log_lik = batch_call(call, logits, offsets, logits.reshape(-1), tiled, values.reshape(-1))
    return (phi.view(logits.shape), log_lik.view(batch, offsets.shape[0] - 1)), (0, 0)
