"""Test metrics of a model: instance accuracy and ROC AUC (where labels are known),
bag-count MAE and the mean bag log-likelihood L, from one inference pass."""
from __future__ import annotations

import math

import torch

from ..bags import bag_index
from .batches import infer_logits
from .methods.common import log_likelihoods, observed



def bag_metrics(model, preprocess, data, bags, batch_size) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Instance accuracy and AUC (NaN without labels or with one class only), bag-count
    MAE and mean bag log-likelihood on `bags`, from one inference pass. Returns
    ``(metrics, prob, expected)``: the metrics dict, each instance's probability (in
    the order of ``bags.index``; (M, C) class probabilities for C >= 3 classes) and
    each bag's expected count ((B, C) expected count vectors)."""
    logits = infer_logits(model, preprocess, bags.index, batch_size)
    return metrics_from_logits(logits, data, bags)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(label 1) of (N,) binary logits; class probabilities (N, C) of (N, C) logits."""
    return torch.sigmoid(logits) if logits.dim() == 1 else torch.softmax(logits.double(), 1).float()


def metrics_from_logits(logits, data, bags) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """bag_metrics() from the logits of the instances ``bags.index``. The bag-count
    MAE is over bags (and classes, for count vectors), against the point counts
    (for noisy or interval counts: the clipped observation or the midpoint); L is
    log P(observation), under the counts' likelihood where they have one, and
    leaves out multi-class bags over the exact E-step's state budget (NaN if all are)."""
    prob = probabilities(logits)
    sizes = bags.offsets.diff()
    expected = torch.zeros(sizes.numel(), *prob.shape[1:]).index_add_(0, bag_index(bags.offsets, prob.shape[0]), prob)
    out = {"bag_mae": float((expected - bags.counts.float()).abs().mean()) if sizes.numel() else math.nan,
           "L": float(torch.nanmean(log_likelihoods(logits, bags.offsets,
                                                    observed(bags.counts, bags.count_log_weights)).double()))
           if sizes.numel() else math.nan,
           **instance_metrics(prob, None if data.y is None else data.y[bags.index], data.classes),
           "n_instances": int(bags.index.numel()), "n_bags": int(sizes.numel())}
    return out, prob, expected


def instance_metrics(prob: torch.Tensor, y: torch.Tensor | None, classes: list[str] | None = None) -> dict:
    """Accuracy and ROC AUC of instance probabilities; NaN without labels.

    Binary ((N,) probabilities of label 1): accuracy at threshold 0.5, AUC NaN where
    one class is absent (undefined). C classes ((N, C)): accuracy of the argmax, the
    macro-average of the one-vs-rest AUCs of the classes present with both signs,
    and ``per_class_accuracy`` (the recall of each class, by name; NaN for a class
    with no instances)."""
    multi = prob.dim() == 2
    if y is None or y.numel() == 0:
        out = {"accuracy": math.nan, "auc": math.nan}
        if multi:
            out["per_class_accuracy"] = {name: math.nan for name in _names(classes, prob.shape[1])}
        return out
    if not multi:
        return {"accuracy": float(((prob > 0.5).long() == y).float().mean()), "auc": auc(prob, y)}
    pred = prob.argmax(1)
    names = _names(classes, prob.shape[1])
    per_class = {}
    for c, name in enumerate(names):
        mine = y == c
        per_class[name] = float((pred[mine] == c).float().mean()) if bool(mine.any()) else math.nan
    aucs = [auc(prob[:, c], (y == c).long()) for c in range(prob.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return {"accuracy": float((pred == y).float().mean()), "auc": sum(aucs) / len(aucs) if aucs else math.nan,
            "per_class_accuracy": per_class}


def _names(classes, num_classes: int) -> list[str]:
    return list(classes) if classes is not None and len(classes) == num_classes else [str(c) for c in range(num_classes)]


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC (scikit-learn's); NaN if one class is absent, where it is undefined.
    (Multi-class AUC is the mean of these one-vs-rest AUCs: scikit-learn's
    ``multi_class="ovr"`` raises instead where a class is absent from a test set.)"""
    from sklearn.metrics import roc_auc_score

    if y.numel() == 0 or bool((y == y[0]).all()):
        return math.nan
    return float(roc_auc_score(y.numpy(), score.double().numpy()))
