"""Your own images: an instances CSV ``path,bag[,label]`` and a counts CSV (``bag,count``,
``bag,count_lo,count_hi`` or ``bag,CLASS1,...,CLASSC``), both checked completely
before any image is opened, every error naming the file and line."""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ... import count_weights
from ...bags import offsets_from_sizes
from .core import Bags, DataError, InstanceData
from .images import ImageFiles, check_header

def _read_csv(path: str, what: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
              all_columns: bool = False):
    """Header column positions and ``[(line, fields)]`` of a CSV; blank rows skipped
    (with ``all_columns``, also the header's names as written).

    Line numbers are 1-based with the header as line 1, as an editor shows them.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} file not found")
    rows = []
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark before the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for row in reader:
                fields = [c.strip() for c in row]
                if any(fields):
                    rows.append((reader.line_num, fields))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read {what} CSV ({e})") from e
    expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    if header is None:
        raise DataError(f"{path}, line 1: empty file, expected a header row {expected}")
    names = [h.strip() for h in header]
    header = [h.lower() for h in names]
    for col in required:
        if col not in header:
            raise DataError(f"{path}, line 1: missing column {col!r} in the header "
                            f"(found {','.join(header)}; expected {expected})")
    seen = set()
    for h in header:
        if h and h in seen:  # empty names: trailing commas a spreadsheet may save
            raise DataError(f"{path}, line 1: column {h!r} appears twice in the header")
        seen.add(h)
    cols = {c: header.index(c) for c in required + optional if c in header}
    if all_columns:
        return cols, rows, names
    return cols, rows


def _field(fields: list[str], cols: dict[str, int], name: str) -> str:
    i = cols[name]
    return fields[i] if i < len(fields) else ""


COUNT_NOISES = ("laplace", "gaussian")


def parse_count_noise(text: str) -> tuple[str, float]:
    """``'laplace:1.5'`` -> ``('laplace', 1.5)``; ``'gaussian:SIGMA'`` likewise."""
    m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9.eE+-]+)\s*", str(text))
    kind, value = (m.group(1).lower(), m.group(2)) if m else (None, None)
    try:
        value = float(value) if value is not None else None
    except ValueError:
        value = None
    if kind not in COUNT_NOISES or value is None or not (math.isfinite(value) and value > 0):
        raise DataError(f"--count-noise must be laplace:SCALE or gaussian:SIGMA with a positive number, got {text!r}")
    return kind, value


def noise_weights(noise: tuple[str, float], observed: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Count log-weights of observations ``observed`` (true count plus noise) under ``noise``."""
    kind, value = noise
    return (count_weights.laplace if kind == "laplace" else count_weights.gaussian)(observed, value, sizes)


def _count_columns(counts_path: str):
    """The counts CSV's rows and layout: ``(cols, rows, count_columns, classes)``.
    ``bag,count`` is two classes named 0 and 1 (count = instances of 1);
    ``bag,count_lo,count_hi`` the same with the count known to lie in an interval;
    otherwise every column but ``bag`` is a class, named by its header (two or more)."""
    cols, rows, names = _read_csv(counts_path, "counts", ("bag",), all_columns=True)
    lower = [n.lower() for n in names]
    class_cols = [i for i, n in enumerate(lower) if n not in ("bag", "")]
    if "count_lo" in lower or "count_hi" in lower:
        others = [names[i] for i in class_cols if lower[i] not in ("count_lo", "count_hi")]
        if others or not ("count_lo" in lower and "count_hi" in lower):
            raise DataError(f"{counts_path}, line 1: an interval of counts needs the header bag,count_lo,count_hi "
                            f"(two classes; the count of class 1 lies in [count_lo, count_hi]), found "
                            f"{','.join(names)}")
        return cols, rows, [lower.index("count_lo"), lower.index("count_hi")], ["0", "1"]
    if "count" in lower:
        others = [names[i] for i in class_cols if lower[i] != "count"]
        if others:
            raise DataError(f"{counts_path}, line 1: the header has a 'count' column and other columns "
                            f"({', '.join(others)}): use bag,count for two classes, or bag,CLASS1,CLASS2,... "
                            f"with a count per class and no total")
        return cols, rows, [lower.index("count")], ["0", "1"]
    if len(class_cols) < 2:
        raise DataError(f"{counts_path}, line 1: missing column 'count' in the header (found {','.join(names)}; "
                        f"expected bag,count for two classes or bag,CLASS1,CLASS2,... for a count per class)")
    return cols, rows, class_cols, [names[i] for i in class_cols]


