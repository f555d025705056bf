"""d phi / dz = Cov(h | S = y) (the phi_jvp op) and the second derivatives built on it,
against enumeration of labelings and autograd through an independent padded DP."""
import pytest
import torch

import mlellp_ext
from mlellp_ext.reference import covariance_enumerate, phi_jvp_padded_dp

from conftest import DEVICES, random_bags

jvp = torch.ops.mlellp.phi_jvp


def block_covariance(logits, offsets, counts):
    blocks = covariance_enumerate(logits, offsets, counts)
    return torch.block_diag(*[torch.from_numpy(c) for c in blocks]) if blocks else torch.zeros(0, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_phi_jvp_matches_enumeration(gen, device, dtype):
    logits, offsets, counts = random_bags(gen, 40, max_size=9)
    tangent = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    expect = block_covariance(logits, offsets, counts) @ tangent
    got = jvp(tangent.to(device, dtype), logits.to(device, dtype), offsets.to(device), counts.to(device))
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.cpu().double(), expect, rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, y", [(30, 1), (61, 30), (200, 57), (500, 499), (1000, 400)])
def test_phi_jvp_large_bags_against_padded_dp(gen, device, n, y):
    """Bags beyond enumeration, with several checkpoint blocks (s ~ sqrt(n))."""
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    tangent = torch.randn(n, generator=gen, dtype=torch.float64)
    offsets, counts = torch.tensor([0, n]), torch.tensor([y])
    expect = phi_jvp_padded_dp(tangent, logits, offsets, counts)
    got = jvp(tangent.to(device), logits.to(device), offsets.to(device), counts.to(device)).cpu()
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_phi_jvp_edge_cases(gen, device):
    """y = 0 and y = n give exactly 0 (phi is constant); infinite logits are certain and
    uncorrelated with the rest; a count that infinite logits make impossible gives NaN in
    its own bag only; empty bags are fine."""
    inf = float("inf")
    logits = torch.tensor([0.3, -1.0, 2.0,  inf, 0.3, -inf, -1.2,  inf, inf, 0.1,  0.5, 0.7], dtype=torch.float64)
    offsets = torch.tensor([0, 3, 3, 7, 10, 12])
    counts = torch.tensor([0, 0, 2, 1, 2])
    tangent = torch.randn(12, generator=gen, dtype=torch.float64)
    got = jvp(tangent.to(device), logits.to(device), offsets.to(device), counts.to(device)).cpu()
    assert torch.equal(got[0:3], torch.zeros(3, dtype=torch.float64))     # y = 0
    assert torch.equal(got[10:12], torch.zeros(2, dtype=torch.float64))   # y = n
    assert got[3] == 0 and got[5] == 0                                    # infinite logits
    finite = jvp(tangent[[4, 6]], logits[[4, 6]], torch.tensor([0, 2]), torch.tensor([1]))
    torch.testing.assert_close(got[[4, 6]], finite, rtol=0, atol=1e-15)  # = the bag without them
    assert torch.isnan(got[7:10]).all()                                   # two certain positives, count 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_phi_jvp_nonfinite_tangent(gen, device, bad):
    """A non-finite tangent makes its whole bag NaN, certain labels included; other bags keep their values."""
    logits = torch.tensor([0.3, float("inf"), -1.0, 0.8, 0.2, -0.4], dtype=torch.float64)
    offsets, counts = torch.tensor([0, 4, 6]), torch.tensor([2, 1])
    tangent = torch.randn(6, generator=gen, dtype=torch.float64)
    clean = jvp(tangent, logits, offsets, counts)
    tangent[2] = bad
    got = jvp(tangent.to(device), logits.to(device), offsets.to(device), counts.to(device)).cpu()
    assert torch.isnan(got[:4]).all()
    torch.testing.assert_close(got[4:], clean[4:], rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_phi_jvp_non_contiguous(gen, device):
    logits, offsets, counts = random_bags(gen, 30, device=device)
    tangent = torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(device)
    strided_z = torch.stack([logits, logits * 0 + 7], 1)[:, 0]
    strided_u = torch.stack([tangent * 0 - 3, tangent], 1)[:, 1]
    assert not strided_z.is_contiguous() and not strided_u.is_contiguous()
    torch.testing.assert_close(jvp(strided_u, strided_z, offsets, counts), jvp(tangent, logits, offsets, counts),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_matches_enumeration(gen, device):
    """Every route to the Hessian of sum_b log P_b: C_b - diag(sigmoid'(z)) per bag."""
    logits, offsets, counts = random_bags(gen, 8, max_size=7)
    sigma = torch.sigmoid(logits)
    expect = block_covariance(logits, offsets, counts) - torch.diag(sigma * (1 - sigma))
    z, offsets, counts = logits.to(device), offsets.to(device), counts.to(device)
    f = lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "sum")  # noqa: E731
    routes = {
        "autograd.functional.hessian": lambda: torch.autograd.functional.hessian(f, z),
        "func.hessian (jacfwd of jacrev)": lambda: torch.func.hessian(f)(z),
        "jacrev of jacrev": lambda: torch.func.jacrev(torch.func.jacrev(f))(z),
        "jacrev of grad": lambda: torch.func.jacrev(torch.func.grad(f))(z),
    }
    for name, route in routes.items():
        torch.testing.assert_close(route().cpu(), expect, rtol=0, atol=1e-12, msg=name)
    # the Jacobian of phi, from either mode
    phi = lambda t: mlellp_ext.posterior(t, offsets, counts)[0]  # noqa: E731
    cov = block_covariance(logits, offsets, counts)
    torch.testing.assert_close(torch.func.jacrev(phi)(z).cpu(), cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(phi)(z).cpu(), cov, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(gen, device):
    logits, offsets, counts = random_bags(gen, 12, max_size=8, device=device)
    z = logits.clone().requires_grad_(True)
    weights = torch.randn(offsets.numel() - 1, generator=gen, dtype=torch.float64).to(device)
    f = lambda t: (mlellp_ext.bag_log_likelihood(t, offsets, counts, "none") * weights).sum()  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (z,), check_fwd_over_rev=True, check_rev_over_rev=True)
    # phi through a loss, as when phi itself is trained on (BCE against fixed labels)
    labels = (torch.rand(z.shape, generator=gen) < 0.5).double().to(device)
    g = lambda t: torch.nn.functional.binary_cross_entropy(  # noqa: E731
        mlellp_ext.posterior(t, offsets, counts)[0].clamp(1e-6, 1 - 1e-6), labels)
    assert torch.autograd.gradcheck(g, (z,), check_forward_ad=True)
    # phi_jvp is linear in its tangent: its gradient w.r.t. the tangent is phi_jvp again
    u = torch.randn(z.shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: jvp(t, logits, offsets, counts), (u,), check_forward_ad=True,
                                    check_batched_grad=True)


def test_third_derivatives_raise(gen):
    """d phi_jvp / dz (third cumulants) has no kernel: every route to it raises rather
    than return zeros."""
    logits, offsets, counts = random_bags(gen, 4, min_size=3)
    counts = torch.minimum(torch.ones_like(counts), offsets.diff())
    f = lambda x: mlellp_ext.bag_log_likelihood(x, offsets, counts, "sum")  # noqa: E731
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z), z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z, create_graph=True)  # second derivatives work
    with pytest.raises(RuntimeError, match="third derivatives"):
        h.sum().backward()
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.func.jacfwd(torch.func.hessian(f))(logits)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.func.jacrev(torch.func.jacrev(torch.func.grad(f)))(logits)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.gradcheck(lambda t: jvp(torch.ones_like(t), t, offsets, counts), (z,))
    # torch.ops called directly cannot serve torch.func's grad/jvp: a clear error, not zeros
    direct = lambda x: torch.ops.mlellp.posterior(x, offsets, counts)[1].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="call it through mlellp_ext"):
        torch.func.grad(direct)(logits)
    with pytest.raises(RuntimeError, match="call it through mlellp_ext"):
        torch.func.jvp(direct, (logits,), (torch.ones_like(logits),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # log_pmf has reverse-mode derivatives only
        dual = fwAD.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(RuntimeError, match="no forward-mode derivative"):
            mlellp_ext.log_pmf(dual, offsets)
        with pytest.raises(RuntimeError, match="no forward-mode derivative"):
            torch.ops.mlellp.log_pmf(dual, offsets)


@pytest.mark.parametrize("device", DEVICES)
def test_phi_jvp_vmap(gen, device):
    logits, offsets, counts = random_bags(gen, 10, max_size=7, device=device)
    rows = torch.randn((4, logits.numel()), generator=gen, dtype=torch.float64).to(device)
    torch.testing.assert_close(torch.func.vmap(jvp, in_dims=(0, None, None, None))(rows, logits, offsets, counts),
                               torch.stack([jvp(r, logits, offsets, counts) for r in rows]))
    torch.testing.assert_close(torch.func.vmap(jvp, in_dims=(0, 0, None, None))(rows, rows * 2, offsets, counts),
                               torch.stack([jvp(r, r * 2, offsets, counts) for r in rows]))


@pytest.mark.slow  # phi_jvp runs a bag per thread: 3,000 x 1,500 cells serially on a GPU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, y", [(20000, 5), (20000, 19995), (100000, 99990), (3000, 1500)])
def test_phi_jvp_precision_large_bags(gen, device, n, y):
    """Large bags used to lose all accuracy in float32 (log rows grow as -0.7 n) and some
    in float64 for y near n (means of T cancelling): against central differences of phi
    in float64, and float32 input against float64."""
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    offsets, counts = torch.tensor([0, n], device=device), torch.tensor([y], device=device)
    z, u = z.to(device), u.to(device)
    got = jvp(u, z, offsets, counts)
    h = 1e-5
    fd = (post_phi(z + h * u, offsets, counts) - post_phi(z - h * u, offsets, counts)) / (2 * h)
    scale = got.abs().max()
    assert (got - fd).abs().max() <= 1e-6 * scale
    got32 = jvp(u.float(), z.float(), offsets, counts).double()
    exact32 = jvp(u.float().double(), z.float().double(), offsets, counts)  # same inputs, rounded to float32
    assert (got32 - exact32).abs().max() <= 1e-5 * scale


def post_phi(z, offsets, counts):
    return torch.ops.mlellp.posterior(z, offsets, counts)[0]


def test_more_routes_to_first_and_second_derivatives(gen):
    """Routes that used to raise 'third derivatives' or drop the phi term silently."""
    logits, offsets, counts = random_bags(gen, 6, min_size=2, max_size=7)
    sigma = torch.sigmoid(logits)
    cov = block_covariance(logits, offsets, counts)
    hess = cov - torch.diag(sigma * (1 - sigma))
    w = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    fphi = lambda t: mlellp_ext.posterior(t, offsets, counts)[0]  # noqa: E731
    fll = lambda t: mlellp_ext.bag_log_likelihood(t, offsets, counts, "sum")  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # noqa: E731
    close(torch.autograd.functional.jvp(fphi, logits, w)[1], cov @ w)
    close(torch.autograd.functional.hvp(fll, logits, w)[1], hess @ w)
    # Forward over forward would differentiate phi's tangent (a phi_jvp) as well: it raises
    # (documented) rather than give a wrong Hessian.
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.func.jacfwd(torch.func.jacfwd(fll))(logits)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.func.jvp(lambda x: torch.func.jvp(fll, (x,), (w,))[1], (logits,), (w,))
    z = logits.clone().requires_grad_(True)
    u = torch.randn(logits.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    (gu,) = torch.autograd.grad(jvp(u, z, offsets, counts), u, w)  # only the tangent's gradient
    close(gu, cov @ w)
    # forward over reverse without create_graph: the phi term used to be dropped
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(logits.clone().requires_grad_(True), w)
        for f in (lambda d: post(d, offsets, counts)[1].sum(), fll):
            (g,) = torch.autograd.grad(f(dual), dual)
            close(fwAD.unpack_dual(g).tangent, hess @ w)


post = torch.ops.mlellp.posterior
