"""Methods beside EM, sharing data, backbone, optimiser and augmentation with it.

* ``supervised``: (binary) cross-entropy against the true instance labels (the upper bound).
* ``dllp``: bags in minibatches; ``dllp_loss``, the cross-entropy between the bag
  proportion y/n and the mean of the instance *probabilities* (Ardehaly & Culotta 2017);
  with C classes between the proportion vector y/n and the bag mean of the softmax.
* ``mle-direct``: the same objective as EM, -log P(y | X), minimised directly
  by gradient descent on minibatches of whole bags (``bag_log_likelihood``).

Each records the logits it computes during the epoch, and reports the mean
training-bag log-likelihood L of those logits so all methods log the same
quantity (at the cost of one posterior call, a few milliseconds).
"""
from __future__ import annotations

import time

from ...losses import bag_log_likelihood, dllp_loss
from ...ops import posterior_weighted
from ..data import bag_weights
from ..distributed import instance_mean
from .common import LogitRecorder, Method, epoch_stats, fit_targets, gradient_step, mean_log_likelihood, observed


class Supervised(Method):
    name = "supervised"

    def __init__(self, offsets, counts, labels):
        self.offsets, self.counts = offsets, counts
        # Of the training positions: probabilities of label 1 for BCE (two classes),
        # class indices for cross-entropy (C >= 3, where counts are (B, C)).
        self.labels = labels.float() if counts.dim() == 1 else labels.long()

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        loss, recorded = fit_targets(model, optimizer, lambda pos: self.labels[pos], batches, inputs, world,
                                     progress, self.name)
        return epoch_stats(loss, mean_log_likelihood(recorded, self.offsets, self.counts, world), t0)


class _BagLoss(Method):
    """Gradient descent on a loss of whole bags, over minibatches of bags. ``counts``
    are point counts (for noisy counts: the clipped observation); a method that
    takes ``count_log_weights`` (the counts' likelihood) gets each batch's in
    ``bag_loss(..., weights=)``."""

    def __init__(self, offsets, counts):
        self.offsets, self.counts, self.weights = offsets, counts, None

    def bag_loss(self, logits, offsets, counts, weights=None):
        raise NotImplementedError

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        model.train()
        recorder = LogitRecorder(batches.num_instances)
        total, seen = 0.0, 0
        for batch in progress(batches.bags(), self.name):
            logits = model(inputs(batch.positions, train=True)).float()
            weights = None if self.weights is None else bag_weights(self.weights, self.offsets, batch.bags)
            loss = self.bag_loss(logits, batch.offsets.to(logits.device), batch.counts.to(logits.device),
                                 None if weights is None else weights.to(logits.device))
            gradient_step(loss, optimizer, world, model)
            recorder(batch.positions, logits)
            total += loss.item() * batch.counts.shape[0]
            seen += batch.counts.shape[0]
        L = mean_log_likelihood(recorder.result(), self.offsets, observed(self.counts, self.weights), world)
        return epoch_stats(instance_mean(world, total, seen), L, t0)


class DLLP(_BagLoss):
    name = "dllp"

    def bag_loss(self, logits, offsets, counts, weights=None):
        return dllp_loss(logits, offsets, counts)


class DirectLikelihood(_BagLoss):
    """-log P(observation) of each bag: of its count, or of its count's likelihood
    (posterior_weighted) where the counts are noisy or intervals."""

    name = "mle-direct"

    def __init__(self, offsets, counts, count_log_weights=None):
        super().__init__(offsets, counts)
        self.weights = count_log_weights

    def bag_loss(self, logits, offsets, counts, weights=None):
        if weights is not None:
            return -posterior_weighted(logits, offsets, weights)[1].mean()
        return -bag_log_likelihood(logits, offsets, counts)
