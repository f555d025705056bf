"""What every training method shares: the method interface, the gradient step, and
one epoch of fitting instance targets.

A method is an object with

* ``epoch(*, model, optimizer, batches, inputs, world, progress) -> dict``: one
  epoch of training; returns ``train_loss`` and ``L`` (the mean training-bag
  log-likelihood, logged by every method) and the seconds it spent
  (``m_step_seconds``, ``inference_seconds``, ``e_step_seconds``; None where a
  step does not exist). Arguments: the network and its optimiser; this process's
  minibatches (``batches.instances()``, ``batches.bags()``,
  :class:`~mlellp_ext.app.batches.Batches`); ``inputs(positions, train)``, the
  network inputs of training positions; the process group (``world``,
  :class:`~mlellp_ext.app.distributed.World`); ``progress(iterable, desc)``.
* ``converged`` (only EM has a stopping rule), ``own_optimizers`` (optimisers
  besides the trainer's, which the learning-rate schedule sets too), and
  ``state_dict()`` / ``load_state_dict()`` (tensors only).

Its constructor names what it needs (see ``methods.build_method``); only methods
registered with ``needs_labels=True`` get instance labels.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ...bags import bag_positions, lattice_states, offsets_from_sizes
from ...ops import DEFAULT_MAX_STATES, posterior, posterior_weighted
from ..distributed import all_sum, instance_mean
from ..sync import sync_gradients


def gradient_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, world, *modules) -> None:
    """zero_grad, backward, the gradients of ``modules`` (the networks ``optimizer``
    trains; at least one) averaged over the ranks (under torchrun; nothing for one
    process), optimiser step; through the optimiser's gradient scaler under
    ``--amp fp16``."""
    if not modules:
        raise ValueError("gradient_step: name the networks the optimiser trains (their gradients are "
                         "averaged over the processes under torchrun)")
    optimizer.zero_grad(set_to_none=True)
    scaler = getattr(optimizer, "grad_scaler", None)  # fp16 (app.precision)
    if scaler is None:
        loss.backward()
        sync_gradients(world, *modules)
        optimizer.step()
        return
    # Gradients are averaged while still scaled, so an overflow on any rank reaches every
    # rank and all skip the same steps.
    scaler.scale(loss).backward()
    sync_gradients(world, *modules)
    scaler.step(optimizer)
    scaler.update()


def instance_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The supervised loss of instance logits against targets: binary cross-entropy
    for (n,) logits (targets: probabilities of label 1), cross-entropy for (n, C)
    logits (targets: class indices (n,), or soft targets (n, C) whose rows sum to 1,
    such as EM's phi)."""
    if logits.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    if targets.dim() == 2:
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets)


class LogitRecorder:
    """The logits a method computes for every training position during an epoch:
    (M,) for a binary problem, (M, C) for C classes (shape taken from the first batch)."""

    def __init__(self, num_instances: int):
        self.num_instances, self.logits = num_instances, None

    def __call__(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = torch.empty((self.num_instances, *logits.shape[1:]))
        self.logits[positions] = logits.detach().float().cpu()

    def result(self) -> torch.Tensor:
        return self.logits if self.logits is not None else torch.empty(self.num_instances)


def fit_targets(model, optimizer, targets, batches, inputs, world, progress, desc="M-step"):
    """One epoch of (binary) cross-entropy (:func:`instance_loss`) against
    ``targets(positions)`` over shuffled instance minibatches. Returns (mean loss
    over all ranks, the logits recorded for every training position of this rank)."""
    model.train()
    recorder = LogitRecorder(batches.num_instances)
    total, seen = 0.0, 0
    for pos in progress(batches.instances(), desc):
        logits = model(inputs(pos, train=True)).float()
        loss = instance_loss(logits, targets(pos).to(logits.device))
        gradient_step(loss, optimizer, world, model)
        recorder(pos, logits)
        total += loss.item() * pos.numel()
        seen += pos.numel()
    return instance_mean(world, total, seen), recorder.result()


def mean_log_likelihood(logits, offsets, counts, world) -> float:
    """L, the mean over all ranks' bags of log P(counts_b) under these logits (multi-class
    bags over the exact E-step's state budget left out; NaN if every bag is)."""
    log_lik = log_likelihoods(logits, offsets, counts)
    kept = log_lik[~torch.isnan(log_lik)] if counts.dim() == 2 else log_lik
    counts = counts if not counts.is_floating_point() else log_lik  # one entry per bag, for the shape tests
    total, num = float(kept.double().sum()) if kept.numel() else 0.0, kept.numel()
    if world.distributed:
        total, num = all_sum(world, [total, num])
    return total / num if num else (math.nan if counts.dim() == 2 else 0.0)


def observed(counts, count_log_weights):
    """What a bag's likelihood conditions on: the count log-weights where the counts
    are known only up to noise, else the counts."""
    return counts if count_log_weights is None else count_log_weights


def log_likelihoods(logits, offsets, counts) -> torch.Tensor:
    """log P(counts_b) of every bag, exactly (``counts`` may be count log-weights:
    then log P(observation_b)); NaN for a multi-class bag over the default state
    budget (its exact value would not fit in memory). A bag's cost grows with its
    count vectors: about 45 ms for a bag of 32 over 10 classes."""
    logits = logits.detach().float()
    if counts.is_floating_point():
        return posterior_weighted(logits, offsets, counts)[1]
    if counts.dim() == 2 and counts.shape[0]:
        fits = lattice_states(counts) <= DEFAULT_MAX_STATES
        if not bool(fits.all()):
            out = torch.full((counts.shape[0],), math.nan)
            which = torch.nonzero(fits).flatten()
            if which.numel():
                out[which] = posterior(logits[bag_positions(offsets, which)], offsets_from_sizes(offsets.diff()[which]),
                                       counts[which])[1].float()
            return out
    return posterior(logits, offsets, counts)[1]


class Method:
    """Defaults of the method interface (see the module's docstring)."""

    name = ""
    converged = False
    own_optimizers = ()

    def epoch(self, *, model, optimizer, batches, inputs, world, progress) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def epoch_stats(loss, L, t0, *, inference_seconds=None, e_step_seconds=None) -> dict:
    """The dict an epoch returns, its M-step time measured from ``t0``."""
    return {"train_loss": loss, "L": L, "m_step_seconds": time.perf_counter() - t0,
            "inference_seconds": inference_seconds, "e_step_seconds": e_step_seconds}
