"""The checks of csrc/ops/checks.cpp that need no tensor data (shapes, dtypes,
devices, arguments), in the same order and words, and the ops' dtype rules.

The fake kernels run them for meta tensors, under torch.compile, and whenever any
argument is on the meta device (a CPU tensor beside a meta one included), so
without them bad shapes, dtypes or devices would pass there and give garbage. The
library's Python code that takes the bag layout without calling an op (EMTargets,
the losses, the approximate E-step) runs them too, to fail with the op's words.
The checks that read values are :func:`mlellp_ext.bags.check_bag_values` and
:func:`mlellp_ext.bags.check_count_vectors`.
"""
from __future__ import annotations

import numbers

import torch

# posterior_multiclass's default state budget per bag (the schema's default): 2^24
# count vectors, two tables of 16 bytes per state, 256 MiB.
DEFAULT_MAX_STATES = 1 << 24
MAX_STATES_LIMIT = 1 << 40  # csrc/ops/checks.cpp: 16 TiB of tables, far from int64 overflow

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FLOATING_TEXT = "float32, float64, float16 or bfloat16"
LOW_PRECISION = (torch.float16, torch.bfloat16)
# c10's names, so that messages match the C++ kernels' word for word
SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (and return log-likelihoods in) for logits of ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def check(op, ok, message):
    torch._check_value(ok, lambda: f"{op}: {message()}")


def check_dtype(op, name, t, dtypes, text):
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be {text}, got {SCALAR_NAMES.get(t.dtype, t.dtype)}")


def check_device(op, name, t, logits):
    if t.device != logits.device:
        raise ValueError(f"{op}: {name} is on {t.device} but logits is on {logits.device}")


def check_not_nested(op, named_tensors):
    """For the ops that take no torch.nested input: each (name, tensor) plain."""
    for name, t in named_tensors:
        if getattr(t, "is_nested", False):
            raise ValueError(f"{op}: {name} must be a plain tensor, got a nested tensor")


def _check_offsets(op, offsets, logits):
    check(op, offsets.dim() == 1, lambda: f"offsets must be 1-D of length num_bags + 1, got shape {list(offsets.shape)}")
    check_dtype(op, "offsets", offsets, (torch.int64,), "int64")
    check(op, offsets.shape[0] >= 1,
          lambda: "offsets must have at least one element (offsets[0] = 0), got an empty tensor")
    check_device(op, "offsets", offsets, logits)


def check_layout(op, logits, offsets, counts=None):
    """check_bag_layout: 1-D logits, offsets and (if given) (B,) counts."""
    check(op, logits.dim() == 1,
          lambda: f"logits must be 1-D (all instances of all bags, flat), got shape {list(logits.shape)}")
    check_dtype(op, "logits", logits, FLOATING, FLOATING_TEXT)
    _check_offsets(op, offsets, logits)
    if counts is not None:
        check(op, counts.dim() == 1, lambda: f"counts must be 1-D of length num_bags, got shape {list(counts.shape)}")
        check_dtype(op, "counts", counts, (torch.int64,), "int64")
        check(op, counts.shape[0] == offsets.shape[0] - 1,
              lambda: f"counts must have num_bags = len(offsets) - 1 = {offsets.shape[0] - 1} elements, "
                      f"got {counts.shape[0]}")
        check_device(op, "counts", counts, logits)


def check_backward_layout(op, grad_log_likelihood, phi, logits, offsets):
    """check_backward_layout: posterior_backward's arguments."""
    check_layout(op, logits, offsets)
    num_bags = offsets.shape[0] - 1
    check(op, grad_log_likelihood.dim() == 1 and grad_log_likelihood.shape[0] == num_bags,
          lambda: f"grad_log_likelihood must have shape [{num_bags}], got {list(grad_log_likelihood.shape)}")
    check(op, phi.shape == logits.shape,
          lambda: f"phi must have the shape of logits {list(logits.shape)}, got {list(phi.shape)}")
    check_dtype(op, "grad_log_likelihood", grad_log_likelihood, FLOATING, FLOATING_TEXT)
    check_dtype(op, "phi", phi, FLOATING, FLOATING_TEXT)
    check_device(op, "grad_log_likelihood", grad_log_likelihood, logits)
    check_device(op, "phi", phi, logits)


