"""Which classes a dataset's labels are: ``--classes`` parsed, the instances of the
named classes picked and relabelled 0..C-1."""
from __future__ import annotations

import re

import numpy as np

from .core import DataError


def parse_classes(classes: str) -> list[str] | None:
    """``"A,B[,C...]"`` -> the names; ``"all"`` -> None (every class present)."""
    if str(classes).strip().lower() == "all":
        return None
    parts = [p.strip() for p in str(classes).split(",")]
    if len(parts) < 2 or not all(parts):
        raise DataError(f"--classes must be 'all' or two or more classes separated by commas "
                        f"(e.g. bird,cat or airplane,bird,cat), got {classes!r}")
    return parts


def select_classes(y: np.ndarray, names: list[str] | None, classes: str | None, where: str,
                   required: bool = True):
    """Pick the instances of the classes named by ``classes`` and relabel them 0..C-1.

    Returns ``(keep, labels, class_names, values)``: indices of the kept instances,
    their labels (the i-th class named -> i), the C class names and the label
    values they had. ``required=False`` lets a named class have no instances
    (a test set drawn with a training set's classes). A class is named by
    its name in ``names`` or by its integer label value; ``"all"`` keeps every
    class present, in label order. ``None`` requires the labels to be 0/1
    already (a binary dataset). C = 2 is the binary problem (label 1 = the
    second class); C >= 3 trains a C-way classifier from count vectors.
    """
    present = np.unique(y).tolist()
    shown = ", ".join(str(v) for v in present[:20]) + (", ..." if len(present) > 20 else "")
    if classes is None:
        if not set(present) <= {0, 1}:
            raise DataError(f"{where}: labels are not binary 0/1 (found {shown}); pass --classes A,B to pick "
                            f"two classes, or --classes all (or three or more names) for multi-class bags")
        cls = [str(names[0]), str(names[1])] if names is not None and len(names) >= 2 else ["0", "1"]
        return np.arange(len(y)), y.astype(np.int64), cls, [0, 1]
    parts = parse_classes(classes)
    if parts is None:
        if len(present) < 2:
            raise DataError(f"{where}: --classes all needs at least two classes, found only {shown}")
        values = present
    else:
        values = []
        for part in parts:
            if names is not None and part in names:
                v = names.index(part)
            elif re.fullmatch(r"[+-]?\d+", part):
                v = int(part)
            else:
                v = None
            if v is None or (required and v not in present):
                if names is not None:
                    avail = "available names: " + ", ".join(names)
                else:
                    avail = "available label values: " + shown
                what = "has no instances" if v is not None else "is unknown"
                raise DataError(f"{where}: class {part!r} {what}; {avail}")
            if v in values:
                raise DataError(f"{where}: --classes {classes!r} names the same class twice ({part!r})")
            values.append(v)
    cls = [str(names[v]) if names is not None and 0 <= v < len(names) else str(v) for v in values]
    lookup = np.full(max(values) - min(min(values), 0) + 1, -1, dtype=np.int64)
    lookup[np.asarray(values) - min(min(values), 0)] = np.arange(len(values))
    keep = np.flatnonzero(np.isin(y, values))
    return keep, lookup[y[keep] - min(min(values), 0)], cls, list(values)


def describe_classes(cls: list[str]) -> str:
    """'bird (0) and cat (1)', or 'airplane (0), ..., truck (9)' for many classes."""
    named = [f"{c} ({i})" for i, c in enumerate(cls)]
    return " and ".join(named) if len(cls) == 2 else ", ".join(named)
