"""MLE-LLP by expectation-maximisation, the application's adapter over ``EMTargets``.

Each EM iteration is one epoch:
  M-step  one pass of (binary) cross-entropy against the soft targets phi over
          shuffled *instance* minibatches (bags never need to fit in a batch);
  E-step  ``EMTargets.update``: phi and L for every training bag, exactly (for
          count vectors, bags over the state budget may take the approximate
          E-step: ``multiclass_estep`` "approx" or "auto"; the epoch reports
          how many bags did).
The E-step takes its logits either from a fresh inference pass (``fresh``:
exact EM, network in eval mode, no augmentation) or from the logits recorded
during the M-step epoch (``recorded``: no extra pass, logits from a network
that changed during the epoch and saw augmented inputs). Training stops when
``EMTargets.converged``.

Under torchrun each rank runs both steps on its own shard of the bags, with
gradients averaged over the ranks at every M-step minibatch, and L is the mean
over all ranks' bags, so every rank takes the same decision to stop.
"""
from __future__ import annotations

import time

import torch

from ...em import DEFAULT_MIN_ITERATIONS, DEFAULT_TOL, EMTargets
from ..batches import infer_logits
from .common import Method, fit_targets

ESTEP_MODES = ("fresh", "recorded")


class EM(Method):
    """The MLE-LLP method: state is an EMTargets (one soft target per training instance)."""

    name = "mle"

    def __init__(self, offsets, counts, batch_size: int, estep: str, tol: float = DEFAULT_TOL,
                 min_epochs: int = DEFAULT_MIN_ITERATIONS, multiclass_estep: str = "exact", count_log_weights=None):
        if estep not in ESTEP_MODES:
            raise ValueError(f"--estep must be one of {ESTEP_MODES}, got {estep!r}")
        # Counts known up to a likelihood (noise, intervals): the E-step conditions on it.
        observed = count_log_weights if count_log_weights is not None else counts
        self.em = EMTargets(offsets, observed, tol=tol, min_iterations=min_epochs,
                            estep=multiclass_estep if counts.dim() == 2 else "exact")
        self.estep, self.batch_size = estep, batch_size

    @property
    def converged(self) -> bool:
        return self.em.converged

    def epoch(self, *, model, optimizer, batches, inputs, world, progress) -> dict:
        t0 = time.perf_counter()
        loss, recorded = fit_targets(model, optimizer, self.em.targets, batches, inputs, world, progress)
        t1 = time.perf_counter()
        logits = infer_logits(model, inputs, torch.arange(self.em.num_instances), self.batch_size) \
            if self.estep == "fresh" else recorded
        t2 = time.perf_counter()
        L = self.em.update(logits, group=world.group)
        t3 = time.perf_counter()
        return {"train_loss": loss, "L": L, "m_step_seconds": t1 - t0, "inference_seconds": t2 - t1,
                "e_step_seconds": t3 - t2, "approximated_bags": self.em.approximated_bags}

    def state_dict(self):
        return self.em.state_dict()

    def load_state_dict(self, state):
        self.em.load_state_dict(state)
