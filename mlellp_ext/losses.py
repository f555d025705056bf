"""Losses on bags: the direct likelihood of the observed counts
(:func:`bag_log_likelihood`, through the exact E-step) and DLLP's bag-proportion
cross-entropy (:func:`dllp_loss`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .bags import bag_index, check_bag_values, check_count_vectors, check_reduction, reduce_over_bags, split_nested
from .ops._checks import DEFAULT_MAX_STATES, check_layout, check_multiclass_layout, compute_dtype
from .ops.binary import posterior


def bag_log_likelihood(logits, offsets=None, counts=None, reduction: str = "mean", *,
                       max_states: int = DEFAULT_MAX_STATES):
    """Differentiable log-likelihood ``log P(S_b = counts[b])`` of observed bag counts.

    Maximise it (minimise its negative) to fit logits to bag counts directly;
    its gradient w.r.t. logits[i] is ``phi[i] - sigmoid(logits[i])``.

    Args:
        logits, offsets, counts: as in :func:`posterior` (nested logits too;
            (N, C) logits with (B, C) counts for multi-class bags).
        reduction: ``'none'`` (per bag, shape (B,)), ``'mean'`` over bags
            (default; over zero bags it is 0, the empty sum, with a zero gradient)
            or ``'sum'``.
        max_states: multi-class bags only, :func:`posterior_multiclass`'s state budget.

    Example:
        >>> z = torch.randn(5, requires_grad=True)
        >>> loss = -bag_log_likelihood(z, offsets_from_sizes([3, 2]), torch.tensor([1, 2]))
        >>> loss.backward()
    """
    check_reduction("bag_log_likelihood", reduction)
    _, log_lik = posterior(logits, offsets, counts, max_states=max_states)
    return reduce_over_bags(log_lik, reduction)


def _bag_logsumexp(values: torch.Tensor, bag: torch.Tensor, num_bags: int) -> torch.Tensor:
    """log sum_{i in b} exp(values[i]) per bag (-inf for an empty bag), differentiable;
    values (N,) or (N, C) (then per bag and column)."""
    top = torch.full((num_bags, *values.shape[1:]), -math.inf, dtype=values.dtype, device=values.device)
    index = bag.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    top = top.scatter_reduce(0, index, values.detach(), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(top).index_add(0, bag, torch.exp(values - top[bag]))
    return sums.log() + top


def dllp_loss(logits, offsets=None, counts=None, reduction: str = "mean") -> torch.Tensor:
    """DLLP's loss (Ardehaly & Culotta 2017): per bag, the binary cross-entropy between
    the observed proportion ``p_b = y_b / n_b`` and the bag's mean instance probability
    ``q_b = mean_{i in b} sigmoid(logits[i])`` (a mean of probabilities, not of logits):

        loss_b = -(p_b log q_b + (1 - p_b) log(1 - q_b))

    computed in log space (``log q_b = logsumexp_i log sigmoid(z_i) - log n_b``), so it
    is exact for any finite logits, with no clamping. An empty bag's loss is 0.

    Args:
        logits, offsets, counts: as in :func:`mlellp_ext.posterior` (a jagged nested
            tensor of logits too); bad ones raise the same ``ValueError``.
        reduction: ``'mean'`` over all B bags (default; empty bags count 0, as in
            ``bag_log_likelihood``; over zero bags it is 0, the empty sum, with a
            zero gradient), ``'sum'`` or ``'none'`` (shape (B,)).

    Multi-class bags: (N, C) logits with (B, C) count vectors give DLLP's original
    loss, the cross-entropy between the bag's proportion vector and its mean softmax,
    ``loss_b = -sum_c (y_bc / n_b) log mean_{i in b} softmax(z_i)_c``, in log space too.

    Example:
        >>> z = torch.randn(5, requires_grad=True)
        >>> dllp_loss(z, offsets_from_sizes([3, 2]), torch.tensor([1, 2])).backward()
    """
    check_reduction("dllp_loss", reduction)
    if isinstance(logits, torch.Tensor) and not logits.is_nested and logits.dim() == 2:
        return reduce_over_bags(_dllp_multiclass(logits, offsets, counts), reduction)
    logits, offsets, counts, _ = split_nested(logits, offsets, counts, "dllp_loss")
    _require((("logits", logits), ("offsets", offsets), ("counts", counts)))
    check_layout("dllp_loss", logits, offsets, counts)
    check_bag_values("dllp_loss", logits.shape[0], offsets, counts)
    z = logits.to(compute_dtype(logits.dtype))
    num_bags = offsets.shape[0] - 1
    sizes = offsets.diff().to(z.dtype)
    bag = bag_index(offsets, z.shape[0])
    log_n = sizes.log()
    log_q = _bag_logsumexp(F.logsigmoid(z), bag, num_bags) - log_n
    log_1mq = _bag_logsumexp(F.logsigmoid(-z), bag, num_bags) - log_n
    p = counts.to(z.dtype) / sizes.clamp(min=1)
    # 0 * log 0 = 0: a term whose proportion is 0 drops out (also for q = 0 or 1 exactly).
    loss = -(torch.where(p > 0, p * log_q, 0.0) + torch.where(p < 1, (1 - p) * log_1mq, 0.0))
    loss = torch.where(sizes > 0, loss, torch.zeros_like(loss))
    return reduce_over_bags(loss, reduction)


def _require(named):
    for name, t in named:
        if t is None:
            raise ValueError(f"dllp_loss: {name} is required, got None")


def _dllp_multiclass(logits, offsets, counts):
    _require((("offsets", offsets), ("counts", counts)))
    check_multiclass_layout("dllp_loss", logits, offsets, counts, 1)
    check_count_vectors("dllp_loss", logits.shape[0], offsets, counts)
    z = logits.to(compute_dtype(logits.dtype))
    sizes = offsets.diff().to(z.dtype)
    bag = bag_index(offsets, z.shape[0])
    log_q = _bag_logsumexp(F.log_softmax(z, 1), bag, offsets.shape[0] - 1) - sizes.log().unsqueeze(1)
    p = counts.to(z.dtype) / sizes.clamp(min=1).unsqueeze(1)
    loss = -torch.where(p > 0, p * log_q, 0.0).sum(1)  # 0 log 0 = 0
    return torch.where(sizes > 0, loss, torch.zeros_like(loss))
