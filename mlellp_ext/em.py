"""MLE-LLP by expectation-maximisation: the E-step and the M-step.

Each EM iteration is one epoch:
  M-step  one pass of binary cross-entropy against the soft targets phi over
          shuffled *instance* minibatches (bags never need to fit in a batch);
  E-step  phi_i = P(h_i = 1 | S_b = y_b) and L = mean_b log P(S_b = y_b) for
          every training bag, exactly, with torch.ops.mlellp.posterior.
The E-step takes its logits either from a fresh inference pass (``fresh``:
exact EM, network in eval mode, no augmentation) or from the logits recorded
during the M-step epoch (``recorded``: no extra pass, logits from a network
that changed during the epoch and saw augmented inputs).
Training stops once |L - L_previous| < tol, but not within the first
min_epochs iterations: at the start a network that still predicts about the
bag proportions for everything leaves L nearly flat, and the rule alone would
stop there (seen on digits with some seeds).

Under torchrun each rank runs both steps on its own shard of the bags, with
gradients averaged over the ranks at every M-step minibatch, and L is the mean
over all ranks' bags, so every rank takes the same decision to stop.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import distributed
from .batches import infer_logits
from .ops import posterior

ESTEP_MODES = ("fresh", "recorded")


def e_step(logits: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor):
    """Soft targets phi (float32) and mean bag log-likelihood L of the bags."""
    phi, log_lik = posterior(logits.detach().float(), offsets, counts)  # targets: no graph back to the logits
    return phi, float(log_lik.mean()) if log_lik.numel() else 0.0


def m_step(trainer, targets: torch.Tensor):
    """One epoch of BCE against `targets` over shuffled instance minibatches.
    Returns (mean loss over all ranks, logits recorded for every training instance
    of this rank)."""
    model, bags = trainer.model, trainer.train_bags
    model.train()
    recorded = torch.empty(bags.index.numel())
    total, seen = 0.0, 0
    for pos in trainer.progress(distributed.instance_batches(trainer), "M-step"):
        logits = model(trainer.preprocess(bags.index[pos], train=True))
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets[pos].to(logits.device))
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sync_gradients(trainer)
        trainer.optimizer.step()
        recorded[pos] = logits.detach().float().cpu()
        total += loss.item() * pos.numel()
        seen += pos.numel()
    return distributed.instance_mean(trainer, total, seen), recorded


class EM:
    """The MLE-LLP method: state is phi (one soft target per training instance)."""

    name = "mle"
    own_optimizers = ()  # optimisers besides the trainer's (the learning-rate schedule sets them too)

    def __init__(self, trainer, estep: str = "fresh", tol: float = 1e-4, min_epochs: int = 10):
        if estep not in ESTEP_MODES:
            raise ValueError(f"--estep must be one of {ESTEP_MODES}, got {estep!r}")
        bags = trainer.train_bags
        sizes = bags.offsets[1:] - bags.offsets[:-1]
        # Initial targets: every instance gets its bag's proportion y_b / n_b.
        self.phi = torch.repeat_interleave(bags.counts.float() / sizes.clamp(min=1).float(), sizes)
        self.estep, self.tol, self.min_epochs = estep, tol, min_epochs
        self.iterations = 0
        self.last_L = None
        self.converged = False

    def epoch(self, trainer) -> dict:
        t0 = time.perf_counter()
        loss, recorded = m_step(trainer, self.phi)
        t1 = time.perf_counter()
        bags = trainer.train_bags
        logits = infer_logits(trainer.model, trainer.preprocess, bags.index, trainer.cfg.batch_size) \
            if self.estep == "fresh" else recorded
        t2 = time.perf_counter()
        self.phi, L = e_step(logits, bags.offsets, bags.counts)
        L = distributed.bag_mean(trainer, L, bags.counts.numel())  # over all ranks' bags
        t3 = time.perf_counter()
        self.iterations += 1
        self.converged = (self.iterations >= self.min_epochs and self.last_L is not None
                          and abs(L - self.last_L) < self.tol)
        self.last_L = L
        return {"train_loss": loss, "L": L, "m_step_seconds": t1 - t0, "inference_seconds": t2 - t1,
                "e_step_seconds": t3 - t2}

    def state_dict(self):
        return {"phi": self.phi, "last_L": torch.tensor(float("nan") if self.last_L is None else self.last_L),
                "converged": torch.tensor(self.converged), "iterations": torch.tensor(self.iterations)}

    def load_state_dict(self, state):
        self.phi = state["phi"]
        last = float(state["last_L"])
        self.last_L = None if last != last else last
        self.converged = bool(state["converged"])
        self.iterations = int(state["iterations"])