def _parse_label(text: str, classes: list[str], where: str) -> int | None:
    """An instances CSV label: '' (unknown), a class name, or a label value 0..C-1."""
    if text == "":
        return None
    if text in classes:
        return classes.index(text)
    if re.fullmatch(r"0|[1-9]\d*", text) and int(text) < len(classes):
        return int(text)
    if classes == ["0", "1"]:
        raise DataError(f"{where}: label must be 0 or 1, got {text!r}")
    raise DataError(f"{where}: label must be a class name ({', '.join(classes)}) or its number "
                    f"0..{len(classes) - 1}, got {text!r}")


def load_manifest(csv_path: str | None, counts_path: str | None, num_bags, noise=None):
    """Instances, labels and given bags from an instances CSV and a counts CSV.

    Checks both files completely (cheap) before opening any image, so a typo is
    reported at once rather than after minutes of decoding.
    """
    if not csv_path:
        raise DataError("manifest needs --data-root, an instances CSV with columns path,bag[,label]")
    if not counts_path:
        raise DataError("manifest needs --counts-file, a CSV with columns bag,count (or bag,CLASS1,CLASS2,...)")
    cols, rows = _read_csv(csv_path, "instances", ("path", "bag"), ("label",))
    if not rows:
        raise DataError(f"{csv_path}: no instances after the header")
    ccols, crows, class_cols, classes = _count_columns(counts_path)
    lower_header = [h.lower() for h in _read_csv(counts_path, "counts", ("bag",), all_columns=True)[2]]
    interval = "count_lo" in lower_header
    if noise is not None and (interval or len(classes) > 2 or "count" not in lower_header):
        raise DataError(f"--count-noise applies to a counts CSV bag,count (one observed count per bag); "
                        f"{counts_path} has {','.join(lower_header)}")
    listing = _read_instances(csv_path, cols, rows, classes)
    counts = _read_counts(counts_path, ccols, crows, class_cols, classes, interval, noise, csv_path,
                          {bag: len(m) for bag, m in listing.members.items()})
    for bag, line in listing.first_line.items():
        if bag not in counts:
            raise DataError(f"{csv_path}, line {line}: bag {bag!r} has no count in {counts_path}")

    bag_order = list(listing.members)
    if num_bags is not None:
        if int(num_bags) < 1:
            raise DataError(f"the number of bags must be at least 1, got {num_bags}")
        bag_order = bag_order[: int(num_bags)]
    # Instances are stored bag after bag, so index is simply 0..M-1.
    order = [i for bag in bag_order for i in listing.members[bag]]
    where = [f"{csv_path}, line {listing.lines[i]}" for i in order]
    size = None
    for i, at in zip(order, where):  # a quick header check: every unreadable file is named before training
        dims = check_header(listing.paths[i], at)
        # Images of different sizes cannot be batched; resize to the first image's size.
        size = size or dims
    images = ImageFiles([listing.paths[i] for i in order], size, where)
    has_labels = all(listing.labels[i] is not None for i in order)
    y = torch.tensor([listing.labels[i] for i in order], dtype=torch.int64) if has_labels else None
    sizes = torch.tensor([len(listing.members[b]) for b in bag_order], dtype=torch.int64)
    count_tensor, weights = _count_tensors([counts[b] for b in bag_order], sizes, interval, noise, len(classes))
    bags = Bags(index=torch.arange(len(order), dtype=torch.int64), offsets=offsets_from_sizes(sizes),
                counts=count_tensor, bag_ids=bag_order, count_log_weights=weights)
    data = InstanceData(x=images, y=y, classes=classes, is_rgb=True,
                        source=f"manifest {csv_path} with counts {counts_path}: {len(order)} images in "
                               f"{len(bag_order)} bags, {size[1]}x{size[0]}, classes {', '.join(classes)}")
    return data, bags


@dataclass
class _Listing:
    """The instances CSV read: per instance (in file order) its path, line and label;
    per bag its instance numbers (in order of first appearance) and first line."""
    paths: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    members: dict = field(default_factory=dict)
    first_line: dict = field(default_factory=dict)


