"""posterior / log_pmf against independent references (enumeration, padded DP)."""
import numpy as np
import pytest
import torch

import mlellp_ext
from mlellp_ext.reference import log_pmf_enumerate, posterior_enumerate, posterior_padded_dp

from conftest import CUDA, DEVICES, random_bags

post = torch.ops.mlellp.posterior
log_pmf = torch.ops.mlellp.log_pmf


@pytest.mark.parametrize("device", DEVICES)
def test_matches_enumeration_float64(gen, device):
    logits, offsets, counts = random_bags(gen, 300, device=device)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = posterior_enumerate(logits, offsets, counts)
    assert phi.dtype == ll.dtype == torch.float64
    np.testing.assert_allclose(phi.cpu().numpy(), ref_phi, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ll.cpu().numpy(), ref_ll, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_log_pmf_matches_enumeration_float64(gen, device):
    logits, offsets, _ = random_bags(gen, 200, device=device)
    out = log_pmf(logits, offsets)
    ref = log_pmf_enumerate(logits, offsets)
    assert out.shape == (logits.numel() + offsets.numel() - 1,)
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-12, atol=1e-10)
    # Each bag's PMF sums to one.
    sizes = (offsets[1:] - offsets[:-1]).cpu()
    bag = torch.repeat_interleave(torch.arange(sizes.numel()), sizes + 1)
    total = torch.zeros(sizes.numel(), dtype=torch.float64).index_add_(0, bag, out.cpu().exp())
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64(gen, device):
    logits, offsets, counts = random_bags(gen, 2000, device=device)
    phi64, ll64 = post(logits, offsets, counts)
    phi32, ll32 = post(logits.float(), offsets, counts)
    assert phi32.dtype == ll32.dtype == torch.float32
    torch.testing.assert_close(phi32.double(), phi64, rtol=0, atol=1e-5)
    torch.testing.assert_close(ll32.double(), ll64, rtol=1e-5, atol=1e-5)
    pmf32 = log_pmf(logits.float(), offsets)
    pmf64 = log_pmf(logits, offsets)
    torch.testing.assert_close(pmf32.double().exp(), pmf64.exp(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(gen, device, dtype):
    logits, offsets, counts = random_bags(gen, 500, device=device)
    low = logits.to(dtype)
    phi, ll = post(low, offsets, counts)
    assert phi.dtype == dtype and ll.dtype == torch.float32
    ref_phi, ref_ll = post(low.float(), offsets, counts)
    torch.testing.assert_close(phi, ref_phi.to(dtype))
    torch.testing.assert_close(ll, ref_ll)
    assert log_pmf(low, offsets).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,y", [(2000, 1000), (2000, 37), (2000, 1990)])
def test_large_bag_against_padded_dp(gen, device, n, y):
    logits = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).to(device)
    offsets = torch.tensor([0, n], device=device)
    counts = torch.tensor([y], device=device)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = posterior_padded_dp(logits, offsets, counts)
    torch.testing.assert_close(phi, ref_phi, rtol=0, atol=1e-9)
    torch.testing.assert_close(ll, ref_ll, rtol=1e-10, atol=1e-9)
    # float32 (its own precision, here also the log-space path for wide rows)
    phi32, ll32 = post(logits.float(), offsets, counts)
    torch.testing.assert_close(phi32.double(), ref_phi, rtol=0, atol=1e-4)
    torch.testing.assert_close(ll32.double(), ref_ll, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_finite_logits(gen, device):
    # +-1e4 and friends: exact answer needs the log-space path; never NaN/inf.
    values = torch.tensor([1e4, -1e4, 800.0, -800.0, 60.0, -60.0, 0.5, -2.0], dtype=torch.float64)
    sizes = torch.randint(1, 9, (400,), generator=gen)
    idx = torch.randint(0, len(values), (int(sizes.sum()),), generator=gen)
    logits = (values[idx] + torch.randn(len(idx), generator=gen, dtype=torch.float64)).to(device)
    offsets = mlellp_ext.offsets_from_sizes(sizes).to(device)
    counts = torch.minimum((torch.rand(400, generator=gen) * (sizes + 1)).floor().long(), sizes).to(device)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = posterior_enumerate(logits, offsets, counts)
    assert torch.isfinite(phi).all() and torch.isfinite(ll).all()
    np.testing.assert_allclose(phi.cpu().numpy(), ref_phi, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ll.cpu().numpy(), ref_ll, rtol=1e-12, atol=1e-9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p, l = post(logits.to(dtype), offsets, counts)
        assert torch.isfinite(p).all() and torch.isfinite(l).all(), dtype
        assert ((p >= 0) & (p <= 1)).all()
    pmf = log_pmf(logits.float(), offsets)
    assert not torch.isnan(pmf).any()
    np.testing.assert_allclose(log_pmf(logits, offsets).cpu().numpy(), log_pmf_enumerate(logits, offsets),
                               rtol=1e-12, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_logits(device, dtype):
    inf = float("inf")
    # bag 0: one certain positive, count reachable; bag 1: impossible (needs 2 positives,
    # one logit is -inf); bag 2: certain negative with count 0; bag 3: all +inf with y = n.
    logits = torch.tensor([inf, 0.3, -1.0, -inf, 0.7, -inf, 2.0, inf, inf], dtype=dtype, device=device)
    offsets = torch.tensor([0, 3, 5, 7, 9], device=device)
    counts = torch.tensor([2, 2, 0, 2], device=device)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = posterior_enumerate(logits, offsets, counts)
    assert ll[1] == -inf and torch.isnan(phi[3:5]).all()
    keep = torch.tensor([0, 1, 2, 5, 6, 7, 8])
    np.testing.assert_allclose(phi.cpu()[keep].double().numpy(), ref_phi[keep.numpy()], atol=1e-6)
    np.testing.assert_allclose(ll.cpu()[[0, 2, 3]].double().numpy(), ref_ll[[0, 2, 3]], atol=1e-6)
    assert phi[0] == 1 and phi[5] == 0 and phi[6] == 0 and (phi[7:] == 1).all()
    # Gradient: 0 for infinite logits of possible bags, NaN only in the impossible bag.
    z = logits.clone().requires_grad_(True)
    post(z, offsets, counts)[1][[0, 2, 3]].sum().backward()
    assert z.grad[0] == 0 and torch.isfinite(z.grad[[0, 1, 2, 5, 6, 7, 8]]).all()
    pmf = log_pmf(logits, offsets)
    np.testing.assert_allclose(pmf.cpu().double().numpy(), log_pmf_enumerate(logits, offsets), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_counts_and_sizes(gen, device, dtype):
    # y = 0 -> phi exactly 0; y = n -> exactly 1; n = 0 -> ll 0; n = 1.
    sizes = torch.tensor([0, 1, 1, 1, 5, 5, 12, 12, 0])
    counts = torch.tensor([0, 0, 1, 1, 0, 5, 0, 12, 0])
    logits = (torch.randn(int(sizes.sum()), generator=gen, dtype=torch.float64) * 4).to(dtype=dtype, device=device)
    offsets = mlellp_ext.offsets_from_sizes(sizes).to(device)
    phi, ll = post(logits, offsets, counts.to(device))
    o = offsets.tolist()
    assert ll[0] == 0 and ll[8] == 0
    for b, (n, y) in enumerate(zip(sizes.tolist(), counts.tolist())):
        if n == 0:
            continue
        expect = 0.0 if y == 0 else (1.0 if y == n else None)
        if expect is not None:
            assert (phi[o[b]:o[b + 1]] == expect).all(), (b, phi[o[b]:o[b + 1]])
    ref_phi, ref_ll = posterior_enumerate(logits, offsets, counts)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(phi.cpu().double().numpy(), ref_phi, atol=tol)
    np.testing.assert_allclose(ll.cpu().double().numpy(), ref_ll, rtol=tol, atol=tol)
    # n = 1: ll = log sigmoid(+-z)
    z1 = logits[o[1]].double()
    torch.testing.assert_close(ll[1].double(), torch.nn.functional.logsigmoid(-z1), rtol=tol, atol=tol)
    torch.testing.assert_close(ll[2].double(), torch.nn.functional.logsigmoid(logits[o[2]].double()), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_no_bags_and_empty_bags(device):
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    phi, ll = post(empty, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))
    assert phi.shape == (0,) and ll.shape == (0,)
    phi, ll = post(empty, torch.zeros(4, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.long, device=device))
    assert (ll == 0).all()
    assert (log_pmf(empty, torch.zeros(4, dtype=torch.long, device=device)) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_bag(gen, device):
    logits, offsets, counts = random_bags(gen, 50, min_size=1, device=device)
    phi, ll = post(logits, offsets, counts)
    bad = logits.clone()
    bad[offsets[7]] = float("nan")
    phi2, ll2 = post(bad, offsets, counts)
    inside = torch.zeros_like(phi, dtype=torch.bool)
    inside[offsets[7]:offsets[8]] = True
    assert torch.isnan(phi2[inside]).all() and torch.isnan(ll2[7])
    torch.testing.assert_close(phi2[~inside], phi[~inside], rtol=0, atol=0)
    others = torch.arange(50, device=device) != 7
    torch.testing.assert_close(ll2[others], ll[others], rtol=0, atol=0)
    pmf = log_pmf(bad, offsets)
    assert torch.isnan(pmf[offsets[7] + 7:offsets[8] + 8]).all()
    assert torch.isfinite(pmf[:offsets[7] + 7]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(gen, device):
    logits, offsets, counts = random_bags(gen, 100, device=device)
    phi, ll = post(logits, offsets, counts)
    z_nc = torch.stack([logits, -logits], dim=1)[:, 0]
    off_nc = torch.stack([offsets, offsets * 0], dim=1)[:, 0]
    cnt_nc = torch.stack([counts, counts], dim=1)[:, 1]
    assert not (z_nc.is_contiguous() or off_nc.is_contiguous() or cnt_nc.is_contiguous())
    phi2, ll2 = post(z_nc, off_nc, cnt_nc)
    torch.testing.assert_close(phi2, phi, rtol=0, atol=0)
    torch.testing.assert_close(ll2, ll, rtol=0, atol=0)
    torch.testing.assert_close(log_pmf(z_nc, off_nc), log_pmf(logits, offsets), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_agrees_with_padded_dp(gen, device):
    logits, offsets, counts = random_bags(gen, 3000, min_size=2, device=device)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        phi, ll = post(logits.to(dtype), offsets, counts)
        ref_phi, ref_ll = posterior_padded_dp(logits.to(dtype), offsets, counts)
        torch.testing.assert_close(phi, ref_phi, rtol=0, atol=tol)
        torch.testing.assert_close(ll, ref_ll, rtol=tol, atol=tol)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(gen, dtype):
    for max_size, num_bags in ((12, 20000), (300, 50), (2000, 3)):
        logits, offsets, counts = random_bags(gen, num_bags, max_size=max_size, dtype=dtype)
        phi_c, ll_c = post(logits, offsets, counts)
        phi_g, ll_g = post(logits.cuda(), offsets.cuda(), counts.cuda())
        # float32 phi on an H200 differed from the CPU's by up to 1.5e-5 on bags of up to 300
        # (built with contraction then; the device's exp/log also differ in the last bits), and
        # a float16 phi rounds to either neighbour (one ulp is 4.9e-4 below 1). The gradient
        # g * (phi - sigmoid) carries phi's error.
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        phi_tol = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, tol)
        torch.testing.assert_close(phi_g.cpu().float(), phi_c.float(), rtol=0, atol=phi_tol)
        torch.testing.assert_close(ll_g.cpu(), ll_c, rtol=tol, atol=tol)
        torch.testing.assert_close(log_pmf(logits.cuda(), offsets.cuda()).cpu(), log_pmf(logits, offsets), rtol=tol, atol=tol)
        g = torch.randn(num_bags, generator=gen, dtype=ll_c.dtype)
        gb_c = torch.ops.mlellp.posterior_backward(g, phi_c, logits, offsets)
        gb_g = torch.ops.mlellp.posterior_backward(g.cuda(), phi_g, logits.cuda(), offsets.cuda())
        torch.testing.assert_close(gb_g.cpu().float(), gb_c.float(), rtol=0, atol=phi_tol)
