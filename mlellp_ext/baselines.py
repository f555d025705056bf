"""Methods beside EM, sharing data, backbone, optimiser and augmentation with it.

* ``supervised``: BCE against the true instance labels (the upper bound).
* ``dllp``: bags in minibatches; cross-entropy between the bag proportion
  y/n and the mean of the instance *probabilities* (Ardehaly & Culotta 2017).
* ``mle-direct``: the same objective as EM, -log P(y | X), minimised directly
  by gradient descent on minibatches of whole bags (bag_log_likelihood).

Each records the logits it computes during the epoch, and reports the mean
training-bag log-likelihood L of those logits so all methods log the same
quantity (at the cost of one posterior call, a few milliseconds).

Under torchrun they take their minibatches from the trainer's helpers (the
same number on every rank), average gradients over the ranks before every
step, and report losses and L averaged over all ranks (see distributed.py).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import distributed
from .bags import bag_index
from .data import DataError
from .em import e_step, m_step
from .ops import bag_log_likelihood


class _Baseline:
    converged = False  # only EM has a stopping rule; baselines run all epochs
    own_optimizers = ()  # optimisers besides the trainer's (the learning-rate schedule sets them too)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def _result(self, trainer, loss, recorded, t0):
        """The epoch's stats from `loss`, the mean training loss over all ranks
        (trainer.instance_mean), and the logits recorded for this rank's instances."""
        bags = trainer.train_bags
        _, L = e_step(recorded, bags.offsets, bags.counts)
        L = distributed.bag_mean(trainer, L, bags.counts.numel())
        return {"train_loss": loss, "L": L, "m_step_seconds": time.perf_counter() - t0,
                "e_step_seconds": None, "inference_seconds": None}


class Supervised(_Baseline):
    name = "supervised"

    def __init__(self, trainer):
        y = trainer.data.y
        if y is None:
            raise DataError("--method supervised needs instance labels, and this dataset has none")
        self.targets = y[trainer.train_bags.index].float()

    def epoch(self, trainer):
        t0 = time.perf_counter()
        loss, recorded = m_step(trainer, self.targets)
        return self._result(trainer, loss, recorded, t0)


class _BagMethod(_Baseline):
    def bag_loss(self, logits, batch):
        raise NotImplementedError

    def epoch(self, trainer):
        t0 = time.perf_counter()
        model, bags = trainer.model, trainer.train_bags
        model.train()
        recorded = torch.empty(bags.index.numel())
        total, seen = 0.0, 0
        batches = distributed.bag_batches(trainer)
        for batch in trainer.progress(batches, self.name):
            logits = model(trainer.preprocess(bags.index[batch.positions], train=True)).float()
            loss = self.bag_loss(logits, batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sync_gradients(trainer)
            trainer.optimizer.step()
            recorded[batch.positions] = logits.detach().cpu()
            total += loss.item() * batch.counts.numel()
            seen += batch.counts.numel()
        return self._result(trainer, distributed.instance_mean(trainer, total, seen), recorded, t0)


class DLLP(_BagMethod):
    name = "dllp"

    def __init__(self, trainer):
        pass

    def bag_loss(self, logits, batch):
        device = logits.device
        offsets = batch.offsets.to(device)
        sizes = (offsets[1:] - offsets[:-1]).float()
        bag = bag_index(offsets, logits.shape[0])
        # Mean of probabilities (not of log-probabilities) over each bag.
        mean_p = torch.zeros(sizes.numel(), device=device).index_add(0, bag, torch.sigmoid(logits)) / sizes
        target = batch.counts.to(device).float() / sizes
        return F.binary_cross_entropy(mean_p.clamp(1e-7, 1 - 1e-7), target)


class DirectLikelihood(_BagMethod):
    name = "mle-direct"

    def __init__(self, trainer):
        pass

    def bag_loss(self, logits, batch):
        return -bag_log_likelihood(logits, batch.offsets.to(logits.device), batch.counts.to(logits.device))
