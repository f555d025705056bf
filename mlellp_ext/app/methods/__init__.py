"""The training methods and their registry.

``METHODS`` maps a method's name (``mlellp train --method NAME``) to its
:class:`MethodSpec`; the CLI's choices, the trainer and the experiments all read
it, and :func:`register_method` adds one (an experiment's variant, say). The
trainer builds a method with :func:`build_method`, which passes the method's
constructor exactly the arguments it names from what the trainer offers:

* ``offsets``, ``counts``: this process's training bags (positions 0..M-1);
  counts (B,) for two classes, (B, C) count vectors for C >= 3 (only methods
  registered with ``multiclass=True`` are run on those);
* ``labels``: the instance labels of those positions, offered only to a method
  registered with ``needs_labels=True`` (the supervised baseline);
* ``model``, ``device``, ``image_shape`` (C, H, W), ``batch_size``, ``lr``,
  ``width``, ``seed``;
* EM's options ``estep``, ``tol``, ``min_epochs``, ``multiclass_estep``;
  LLP-GAN's ``gan_weight``.

The interface a method implements is in :mod:`.common`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from .baselines import DLLP, DirectLikelihood, Supervised
from .common import Method, gradient_step
from .em import EM, ESTEP_MODES
from .llpgan import LLPGAN

__all__ = ["EM", "ESTEP_MODES", "METHODS", "Method", "MethodSpec", "build_method", "construct", "gradient_step",
           "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type  # the method's class (or any callable naming its arguments)
    help: str
    num_outputs: int = 1  # network outputs for two classes: LLP-GAN's discriminator has K = 2 real-class logits
    needs_labels: bool = False  # only then does the method get instance labels
    backbone: str | None = None  # the one backbone the method works with, if any
    multiclass: bool = False  # whether it trains C-way classifiers from (B, C) count vectors ((N, C) logits)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, cls, help: str, *, num_outputs: int = 1, needs_labels: bool = False,
                    backbone: str | None = None, multiclass: bool = False, replace: bool = False) -> MethodSpec:
    """Add a method under ``name`` (an error if the name is taken, unless ``replace``).
    ``multiclass=True`` says it also trains from count vectors: its network then has
    one output per class and it gets (B, C) counts."""
    if name in METHODS and not replace:
        raise ValueError(f"a method named {name!r} is registered already")
    METHODS[name] = MethodSpec(name, cls, help, num_outputs, needs_labels, backbone, multiclass)
    return METHODS[name]


def construct(cls, offered: dict):
    """``cls(...)`` with the arguments it names among ``offered`` (all of them if it
    takes ``**kwargs``); a required argument that is not offered is a TypeError."""
    params = inspect.signature(cls).parameters
    if any(v.kind == v.VAR_KEYWORD for v in params.values()):
        return cls(**offered)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in offered
               and v.kind != v.VAR_POSITIONAL]
    if missing:
        raise TypeError(f"{getattr(cls, '__name__', cls)} needs {', '.join(missing)}, which the trainer does not "
                        f"offer (it offers {', '.join(sorted(offered))})")
    return cls(**{p: offered[p] for p in params if p in offered})


def build_method(name: str, **offered):
    """The method ``name`` built from the arguments its constructor names among ``offered``
    (``labels`` only for a method registered with ``needs_labels=True``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[name]
    if not spec.needs_labels:
        offered.pop("labels", None)
    try:
        return construct(spec.cls, offered)
    except TypeError as e:
        if "which the trainer does not offer" in str(e):
            raise TypeError(f"method {name!r}: {e}") from None
        raise


register_method("mle", EM, "EM (MLE-LLP, the default)", multiclass=True)
register_method("mle-direct", DirectLikelihood, "-log P(y|X) by gradient descent on minibatches of bags",
                multiclass=True)
register_method("dllp", DLLP, "DLLP's bag-proportion loss", multiclass=True)
register_method("supervised", Supervised, "instance labels (the upper bound)", needs_labels=True, multiclass=True)
register_method("llpgan", LLPGAN, "LLP-GAN", num_outputs=2, backbone="cnn", multiclass=True)
