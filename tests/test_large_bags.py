"""Large bags (checkpointed rows, tilting, thread teams) and mixed workloads."""
import numpy as np
import pytest
import torch

import mlellp_ext
from mlellp_ext.reference import posterior_leave_one_out

from conftest import DEVICES

post = torch.ops.mlellp.posterior


@pytest.mark.slow  # a 10,000-instance float64 reference on the CPU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frac", [0.5, 0.1])
def test_bag_of_10000_against_float64_reference(gen, device, frac):
    n = 10_000
    y = int(n * frac)
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    check = torch.randint(0, n, (6,), generator=gen).tolist()
    ref_phi, ref_ll = posterior_leave_one_out(logits, y, check)
    offsets, counts = torch.tensor([0, n]), torch.tensor([y])
    for dtype, phi_tol, ll_rtol in ((torch.float64, 1e-9, 1e-10), (torch.float32, 2e-4, 1e-5)):
        phi, ll = post(logits.to(dtype).to(device), offsets.to(device), counts.to(device))
        np.testing.assert_allclose(phi.cpu().double().numpy()[check], ref_phi, rtol=0, atol=phi_tol)
        np.testing.assert_allclose(float(ll), ref_ll, rtol=ll_rtol)
        assert torch.isfinite(phi).all()
        # the marginals of a bag sum to its count
        assert abs(float(phi.double().sum()) - y) < (1e-6 if dtype == torch.float64 else 1e-1)


@pytest.mark.slow  # bags of 9,000 and 12,000, each again alone
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_workload_equals_bag_by_bag(gen, device):
    # many small bags and a few huge ones in one call (thread teams on the CPU,
    # thread blocks on CUDA) give what each bag gives alone
    sizes = torch.randint(1, 13, (3000,), generator=gen)
    sizes[[10, 1500, 2999]] = torch.tensor([9000, 300, 12000])
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    logits = torch.randn(int(sizes.sum()), generator=gen, dtype=torch.float64) * 2
    counts = torch.minimum((torch.rand(3000, generator=gen) * (sizes + 1)).floor().long(), sizes)
    counts[[10, 2999]] = torch.tensor([4500, 1300])
    phi, ll = post(logits.to(device), offsets.to(device), counts.to(device))
    for b in [0, 10, 11, 1500, 2999]:
        s, e = int(offsets[b]), int(offsets[b + 1])
        p1, l1 = post(logits[s:e].to(device), torch.tensor([0, e - s], device=device), counts[b:b + 1].to(device))
        torch.testing.assert_close(phi[s:e], p1, rtol=0, atol=1e-10)
        torch.testing.assert_close(ll[b:b + 1], l1, rtol=1e-12, atol=1e-10)


def test_huge_bag_stays_exact_in_both_paths(gen):
    # infinite logits force the log-space path on a checkpointed bag
    n = 5000
    logits = torch.randn(n, generator=gen, dtype=torch.float64)
    offsets, counts = torch.tensor([0, n]), torch.tensor([n // 2])
    phi, ll = post(logits, offsets, counts)
    with_inf = torch.cat([logits, torch.tensor([float("inf")])])
    phi2, ll2 = post(with_inf, torch.tensor([0, n + 1]), counts + 1)
    torch.testing.assert_close(phi2[:n], phi, rtol=0, atol=1e-9)
    torch.testing.assert_close(ll2, ll, rtol=1e-10, atol=1e-9)
    assert phi2[n] == 1


TEAM_SCRIPT = r"""
import sys, torch, mlellp_ext
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
sizes = torch.tensor([5, 3000, 7, 2500, 12])
off = mlellp_ext.offsets_from_sizes(sizes)
z = torch.randn(int(sizes.sum()), generator=g, dtype=torch.float64) * 2
cnt = torch.tensor([2, 1500, 3, 300, 6])
phi, ll = torch.ops.mlellp.posterior(z, off, cnt)
torch.save({"phi": phi, "ll": ll}, sys.argv[1])
"""


def test_thread_team_matches_single_thread(tmp_path):
    # MLELLP_TEAM_MIN_WIDTH=64 makes the two wide bags run as 2-thread teams.
    import os
    import subprocess
    import sys

    out = {}
    for name, width in (("team", "64"), ("solo", "1000000000")):
        path = tmp_path / f"{name}.pt"
        env = dict(os.environ, MLELLP_TEAM_MIN_WIDTH=width)
        r = subprocess.run([sys.executable, "-c", TEAM_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        out[name] = torch.load(path)
    torch.testing.assert_close(out["team"]["phi"], out["solo"]["phi"], rtol=0, atol=1e-11)
    torch.testing.assert_close(out["team"]["ll"], out["solo"]["ll"], rtol=1e-12, atol=1e-11)