def _read_instances(csv_path: str, cols, rows, classes: list[str]) -> _Listing:
    """Every row of the instances CSV checked: path and bag present, the image file
    there, a label (if any) one of ``classes``, no image twice in one bag."""
    base = os.path.dirname(os.path.abspath(csv_path))
    out = _Listing()
    listed: dict[tuple[str, str], int] = {}  # (bag id, real path) -> line
    for line, fields in rows:
        rel, bag = _field(fields, cols, "path"), _field(fields, cols, "bag")
        if not rel:
            raise DataError(f"{csv_path}, line {line}: empty path")
        if not bag:
            raise DataError(f"{csv_path}, line {line}: empty bag")
        label = _parse_label(_field(fields, cols, "label") if "label" in cols else "", classes,
                             f"{csv_path}, line {line}")
        full = rel if os.path.isabs(rel) else os.path.join(base, rel)
        if not os.path.isfile(full):
            raise DataError(f"{csv_path}, line {line}: image {rel!r} not found (looked for {full})")
        # The same file twice in one bag would count one instance twice against the
        # bag's count: refused rather than guessed at (across bags it is allowed).
        key = (bag, os.path.realpath(full))
        if key in listed:
            raise DataError(f"{csv_path}, line {line}: image {rel!r} is listed twice in bag {bag!r} (first on "
                            f"line {listed[key]}); list each image once per bag")
        listed[key] = line
        out.first_line.setdefault(bag, line)
        out.members.setdefault(bag, []).append(len(out.paths))
        out.paths.append(full)
        out.lines.append(line)
        out.labels.append(label)
    return out


def _read_counts(counts_path, ccols, crows, class_cols, classes, interval, noise, csv_path, sizes) -> dict:
    """Each bag's row of the counts CSV checked, as a list of numbers (one per count
    column); ``sizes``: the number of instances of each bag of the instances CSV."""
    counts: dict[str, list] = {}
    count_line: dict[str, int] = {}
    labels_of = ["count_lo", "count_hi"] if interval else classes if len(class_cols) > 1 else ["count"]
    for line, fields in crows:
        bag = _field(fields, ccols, "bag")
        where = f"{counts_path}, line {line}"
        if not bag:
            raise DataError(f"{where}: empty bag")
        if bag in counts:
            raise DataError(f"{where}: bag {bag!r} is listed twice (first on line {count_line[bag]})")
        if bag not in sizes:
            raise DataError(f"{where}: bag {bag!r} has no instances in {csv_path}")
        size = sizes[bag]
        vector = []
        for i, name in zip(class_cols, labels_of):
            text = fields[i] if i < len(fields) else ""
            what = name if interval or len(class_cols) == 1 else f"count of class {name!r}"
            vector.append(_parse_count(text, f"{where}: {what}", bag, size, noise))
        if interval and vector[0] > vector[1]:
            raise DataError(f"{where}: count_lo {vector[0]} for bag {bag!r} is larger than its count_hi {vector[1]}")
        if len(vector) > 1 and not interval and sum(vector) != size:
            raise DataError(f"{where}: the counts of bag {bag!r} sum to {sum(vector)}, but it has {size} "
                            f"instances in {csv_path} (every instance is of exactly one class)")
        counts[bag] = vector
        count_line[bag] = line
    return counts


def _parse_count(text: str, what: str, bag: str, size: int, noise):
    """One count field: an integer in 0..size; with ``noise`` an observation with noise,
    any integer (laplace) or number (gaussian). ``what``: where it is, and its name."""
    if noise is not None:
        pattern = r"[+-]?\d+" if noise[0] == "laplace" else r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
        if not re.fullmatch(pattern, text):
            kind = "an integer" if noise[0] == "laplace" else "a number"
            raise DataError(f"{what} {text!r} for bag {bag!r} is not {kind} (--count-noise {noise[0]}:{noise[1]:g})")
        if not math.isfinite(float(text)):
            raise DataError(f"{what} {text!r} for bag {bag!r} is not finite")
        return float(text)
    if not re.fullmatch(r"[+-]?\d+", text):
        raise DataError(f"{what} {text!r} for bag {bag!r} is not an integer")
    count = int(text)
    if count < 0:
        raise DataError(f"{what} {count} for bag {bag!r} is negative")
    if count > size:
        raise DataError(f"{what} {count} for bag {bag!r} is larger than its {size} instances")
    return count


def _count_tensors(rows: list, sizes: torch.Tensor, interval: bool, noise, num_classes: int):
    """(counts, count_log_weights) of the bags' rows of numbers: with an interval its
    likelihood and its midpoint (rounded down) as the point count; with noise the noise
    model's likelihood and the observation clipped to 0..n; else the counts (for two
    classes, of the second) and no weights."""
    if interval:
        lo_hi = torch.tensor(rows, dtype=torch.int64)
        return (lo_hi[:, 0] + lo_hi[:, 1]) // 2, count_weights.interval(lo_hi[:, 0], lo_hi[:, 1], sizes)
    if noise is not None:
        observed = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        return torch.minimum(observed.round().clamp(min=0).long(), sizes), noise_weights(noise, observed, sizes)
    counts = torch.tensor(rows, dtype=torch.int64)
    # Two classes: the count of the second (label 1), as for every binary dataset.
    return (counts[:, -1].contiguous() if num_classes == 2 else counts), None
