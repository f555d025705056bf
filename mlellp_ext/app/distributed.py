"""Multi-process data-parallel training under ``torchrun`` (torch.distributed).

``torchrun --nproc-per-node K -m mlellp_ext train ...`` starts K processes
(ranks). Each one

* holds a shard of the training bags: whole bags, never split, balanced by
  instance count (:func:`shard_assignment`, the same on every rank);
* trains the same model on minibatches of its own shard of
  ``ceil(batch_size / K)`` instances (the global minibatch is ``batch_size``),
  averaging gradients over the ranks before every optimiser step and using
  rank 0's buffers, as ``DistributedDataParallel`` does (``sync.sync_gradients``);
* runs every epoch the same number of optimiser steps as the other ranks (a
  rank with fewer batches repeats some, freshly shuffled), so no collective
  waits for a rank that has already finished;
* computes its E-step on its own bags; the log-likelihood L, the training loss
  and the test metrics are reduced over all ranks, so they, and the stopping
  rule, are the same on every rank.

Backend ``nccl`` when training on GPUs (device ``cuda:LOCAL_RANK``), ``gloo``
on CPU; small objects and scalars always travel through a gloo group on the
CPU. Without torchrun (``WORLD_SIZE`` unset or 1) nothing here creates a
process group and every helper returns what the single-process code computed.

Gradients are averaged with one ``all_reduce`` of a flat buffer per step
instead of by wrapping the model in ``nn.parallel.DistributedDataParallel``:
methods call the network through other entry points than ``forward`` (LLP-GAN's
``class_logits`` and ``features``, which DDP's hooks would not see), train
several networks with several backward passes per step, and run inference on
shards of different sizes, where DDP's per-forward buffer broadcast would
wait forever. The arithmetic is DDP's: the mean of the ranks' gradients.

A training method (``mlellp_ext.app.methods``) is data-parallel correct when it

1. iterates over the minibatches it is given (``batches.instances()`` /
   ``batches.bags()``, :class:`mlellp_ext.app.batches.Batches`), which have the same
   number of steps on every rank, instead of building its own;
2. takes every optimiser step through ``methods.common.gradient_step``, which
   averages the gradients of the networks it names over the ranks;
3. reports quantities averaged over bags or instances through
   :func:`bag_mean` / :func:`instance_mean` (or ``EMTargets.update(..., group=world.group)``),
   so the logs agree across ranks;
4. keeps per-rank state (e.g. one soft target per instance of its shard) in
   its ``state_dict()``: the checkpoint stores every rank's ``state_dict()``;
5. builds any network of its own in ``__init__``: the Trainer creates the
   method before it gives each rank its own random seed, so such networks
   start identical on every rank.

The training loop checks after every epoch that the model's parameters are
still identical on all ranks, and stops with an error naming the fix if not.
"""
from __future__ import annotations

import atexit
import datetime
import heapq
import os
from dataclasses import dataclass

import torch

from .data import DataError

__all__ = [
    "DistributedError",
    "World",
    "bag_mean",
    "instance_mean",
    "per_rank_batch_size",
    "resolve_device",
    "setup",
    "shard_assignment",
    "shutdown",
]


class DistributedError(RuntimeError):
    """A problem with a multi-process run (launch, world size, resume)."""


@dataclass
class World:
    """This process's place among the ranks; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None  # set for multi-process runs only
    cpu_group: object = None  # gloo group for objects and scalars (None: the default group)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group for reductions of scalars on the CPU (None for a single
        process): what ``EMTargets.update(..., group=)`` takes."""
        if not self.distributed:
            return None
        import torch.distributed as dist

        return self.cpu_group if self.cpu_group is not None else dist.group.WORLD


