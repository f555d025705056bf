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
    assert not phi.requires_grad and ll.requires_grad
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


def test_log_pmf_backward_raises(gen):
    logits, offsets, _ = random_bags(gen, 5)
    z = logits.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.mlellp.log_pmf(z, offsets).sum().backward()


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


def test_unsupported_derivatives_raise(gen):
    """Second derivatives, forward-mode AD and torch.func transforms used to give zero or
    None tangents (with at most a warning): each must raise instead."""
    logits, offsets, counts = random_bags(gen, 4, min_size=2)
    f = lambda x: mlellp_ext.bag_log_likelihood(x, offsets, counts, "sum")  # noqa: E731
    with pytest.raises(RuntimeError, match="second derivatives .* are not supported"):
        torch.autograd.functional.hessian(f, logits)
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z), z, create_graph=True)  # first derivatives still work under create_graph
    torch.testing.assert_close(g, mlellp_ext.posterior(logits, offsets, counts)[0] - torch.sigmoid(logits))
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported"):
        torch.func.jacfwd(f)(logits)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(f)(logits)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            f(dual)
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            mlellp_ext.log_pmf(dual, offsets)
