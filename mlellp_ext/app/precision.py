"""Mixed precision, compilation and memory format of the trained network (``--amp``, ``--compile``).

* ``--amp bf16|fp16``: the network's ``forward`` (and ``class_logits``/``features``,
  which LLP-GAN calls) runs under ``torch.autocast`` with that dtype; the methods
  take its logits in float32 (``.float()``), so losses and the E-step stay in
  float32 or better. fp16 adds a gradient scaler per optimiser
  (``torch.amp.GradScaler``), which ``methods.gradient_step`` uses; its state is
  in the checkpoints.
* ``--compile``: ``nn.Module.compile()`` of the network (in place: its state_dict,
  checkpoints and model.pt are unchanged).
* On CUDA, convolutional backbones run in channels_last memory format.
"""
from __future__ import annotations

import functools

import torch

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_model(model: torch.nn.Module, device: torch.device, amp: str, compile: bool) -> torch.nn.Module:
    """The network as it trains: autocast for ``amp``, channels_last on CUDA, compiled if asked."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if amp != "off":
        # A subclass of the network's own class whose methods run under autocast: a
        # copy (copy.deepcopy, an EMA teacher) keeps it and runs its own weights, and
        # the state_dict is the network's own. (Methods wrapped on the instance would
        # be shared by a copy, still bound to the original network.)
        model.__class__ = _autocast_class(type(model), device.type, _DTYPES[amp])
    if compile:
        model.compile()
    return model


@functools.lru_cache(maxsize=None)
def _autocast_class(cls: type, device_type: str, dtype: torch.dtype) -> type:
    """cls with forward (and class_logits/features, which LLP-GAN calls) under autocast."""
    if getattr(cls, "_mlellp_autocast", None) is not None:
        cls = cls.__bases__[0]  # prepared again: replace the wrapper, do not nest it
    methods = {name: _autocast(getattr(cls, name), device_type, dtype)
               for name in ("forward", "class_logits", "features") if hasattr(cls, name)}
    return type(f"Autocast{cls.__name__}", (cls,),
                {**methods, "__module__": cls.__module__, "_mlellp_autocast": (device_type, dtype)})


def _autocast(fn, device_type: str, dtype: torch.dtype):
    """fn under a fresh torch.autocast per call. (One autocast object shared by nested
    calls, forward calling features, would restore the wrong state on exit and leave
    autocast on for the whole process.)"""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        # Outputs in float32: every loss (LLP-GAN's on class_logits and features too) stays there.
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return run


def attach_grad_scalers(amp: str, device: torch.device, *optimizers) -> None:
    """Give each optimiser the gradient scaler that fp16 needs (None otherwise); see
    methods.gradient_step."""
    for opt in optimizers:
        opt.grad_scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None


def grad_scaler_states(*optimizers) -> list | None:
    states = [opt.grad_scaler.state_dict() for opt in optimizers if getattr(opt, "grad_scaler", None) is not None]
    return states or None


def load_grad_scaler_states(states, *optimizers) -> None:
    scalers = [opt.grad_scaler for opt in optimizers if getattr(opt, "grad_scaler", None) is not None]
    for scaler, state in zip(scalers, states or []):
        scaler.load_state_dict(state)
