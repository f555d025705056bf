"""Keeping the ranks' copies of a network identical under torchrun: gradients averaged
over the ranks before every optimiser step and rank 0's buffers everywhere, as
``DistributedDataParallel`` does (:func:`sync_gradients`), rank 0's parameters at the
start (:func:`broadcast_module`) and a check after every epoch (:func:`check_in_sync`).
Every function here is a no-op for a single process; see distributed.py for why
gradients are averaged here rather than by wrapping the model in DDP."""
from __future__ import annotations

import torch

from .distributed import DistributedError, World


def _tensor_groups(tensors):
    """Lists of tensors sharing a device and dtype (one flat buffer each)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def sync_gradients(world: World, *modules) -> None:
    """Average the gradients of `modules` over the
    ranks, in place, and give every rank rank 0's buffers (e.g. batch-norm
    statistics), as DistributedDataParallel does. Call it between ``backward()``
    and ``optimizer.step()``. A parameter without a gradient on every rank keeps
    ``grad = None``; one with a gradient on some ranks gets the average with
    zeros for the others. No-op for a single process."""
    if not world.distributed:
        return
    import torch.distributed as dist

    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for group in _tensor_groups(params):
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in group], dtype=group[0].dtype,
                               device=group[0].device)
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in group]
                         + [present])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        n_present = flat[-len(group):].tolist()  # one device-to-host copy per step
        for i, p in enumerate(group):
            n = p.numel()
            if n_present[i] > 0:
                g = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n
    _broadcast_tensors(world, [b for m in modules for b in m.buffers()])


def _broadcast_tensors(world: World, tensors) -> None:
    import torch.distributed as dist

    for group in _tensor_groups(list(tensors)):
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_module(world: World, module) -> None:
    """Give every rank rank 0's parameters and buffers (done once at the start,
    as DistributedDataParallel does)."""
    if world.distributed:
        _broadcast_tensors(world, list(module.parameters()) + list(module.buffers()))


def check_in_sync(world: World, module, what: str) -> None:
    """Raise DistributedError unless `module`'s parameters are identical on every rank."""
    if not world.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        fp = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=world.cpu_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=world.cpu_group)
    if not torch.equal(hi, lo):
        raise DistributedError(
            f"{what}: the model's parameters differ between ranks. A method's training loop must take its "
            f"minibatches from the Batches it is given and every optimiser step through "
            f"methods.common.gradient_step (see mlellp_ext/app/distributed.py)")
