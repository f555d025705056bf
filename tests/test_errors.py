"""Bad input gives a clear error naming the argument and the value."""
import pytest
import torch

import mlellp_ext

from conftest import CUDA, DEVICES

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


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_phi_jvp(case, device):
    """phi_jvp takes posterior's (logits, offsets, counts) and checks them the same way,
    on CPU and CUDA and in its fake kernel."""
    change, message = BAD[case]
    z, o, c = (t.to(device) for t in change(*good()))
    tangent = torch.randn(z.shape, device=device)
    with pytest.raises(ValueError, match=r"phi_jvp: .*" + message):
        torch.ops.mlellp.phi_jvp(tangent, z, o, c)
    if case >= 7:  # layout cases: the fake kernel says the same
        with pytest.raises(ValueError, match=r"phi_jvp: .*" + message):
            torch.ops.mlellp.phi_jvp(*(t.to("meta") for t in (tangent, z, o, c)))
    if device == "cuda":
        torch.cuda.synchronize()  # an out-of-bounds access would surface here


@pytest.mark.parametrize("change, message", [
    (lambda t: t[:5], r"tangent must have the shape of logits \[6\], got \[5\]"),
    (lambda t: t.long(), r"tangent must be float32, .* got Long"),
    (lambda t: t.to("meta"), r"tangent is on meta but logits is on cpu"),
])
def test_bad_tangent_phi_jvp(change, message):
    z, o, c = good()
    tangent = change(torch.randn(6))
    with pytest.raises(ValueError, match=message):
        torch.ops.mlellp.phi_jvp(tangent, z, o, c)
    if tangent.device.type != "meta":
        with pytest.raises(ValueError, match=message):
            torch.ops.mlellp.phi_jvp(tangent.to("meta"), z.to("meta"), o.to("meta"), c.to("meta"))


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


# posterior_backward is public too: its offsets index the loop, so their values are
# checked as posterior's are (they used to read out of bounds or leave garbage).
@pytest.mark.parametrize("offsets, message", [
    ([0, 3, 10**6], r"offsets\[-1\] must equal len\(logits\) = 5, got offsets\[2\] = 1000000"),
    ([0, 3, 2**40], r"offsets\[-1\] must equal len\(logits\) = 5"),
    ([-100000, 3, 5], r"offsets\[0\] must be 0, got -100000"),
    ([0, 2], r"offsets\[-1\] must equal len\(logits\) = 5, got offsets\[1\] = 2"),
    ([3, 5], r"offsets\[0\] must be 0, got 3"),
    ([0, 4, 3], r"offsets must be non-decreasing, got offsets\[2\] = 3 < offsets\[1\] = 4"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_offsets_posterior_backward(offsets, message, device):
    z, phi = torch.randn(5, device=device), torch.rand(5, device=device)
    grad = torch.ones(len(offsets) - 1, device=device)
    with pytest.raises(ValueError, match=r"posterior_backward: " + message):
        torch.ops.mlellp.posterior_backward(grad, phi, z, torch.tensor(offsets, device=device))
    if device == "cuda":
        torch.cuda.synchronize()  # an out-of-bounds access would surface here


@pytest.mark.parametrize("change, message", [
    (lambda g, p: (g.to(torch.complex64), p), r"grad_log_likelihood must be float32, .* got ComplexFloat"),
    (lambda g, p: (g, p > 0.5), r"phi must be float32, .* got Bool"),
    (lambda g, p: (g[:1], p), r"grad_log_likelihood must have shape \[2\], got \[1\]"),
    (lambda g, p: (g, p[:4]), r"phi must have the shape of logits \[5\], got \[4\]"),
])
def test_bad_tensors_posterior_backward(change, message):
    z, offsets = torch.randn(5), torch.tensor([0, 3, 5])
    grad, phi = change(torch.ones(2), torch.rand(5))
    with pytest.raises(ValueError, match=message):
        torch.ops.mlellp.posterior_backward(grad, phi, z, offsets)
    # the fake kernel (meta tensors, torch.compile) refuses them in the same words
    with pytest.raises(ValueError, match=message):
        torch.ops.mlellp.posterior_backward(grad.to("meta"), phi.to("meta"), z.to("meta"), offsets.to("meta"))


@pytest.mark.parametrize("case", range(7, len(BAD)))  # the layout cases, which need no tensor data
def test_bad_input_meta(case):
    """The fake kernels check what the real ones check without data."""
    change, message = BAD[case]
    args = [t.to("meta") for t in change(*good())]
    with pytest.raises(ValueError, match=message):
        post(*args)
    if case <= 11:
        with pytest.raises(ValueError, match=message):
            log_pmf(*args[:2])


@pytest.mark.parametrize("where", range(3))
def test_meta_beside_cpu_is_a_device_error(where):
    """A meta argument sends the call to the fake kernel, which used to return CPU
    tensors of uninitialised memory."""
    args = list(good())
    args[where] = args[where].to("meta")
    names = ["logits", "offsets", "counts"]
    other = "offsets" if where == 0 else names[where]
    message = (r"offsets is on cpu but logits is on meta" if where == 0
               else rf"{other} is on meta but logits is on cpu")
    with pytest.raises(ValueError, match=message):
        post(*args)
    if where < 2:
        with pytest.raises(ValueError, match=message):
            log_pmf(*args[:2])


@pytest.mark.parametrize("op, args, name", [
    (torch.ops.mlellp.posterior, (torch.randn(3), None, torch.tensor([1])), "offsets"),
    (torch.ops.mlellp.posterior, (torch.randn(3), torch.tensor([0, 3]), None), "counts"),
    (torch.ops.mlellp.phi_jvp, (None, torch.randn(3), torch.tensor([0, 3]), torch.tensor([1])), "tangent"),
    (torch.ops.mlellp.phi_jvp, (torch.randn(3), torch.randn(3), torch.tensor([0, 3]), None), "counts"),
    (torch.ops.mlellp.posterior_backward, (None, torch.rand(3), torch.randn(3), torch.tensor([0, 3])),
     "grad_log_likelihood"),
    (torch.ops.mlellp.log_pmf, (torch.randn(3), None), "offsets"),
])
def test_none_arguments(op, args, name):
    """None for a tensor argument of the ops used to read as an empty or UNKNOWN_SCALAR tensor."""
    with pytest.raises(ValueError, match=f"{name} is required, got None"):
        op(*args)
