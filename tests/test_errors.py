"""Bad input gives a clear error naming the argument and the value."""
import pytest
import torch

import mlellp_ext

from conftest import CUDA

post = torch.ops.mlellp.posterior
log_pmf = torch.ops.mlellp.log_pmf


def good():
    return torch.randn(6), torch.tensor([0, 2, 2, 6]), torch.tensor([1, 0, 3])


BAD = [
    # (what to change, expected message)
    (lambda z, o, c: (z, o, torch.tensor([3, 0, 3])), r"counts\[0\] = 3 is outside \[0, n_b\] = \[0, 2\]"),
    (lambda z, o, c: (z, o, torch.tensor([1, 0, -1])), r"counts\[2\] = -1 is outside"),
    (lambda z, o, c: (z, o, torch.tensor([1, 1, 0])), r"counts\[1\] = 1 is outside \[0, n_b\] = \[0, 0\]"),
    (lambda z, o, c: (z, torch.tensor([1, 2, 2, 6]), c), r"offsets\[0\] must be 0, got 1"),
    (lambda z, o, c: (z, torch.tensor([0, 3, 2, 6]), c), r"non-decreasing, got offsets\[2\] = 2 < offsets\[1\] = 3"),
    (lambda z, o, c: (z, torch.tensor([0, 2, 2, 5]), c), r"offsets\[-1\] must equal len\(logits\) = 6, got offsets\[3\] = 5"),
    (lambda z, o, c: (z, torch.tensor([0, 2, 2, 7]), c), r"offsets\[-1\] must equal len\(logits\) = 6, got offsets\[3\] = 7"),
    (lambda z, o, c: (z.view(2, 3), o, c), r"logits must be 1-D .* got shape \[2, 3\]"),
    (lambda z, o, c: (z.long(), o, c), r"logits must be float32, float64, float16 or bfloat16, got Long"),
    (lambda z, o, c: (z, o.view(1, 4), c), r"offsets must be 1-D .* got shape \[1, 4\]"),
    (lambda z, o, c: (z, o.int(), c), r"offsets must be int64, got Int"),
    (lambda z, o, c: (z, o[:0], c[:0]), r"offsets must have at least one element"),
    (lambda z, o, c: (z, o, c.float()), r"counts must be int64, got Float"),
    (lambda z, o, c: (z, o, c[:2]), r"counts must have num_bags = len\(offsets\) - 1 = 3 elements, got 2"),
    (lambda z, o, c: (z, o, c.view(1, 3)), r"counts must be 1-D .* got shape \[1, 3\]"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_posterior(case):
    change, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        post(*change(*good()))


@pytest.mark.parametrize("case", [3, 4, 5, 7, 8, 9, 10, 11])
def test_bad_input_log_pmf(case):
    change, message = BAD[case]
    z, o, _ = change(*good())
    with pytest.raises(ValueError, match=message):
        log_pmf(z, o)


def test_python_api_errors():
    z, o, c = good()
    with pytest.raises(ValueError, match="reduction must be one of"):
        mlellp_ext.bag_log_likelihood(z, o, c, reduction="avg")
    with pytest.raises(ValueError, match="offsets is required"):
        mlellp_ext.posterior(z, counts=c)
    with pytest.raises(ValueError, match="counts is required"):
        mlellp_ext.posterior(z, o)
    with pytest.raises(ValueError, match=r"sizes must be non-negative, got sizes\[1\] = -2"):
        mlellp_ext.offsets_from_sizes([3, -2])
    with pytest.raises(ValueError, match="sizes must be integers"):
        mlellp_ext.offsets_from_sizes(torch.tensor([1.5]))


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_cuda(case):
    change, message = BAD[case]
    args = [t.cuda() for t in change(*good())]
    with pytest.raises(ValueError, match=message):
        post(*args)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_mixed_devices():
    z, o, c = good()
    with pytest.raises(ValueError, match=r"offsets is on cpu but logits is on cuda:0"):
        post(z.cuda(), o, c.cuda())
    with pytest.raises(ValueError, match=r"counts is on cpu but logits is on cuda:0"):
        post(z.cuda(), o.cuda(), c)
