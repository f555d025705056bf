"""Gradients, opcheck and torch.compile of the ops."""
import pytest
import torch

import mlellp_ext

from conftest import DEVICES, random_bags

post = torch.ops.mlellp.posterior


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(gen, device):
    logits, offsets, counts = random_bags(gen, 40, max_size=8, device=device)
    z = logits.clone().requires_grad_(True)
    weights = torch.randn(offsets.numel() - 1, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: (post(t, offsets, counts)[1] * weights).sum(), (z,))
    assert torch.autograd.gradcheck(lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none"), (z,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_identity(gen, device):
    logits, offsets, counts = random_bags(gen, 200, device=device)
    z = logits.clone().requires_grad_(True)
    phi, ll = post(z, offsets, counts)
    assert phi.requires_grad and ll.requires_grad
    ll.sum().backward()
    torch.testing.assert_close(z.grad, phi - torch.sigmoid(logits), rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(gen, device, dtype):
    logits, offsets, counts = random_bags(gen, 30, device=device, dtype=dtype)
    z = logits.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.mlellp.posterior.default, (z, offsets, counts))
    torch.library.opcheck(torch.ops.mlellp.log_pmf.default, (logits, offsets))
    phi, ll = post(logits, offsets, counts)
    torch.library.opcheck(torch.ops.mlellp.posterior_backward.default, (torch.ones_like(ll), phi, logits, offsets))
    tangent = torch.randn(logits.shape, generator=gen, dtype=dtype).to(device)
    torch.library.opcheck(torch.ops.mlellp.phi_jvp.default, (tangent.requires_grad_(True), logits, offsets, counts))


def test_log_pmf_reverse_mode_only(gen):
    """log_pmf's backward (through posterior_weighted) sums the derivative of every
    log P(S_b = k): against posterior's gradient for each single k; forward mode raises."""
    logits, offsets, _ = random_bags(gen, 5)
    z = logits.double().clone().requires_grad_(True)
    out = torch.ops.mlellp.log_pmf(z, offsets)
    v = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, z, v)
    sizes = offsets.diff()
    want = torch.zeros_like(z)
    for k in range(int(sizes.max()) + 1):
        ok = sizes >= k  # bags with a count k
        counts = torch.minimum(torch.full_like(sizes, k), sizes)
        _, ll = torch.ops.mlellp.posterior(z, offsets, counts)
        weight = torch.where(ok, v[offsets[:-1] + torch.arange(len(sizes)) + counts], torch.zeros(()).double())
        (g,) = torch.autograd.grad(ll, z, weight)
        want = want + g
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="no forward-mode derivative"):
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            torch.ops.mlellp.log_pmf(fwAD.make_dual(z.detach(), torch.ones_like(z)), offsets)


def test_torch_compile_fullgraph(gen):
    logits, offsets, counts = random_bags(gen, 64, min_size=1, dtype=torch.float32)

    def loss(z, off, cnt):
        phi, ll = torch.ops.mlellp.posterior(z, off, cnt)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, phi)
        pmf = torch.ops.mlellp.log_pmf(z.detach(), off)
        return bce - ll.mean() + pmf.exp().sum() * 0

    compiled = torch.compile(loss, fullgraph=True)
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    out_c = compiled(z1, offsets, counts)
    out_e = loss(z2, offsets, counts)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def _loop(fn, rows):
    return torch.stack([fn(r) for r in rows])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_and_batched_gradcheck(gen, device):
    """Forward-mode AD (dual tensors, torch.func.jvp) used to pass through the ops with a
    zero tangent; gradcheck now compares forward- and reverse-mode, batched too, for both
    outputs (phi used to be non-differentiable)."""
    logits, offsets, counts = random_bags(gen, 20, max_size=8, device=device)
    z = logits.clone().requires_grad_(True)
    for f in (lambda t: post(t, offsets, counts), lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none")):
        assert torch.autograd.gradcheck(f, (z,), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_first_derivatives(gen, device):
    """grad, jacrev, jacfwd, jvp and vmap through the Python functions, against autograd
    and against a Python loop over the batch."""
    logits, offsets, counts = random_bags(gen, 12, max_size=7, device=device)
    f = lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "sum")  # noqa: E731
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(torch.func.grad(f)(logits), g)
    torch.testing.assert_close(torch.func.jacrev(f)(logits), g)
    torch.testing.assert_close(torch.func.jacfwd(f)(logits), g)
    v = torch.randn(logits.shape, generator=gen, dtype=logits.dtype).to(device)
    value, tangent = torch.func.jvp(f, (logits,), (v,))
    torch.testing.assert_close(value, f(logits))
    torch.testing.assert_close(tangent, (g * v).sum())
    # Per-bag Jacobian: row b is (phi - sigmoid) on bag b's instances, 0 elsewhere.
    jac = torch.func.jacfwd(lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none"))(logits)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none"))(logits))
    torch.testing.assert_close(jac.sum(0), g)

    rows = torch.randn((3, logits.numel()), generator=gen, dtype=logits.dtype).to(device) * 3
    rows = rows.t().contiguous().t()  # non-contiguous batch
    both = lambda t: mlellp_ext.posterior(t, offsets, counts)  # noqa: E731
    phi, ll = torch.func.vmap(both)(rows)
    torch.testing.assert_close(phi, _loop(lambda r: both(r)[0], rows))
    torch.testing.assert_close(ll, _loop(lambda r: both(r)[1], rows))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(rows), _loop(torch.func.grad(f), rows))
    torch.testing.assert_close(torch.func.vmap(lambda r: mlellp_ext.log_pmf(r, offsets), in_dims=1)(rows.t()),
                               _loop(lambda r: mlellp_ext.log_pmf(r, offsets), rows))
    # vmap over counts (one set of logits, several observations)
    sizes = offsets.diff()
    many = torch.stack([torch.minimum(counts + k, sizes) for k in range(3)])
    torch.testing.assert_close(torch.func.vmap(lambda c: mlellp_ext.posterior(logits, offsets, c)[1])(many),
                               _loop(lambda c: mlellp_ext.posterior(logits, offsets, c)[1], many))
    # torch.ops called directly batch too, in one kernel call per op
    torch.testing.assert_close(torch.func.vmap(lambda r: post(r, offsets, counts)[1])(rows), ll)
    phi_b = torch.func.vmap(lambda r: post(r, offsets, counts)[0])(rows)
    grads = torch.randn((3, offsets.numel() - 1), generator=gen, dtype=logits.dtype).to(device)
    torch.testing.assert_close(
        torch.func.vmap(torch.ops.mlellp.posterior_backward, in_dims=(0, 0, 0, None))(grads, phi_b, rows, offsets),
        torch.stack([torch.ops.mlellp.posterior_backward(grads[k], phi_b[k], rows[k], offsets) for k in range(3)]))


