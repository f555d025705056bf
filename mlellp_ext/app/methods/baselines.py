"""Methods beside EM, sharing data, backbone, optimiser and augmentation with it.

* ``supervised``: BCE against the true instance labels (the upper bound).
* ``dllp``: bags in minibatches; ``dllp_loss``, the cross-entropy between the bag
  proportion y/n and the mean of the instance *probabilities* (Ardehaly & Culotta 2017).
* ``mle-direct``: the same objective as EM, -log P(y | X), minimised directly
  by gradient descent on minibatches of whole bags (``bag_log_likelihood``).

Each records the logits it computes during the epoch, and reports the mean
training-bag log-likelihood L of those logits so all methods log the same
quantity (at the cost of one posterior call, a few milliseconds).
"""
from __future__ import annotations

import time

import torch

from ...losses import dllp_loss
from ...ops import bag_log_likelihood
from ..distributed import instance_mean
from .common import Method, epoch_stats, fit_targets, gradient_step, mean_log_likelihood


class Supervised(Method):
    name = "supervised"

    def __init__(self, offsets, counts, labels):
        self.offsets, self.counts = offsets, counts
        self.labels = labels.float()  # of the training positions

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        loss, recorded = fit_targets(model, optimizer, lambda pos: self.labels[pos], batches, inputs, world,
                                     progress, self.name)
        return epoch_stats(loss, mean_log_likelihood(recorded, self.offsets, self.counts, world), t0)


class _BagLoss(Method):
    """Gradient descent on a loss of whole bags, over minibatches of bags."""

    def __init__(self, offsets, counts):
        self.offsets, self.counts = offsets, counts

    def bag_loss(self, logits, offsets, counts):
        raise NotImplementedError

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        model.train()
        recorded = torch.empty(batches.num_instances)
        total, seen = 0.0, 0
        for batch in progress(batches.bags(), self.name):
            logits = model(inputs(batch.positions, train=True)).float()
            loss = self.bag_loss(logits, batch.offsets.to(logits.device), batch.counts.to(logits.device))
            gradient_step(loss, optimizer, world, model)
            recorded[batch.positions] = logits.detach().cpu()
            total += loss.item() * batch.counts.numel()
            seen += batch.counts.numel()
        L = mean_log_likelihood(recorded, self.offsets, self.counts, world)
        return epoch_stats(instance_mean(world, total, seen), L, t0)


class DLLP(_BagLoss):
    name = "dllp"

    def bag_loss(self, logits, offsets, counts):
        return dllp_loss(logits, offsets, counts)


class DirectLikelihood(_BagLoss):
    name = "mle-direct"

    def bag_loss(self, logits, offsets, counts):
        return -bag_log_likelihood(logits, offsets, counts)