def check_phi_jvp_layout(op, tangent, logits, offsets, counts):
    """check_phi_jvp_layout: phi_jvp's arguments."""
    check_layout(op, logits, offsets, counts)
    check(op, tangent.shape == logits.shape,
          lambda: f"tangent must have the shape of logits {list(logits.shape)}, got {list(tangent.shape)}")
    check_dtype(op, "tangent", tangent, FLOATING, FLOATING_TEXT)
    check_device(op, "tangent", tangent, logits)


def check_weighted_layout(op, logits, offsets, count_log_weights):
    """check_weighted_layout: the bag layout and (N + B,) count log-weights."""
    check_layout(op, logits, offsets)
    expected = logits.shape[0] + offsets.shape[0] - 1
    check(op, count_log_weights.dim() == 1,
          lambda: f"count_log_weights must be 1-D (log w_b(k) at offsets[b] + b + k, k = 0..n_b), got shape "
                  f"{list(count_log_weights.shape)}")
    check_dtype(op, "count_log_weights", count_log_weights, FLOATING, FLOATING_TEXT)
    check(op, count_log_weights.shape[0] == expected,
          lambda: f"count_log_weights must have len(logits) + num_bags = {logits.shape[0]} + "
                  f"{offsets.shape[0] - 1} = {expected} elements (n_b + 1 per bag), got {count_log_weights.shape[0]}")
    check_device(op, "count_log_weights", count_log_weights, logits)


def check_multiclass_layout(op, logits, offsets, counts, max_states):
    """check_multiclass_layout: (N, C) logits, offsets, (B, C) counts and max_states."""
    check(op, logits.dim() == 2,
          lambda: f"logits must be 2-D (num_instances, num_classes), got shape {list(logits.shape)}")
    check(op, logits.shape[1] >= 2,
          lambda: f"logits must have at least 2 classes (columns), got shape {list(logits.shape)}")
    check_dtype(op, "logits", logits, FLOATING, FLOATING_TEXT)
    _check_offsets(op, offsets, logits)
    check(op, counts.dim() == 2, lambda: f"counts must be 2-D (num_bags, num_classes), got shape {list(counts.shape)}")
    check_dtype(op, "counts", counts, (torch.int64,), "int64")
    check(op, counts.shape[0] == offsets.shape[0] - 1,
          lambda: f"counts must have num_bags = len(offsets) - 1 = {offsets.shape[0] - 1} rows, "
                  f"got shape {list(counts.shape)}")
    check(op, counts.shape[1] == logits.shape[1],
          lambda: f"counts must have one column per class of logits ({logits.shape[1]}), got shape {list(counts.shape)}")
    check_device(op, "counts", counts, logits)
    check_max_states(op, max_states)


def check_max_states(op, max_states):
    # A float (1.5) would pass the range test and be truncated by int() on its way to the op.
    check(op, isinstance(max_states, (numbers.Integral, torch.SymInt)) and not isinstance(max_states, bool),
          lambda: f"max_states must be an integer, got {max_states!r}")
    check(op, bool(1 <= max_states <= MAX_STATES_LIMIT),
          lambda: f"max_states must be between 1 and 2^40 = {MAX_STATES_LIMIT}, got {max_states}")


def check_augment_layout(images, flip, blur_sigma, jitter_order, jitter_factors):
    """check_augment_layout: augment_images' arguments."""
    op = "augment_images"
    check(op, images.dim() == 4 and images.shape[1] == 3,
          lambda: f"images must be (B, 3, H, W) RGB images, got shape {list(images.shape)}")
    check_dtype(op, "images", images, (torch.uint8,) + FLOATING, f"uint8 (0..255) or {FLOATING_TEXT} (in [0, 1])")
    n = images.shape[0]
    for name, t, cols, dtypes, text in (("flip", flip, 0, (torch.bool,), "bool"),
                                        ("blur_sigma", blur_sigma, 0, FLOATING, FLOATING_TEXT),
                                        ("jitter_order", jitter_order, 4, (torch.int64,), "int64"),
                                        ("jitter_factors", jitter_factors, 4, FLOATING, FLOATING_TEXT)):
        shape = [n] if cols == 0 else [n, cols]
        check(op, list(t.shape) == shape,
              lambda: f"{name} must have shape {shape} (one {'value' if cols == 0 else 'row'} per image), "
                      f"got {list(t.shape)}")
        check_dtype(op, name, t, dtypes, text)
        if t.device != images.device and t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device} but images is on {images.device} "
                             f"(the parameters may be on the images' device or on the CPU)")