SINGLE = World()
_CPU_GROUP = None  # the gloo group beside an nccl default group (created once, on every rank)
_CREATED = False  # whether setup() created the default process group (shutdown() destroys it)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda if available), cpu, cuda or cuda:K, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DataError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def setup(device_name: str) -> World:
    """The World of this process. Under torchrun (WORLD_SIZE > 1) initialises the
    default process group (nccl on GPUs, gloo on CPU) unless one exists already,
    and picks the device cuda:LOCAL_RANK or cpu; otherwise returns a single-process
    World and creates nothing.

    The group stays for later calls (re-creating a destroyed default group under
    torchrun's store can hang); shutdown() destroys it: ``mlellp train`` calls it
    at the end, and it is registered with atexit for callers of train()."""
    size = launched_world_size()
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", -1)
    if not 0 <= rank < size or local_rank < 0:
        raise DistributedError(f"WORLD_SIZE={size} needs RANK in [0, {size}) and LOCAL_RANK >= 0 "
                               f"(got RANK={os.environ.get('RANK')!r}, LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}); "
                               f"launch with torchrun")
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise DistributedError(f"--device {device_name}: under torchrun each process uses cuda:LOCAL_RANK; "
                                   f"pass --device cuda or auto (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                                   f"visible; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    global _CREATED, _CPU_GROUP
    if not dist.is_initialized():
        # torch._dynamo, imported lazily by the first optimizer otherwise, keeps references to
        # a process group that exists when it is imported: destroy_process_group() could not
        # free it, and its gloo threads, torn down at interpreter exit, abort now and then.
        import torch._dynamo  # noqa: F401

        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        if not _CREATED:
            atexit.register(shutdown)
        _CREATED = True
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise DistributedError(f"the process group has world size {dist.get_world_size()} and rank "
                               f"{dist.get_rank()}, the environment says {size} and {rank}")
    backend = dist.get_backend()
    cpu_group = None
    if backend != "gloo":
        # Objects and scalars live on the CPU: give them a gloo group.
        if _CPU_GROUP is None:
            _CPU_GROUP = dist.new_group(backend="gloo")
        cpu_group = _CPU_GROUP
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend, device=device,
                 cpu_group=cpu_group)


def shutdown() -> None:
    """Destroy the default process group if setup() created it (no-op otherwise)."""
    global _CREATED, _CPU_GROUP
    if not _CREATED:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _CREATED, _CPU_GROUP = False, None


# ---------------------------------------------------------------------------
# Sharding


def shard_assignment(bags, size: int) -> list[torch.Tensor]:
    """Bag numbers (int64, ascending) of each of `size` ranks: whole bags, every
    bag exactly once, balanced by instance count (largest bags first, each to
    the rank with the fewest instances so far, then fewest bags, then lowest
    rank). Deterministic: the same on every rank and every run."""
    sizes = (bags.offsets[1:] - bags.offsets[:-1]).tolist()
    order = sorted(range(len(sizes)), key=lambda b: (-sizes[b], b))
    heap = [(0, 0, r) for r in range(size)]
    parts: list[list[int]] = [[] for _ in range(size)]
    for b in order:
        load, nbags, r = heapq.heappop(heap)
        parts[r].append(b)
        heapq.heappush(heap, (load + sizes[b], nbags + 1, r))
    return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]


# ---------------------------------------------------------------------------
# Collectives (all no-ops for a single process)


def _group(world: World):
    return world.cpu_group


def all_sum(world: World, values) -> list[float]:
    """Element-wise float64 sums of `values` over the ranks (the same on every rank)."""
    values = [float(v) for v in values]
    if not world.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_group(world))
    return t.tolist()


def all_max(world: World, value: int) -> int:
    if not world.distributed:
        return int(value)
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group(world))
    return int(t)


def all_gather_objects(world: World, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj, group=_group(world))
    return out


def gather_to_main(world: World, obj):
    """Every rank's `obj` in rank order on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0, group=_group(world))
    return out


def barrier(world: World) -> None:
    """Wait until every rank gets here."""
    if world.distributed:
        import torch.distributed as dist

        dist.barrier(group=_group(world))


def broadcast_from_main(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_group(world))
    return box[0]


def bag_mean(world: World, mean: float, num_bags: int) -> float:
    """The mean over all ranks' bags of a per-bag quantity whose mean over this
    rank's `num_bags` bags is `mean` (returned unchanged for a single process)."""
    if not world.distributed:
        return mean
    total, count = all_sum(world, [mean * num_bags, num_bags])
    return total / count if count else 0.0


def instance_mean(world: World, total: float, seen: int) -> float:
    """sum over ranks of `total` / sum over ranks of `seen` (for one process:
    ``total / max(seen, 1)``)."""
    if not world.distributed:
        return total / max(seen, 1)
    total, seen = all_sum(world, [total, seen])
    return total / max(seen, 1)


# ---------------------------------------------------------------------------
# Minibatches: the same number on every rank


def per_rank_batch_size(batch_size: int, world: World) -> int:
    """Instances per minibatch on each rank: batch_size / world size, rounded up,
    so the global minibatch is (about) batch_size."""
    return max(1, -(-int(batch_size) // world.size))


def pad_to(batches: list, steps: int, more) -> list:
    """`batches` extended to `steps` items with batches of fresh shuffles (`more()`)."""
    while len(batches) < steps:
        extra = list(more())
        if not extra:
            raise DistributedError("a rank has no training instances to fill its minibatches")
        batches.extend(extra[: steps - len(batches)])
    return batches
