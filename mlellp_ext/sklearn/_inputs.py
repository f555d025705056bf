"""Checks of ``fit``'s bag arguments, and the M-step's fit with sample weights.

Every error names the argument and the value; the ops would catch most of these
too, but on rows sorted by bag, whose positions the caller never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn import get_config
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import has_fit_parameter

from ..bags import offsets_from_sizes


@dataclass
class BagData:
    """The bags of ``fit``'s rows in the ops' layout: rows ``order`` sorted by bag."""
    order: np.ndarray          # row indices, bag after bag (stable: a bag's rows in input order)
    offsets: torch.Tensor      # (B + 1,) int64
    sizes: np.ndarray          # (B,) rows per bag
    counts: torch.Tensor | None        # (B,) or (B, C) int64, exact counts
    log_weights: torch.Tensor | None   # (N + B,) float64, uncertain counts
    n_classes: int


def _whole(values, name, where):
    """Integer array from integers or from floats that are whole numbers."""
    a = np.asarray(values)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{where}: {name} must be integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = tuple(int(j) for j in np.argwhere(bad)[0])
            hint = " (proportions go in proportions=)" if name == "counts" else ""
            raise ValueError(f"{where}: {name} must be whole numbers, got {name}[{', '.join(map(str, i))}] = "
                             f"{a[i]}{hint}")
    return a.astype(np.int64)


def check_bags(bags, n_samples, n_bags, source, where):
    """bags: (n_samples,) integers in [0, n_bags); n_bags is the length of ``source``."""
    if bags is None:
        raise ValueError(f"{where}: bags is required (the bag of each row, integers in [0, n_bags))")
    bags = _whole(bags, "bags", where)
    if bags.shape != (n_samples,):
        raise ValueError(f"{where}: bags must have one entry per row of X, shape ({n_samples},), "
                         f"got shape {bags.shape}")
    bad = (bags < 0) | (bags >= n_bags)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: bags[{i}] = {bags[i]} is outside [0, n_bags) = [0, {n_bags}) "
                         f"(n_bags = {n_bags}, the length of {source})")
    return bags


def _check_counts(counts, sizes, where, name="counts"):
    if counts.ndim not in (1, 2) or (counts.ndim == 2 and counts.shape[1] < 2):
        raise ValueError(f"{where}: counts must be (n_bags,) positives per bag or (n_bags, n_classes) count "
                         f"vectors with n_classes >= 2, got shape {counts.shape}")
    if (counts < 0).any():
        i = tuple(int(j) for j in np.argwhere(counts < 0)[0])
        raise ValueError(f"{where}: counts must be non-negative, got counts[{', '.join(map(str, i))}] = {counts[i]}")
    if counts.ndim == 1:
        bad = counts > sizes
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"{where}: counts[{b}] = {counts[b]} is more than bag {b}'s size {sizes[b]} "
                             f"(its rows in bags)")
    else:
        bad = counts.sum(1) != sizes
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"{where}: {name}[{b}] = {counts[b].tolist()} sums to {counts[b].sum()}, but bag {b} "
                             f"holds {sizes[b]} rows; a count vector counts every row of its bag")


def _counts_from_proportions(proportions, sizes, where):
    p = np.asarray(proportions, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[0] != sizes.shape[0]:
        raise ValueError(f"{where}: proportions must have one entry (or row) per bag, {sizes.shape[0]}, "
                         f"got shape {p.shape}")
    scaled = p * (sizes if p.ndim == 1 else sizes[:, None])
    bad = ~np.isfinite(scaled) | (np.abs(scaled - np.round(scaled)) > 1e-6)
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: proportions[{', '.join(map(str, i))}] = {float(p[i])!r} times bag {i[0]}'s size {sizes[i[0]]} is "
            f"{scaled[i]:.6g}, not a whole number of rows. The E-step needs whole counts: pass counts=, or, "
            f"for rounded proportions, count_log_weights= with count_weights.interval over the counts they allow")
    return np.round(scaled).astype(np.int64)


def bag_data(n_samples, counts, bags, proportions, count_log_weights, where) -> BagData:
    """Check ``fit``'s bag arguments (exactly one of counts, proportions, count_log_weights)."""
    given = [name for name, v in (("counts", counts), ("proportions", proportions),
                                  ("count_log_weights", count_log_weights)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of counts, proportions and count_log_weights, got "
                         f"{given or 'none'}")
    log_weights = None
    if count_log_weights is not None:
        log_weights = torch.as_tensor(np.asarray(count_log_weights), dtype=torch.float64)
        if log_weights.dim() != 1 or log_weights.shape[0] <= n_samples:
            raise ValueError(f"{where}: count_log_weights must be 1-D with n_samples + n_bags entries (n_b + 1 "
                             f"per bag, posterior_weighted's layout), more than n_samples = {n_samples}; got "
                             f"shape {list(log_weights.shape)}")
        n_bags, source = log_weights.shape[0] - n_samples, "count_log_weights minus n_samples"
    else:
        n_bags = len(counts) if counts is not None else len(proportions)
        source = given[0]
    bags = check_bags(bags, n_samples, n_bags, source, where)
    sizes = np.bincount(bags, minlength=n_bags)
    exact = None
    if counts is not None:
        exact = _whole(counts, "counts", where)
    elif proportions is not None:
        exact = _counts_from_proportions(proportions, sizes, where)
    if exact is not None:
        _check_counts(exact, sizes, where, "counts" if counts is not None else "proportions times the bag's size")
    n_classes = exact.shape[1] if exact is not None and exact.ndim == 2 else 2
    return BagData(np.argsort(bags, kind="stable"), offsets_from_sizes(torch.from_numpy(sizes)), sizes,
                   None if exact is None else torch.from_numpy(exact), log_weights, n_classes)


def first_nan(X):
    """(row, column) of X's first NaN, or None."""
    if hasattr(X, "isna"):  # a DataFrame, whatever its column types
        mask = np.asarray(X.isna())
    elif hasattr(X, "tocoo"):  # sparse: only stored entries can be NaN
        coo = X.tocoo()
        bad = np.isnan(coo.data) if np.issubdtype(coo.data.dtype, np.floating) else np.zeros(0, bool)
        return (int(coo.row[bad][0]), int(coo.col[bad][0])) if bad.any() else None
    else:
        a = np.asarray(X)
        mask = np.isnan(a) if np.issubdtype(a.dtype, np.floating) else a != a  # object: NaN != NaN
    if not mask.any():
        return None
    return tuple(int(j) for j in np.argwhere(mask)[0])


def final_step(estimator):
    """The estimator that fits (the last step of nested Pipelines)."""
    while isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]
    return estimator


