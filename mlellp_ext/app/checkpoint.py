"""Checkpoints (``checkpoint.pt``, every epoch) and the trained model (``model.pt``).

One path for one process and for torchrun: every rank contributes its own part
(the method's state, e.g. EM's targets for its shard of the bags, and its RNG
states) and rank 0 gathers them; a world of one process gathers to itself. The
model and optimiser are rank 0's (identical on every rank, checked every epoch).
A checkpoint of one process holds its part at the top level, one of K processes
under ``"ranks"`` with ``"world_size"``: the formats of earlier versions."""
from __future__ import annotations

import os

import torch

from . import distributed
from .distributed import resolve_device
from .methods import METHODS
from .models import build_backbone
from .outputs import replaced_atomically
from .precision import grad_scaler_states, load_grad_scaler_states


def to_cpu(obj):
    """`obj` with every tensor in it moved to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_save(obj, path: str) -> None:
    with replaced_atomically(path) as tmp:
        torch.save(obj, tmp)


def _cuda_rng_state(world, device):
    """One process: every visible GPU's generator; under torchrun: this rank's GPU's."""
    if world.distributed:
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_cuda_rng_state(world, device, saved) -> None:
    if saved is None:
        return
    if world.distributed:
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved, device)
    elif torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved)


def checkpoint_state(epoch: int, history: list, *, config: dict, model, optimizer, method, generator, bag_ids,
                     device, world):
    """The checkpoint after `epoch` (0-based): a collective (call it on every rank); rank 0
    gets the state, the other ranks None. `bag_ids`: this rank's training bags."""
    mine = {"method": to_cpu(method.state_dict()), "torch_rng": torch.get_rng_state(),
            "generator": generator.get_state(), "history": history}
    if world.distributed:  # what a resumed rank checks it has the same bags by
        mine["bag_ids"] = list(bag_ids)
    cuda_rng = _cuda_rng_state(world, device)
    if cuda_rng is not None:
        mine["cuda_rng"] = cuda_rng
    ranks = distributed.gather_to_main(world, mine)
    if not world.is_main:
        return None
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
             "config": config}
    state.update({"world_size": world.size, "ranks": ranks} if world.distributed else ranks[0])
    scalers = grad_scaler_states(optimizer, *method.own_optimizers)  # the same on every rank
    if scalers is not None:
        state["grad_scalers"] = scalers
    return state


def load_checkpoint(path: str, world):
    """The checkpoint at `path`: rank 0 reads it and sends it to every rank."""
    state = None
    if world.is_main and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = distributed.broadcast_from_main(world, state)
    if state is None:
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return state


def restore(state: dict, *, model, optimizer, method, generator, bag_ids, device, world) -> list[dict]:
    """Load a checkpoint into the run's parts (its options checked before: config.check_resume_config);
    returns the history of the epochs it holds."""
    saved = int(state.get("world_size", 1))
    if saved != world.size:
        raise distributed.DistributedError(
            f"--resume: the checkpoint was written by {saved} process{'es' if saved > 1 else ''} and this "
            f"run has {world.size}; resume with the same number of processes "
            f"({'a plain run, without torchrun' if saved == 1 else f'torchrun with {saved} processes in all'})")
    mine = state["ranks"][world.rank] if world.distributed else state
    if world.distributed and list(mine["bag_ids"]) != list(bag_ids):
        raise distributed.DistributedError(
            f"--resume: rank {world.rank}'s training bags differ from the checkpoint's; "
            f"resume with the same data options and seed")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    load_grad_scaler_states(state.get("grad_scalers"), optimizer, *method.own_optimizers)
    method.load_state_dict(mine["method"])
    torch.set_rng_state(mine["torch_rng"])
    generator.set_state(mine["generator"])
    _set_cuda_rng_state(world, device, mine.get("cuda_rng"))
    return list(mine["history"])


def model_payload(config: dict, model, num_outputs: int, in_channels: int, classes) -> dict:
    """What model.pt holds: the weights and what rebuilds the network (load_model)."""
    return {"state_dict": model.state_dict(), "config": config, "num_outputs": num_outputs,
            "in_channels": in_channels, "classes": list(classes)}


def load_model(path: str, device: str = "auto"):
    """(model in eval mode, payload) from a model.pt written by train()."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    cfg = payload["config"]
    # Files written before 0.2 have no num_outputs: their methods are all registered.
    num_outputs = payload["num_outputs"] if "num_outputs" in payload else METHODS[cfg["method"]].num_outputs
    model = build_backbone(cfg["backbone"], payload["in_channels"], num_outputs, cfg["width"], None)
    model.load_state_dict(payload["state_dict"])
    model.to(resolve_device(device)).eval()
    return model, payload