def test_vmap_bad_layout_raises(gen):
    logits, offsets, counts = random_bags(gen, 4, min_size=1)
    rows = torch.stack([logits, logits])
    f = lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none")  # noqa: E731
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal len\(logits\)"):
        torch.func.vmap(f)(rows[:, :-1])
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal len\(logits\)"):
        torch.func.vmap(lambda t: post(t, offsets, counts)[1])(rows[:, :-1])
    with pytest.raises(ValueError, match="vmap over offsets is not supported"):
        torch.func.vmap(lambda o: mlellp_ext.log_pmf(logits, o))(torch.stack([offsets, offsets]))
    with pytest.raises(ValueError, match=r"are read as \(N, C\) multi-class logits, which need \(B, C\) counts"):
        torch.func.vmap(f)(rows.unsqueeze(1))
    # a bad count in entry 1 is reported in the flat call's terms, with the layout explained
    bad = torch.stack([counts, counts])
    bad[1, 0] = offsets[1] + 1
    with pytest.raises(ValueError, match=rf"counts\[{counts.numel()}\] = .* \(under vmap .* bag k\*{counts.numel()} \+ b"):
        torch.func.vmap(lambda c: mlellp_ext.posterior(logits, offsets, c)[1])(bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_jvp_low_precision(gen, device, dtype):
    """Tangents of log_likelihood come in its dtype (float32 for 16-bit logits) and match
    the reverse-mode gradient."""
    logits, offsets, counts = random_bags(gen, 10, max_size=6, scale=1.0, dtype=dtype, device=device)
    f = lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "none")  # noqa: E731
    v = torch.randn(logits.shape, generator=gen).to(device=device, dtype=dtype)
    value, tangent = torch.func.jvp(f, (logits,), (v,))
    assert value.dtype == tangent.dtype == torch.float32
    phi, phi_tangent = torch.func.jvp(lambda t: mlellp_ext.posterior(t, offsets, counts)[0], (logits,), (v,))
    assert phi.dtype == phi_tangent.dtype == dtype
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z).sum(), z)
    expect = torch.stack([(g.float() * v.float())[offsets[b]:offsets[b + 1]].sum() for b in range(offsets.numel() - 1)])
    torch.testing.assert_close(tangent, expect, rtol=1e-2, atol=1e-2)


def test_vmap_empty_batch(gen):
    logits, offsets, counts = random_bags(gen, 5, min_size=1)
    empty = logits.new_empty((0, logits.numel()))
    phi, ll = torch.func.vmap(lambda t: mlellp_ext.posterior(t, offsets, counts))(empty)
    assert phi.shape == (0, logits.numel()) and ll.shape == (0, 5)
    assert torch.func.vmap(lambda t: mlellp_ext.log_pmf(t, offsets))(empty).shape == (0, logits.numel() + 5)