def takes_sample_weight(estimator) -> bool:
    return has_fit_parameter(final_step(estimator), "sample_weight")


def request_sample_weight(estimator):
    """With metadata routing on, a Pipeline passes sample_weight only to steps that ask
    for it and refuses to guess for steps that take it but were not told: make the
    final step of this (cloned) estimator ask, and the others that were not told decline
    (the weights of a row's copies sum to 1, so a transformer fitted without them sees X)."""
    if not (isinstance(estimator, Pipeline) and get_config().get("enable_metadata_routing", False)):
        return estimator
    final = final_step(estimator)
    final.set_fit_request(sample_weight=True)
    stack = [estimator]
    while stack:
        for _, step in stack.pop().steps:
            if isinstance(step, Pipeline):
                stack.append(step)
            elif step is not final and step not in ("passthrough", None) and has_fit_parameter(step, "sample_weight") \
                    and step.get_metadata_routing().fit.requests.get("sample_weight") is None:
                step.set_fit_request(sample_weight=False)
    return estimator


def fit_weighted(estimator, X, y, sample_weight):
    """``estimator.fit(X, y)`` with sample weights, through a Pipeline's routing if need be."""
    if not isinstance(estimator, Pipeline) or get_config().get("enable_metadata_routing", False):
        return estimator.fit(X, y, sample_weight=sample_weight)
    names, step = [], estimator  # without routing a Pipeline takes "<step>__sample_weight"
    while isinstance(step, Pipeline):
        names.append(step.steps[-1][0])
        step = step.steps[-1][1]
    return estimator.fit(X, y, **{"__".join(names + ["sample_weight"]): sample_weight})
