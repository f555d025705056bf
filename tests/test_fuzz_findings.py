"""What a fuzz of every op and library function found, each as its reproducer with
the documented result (test_properties.py keeps the randomized search going)."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mlellp_ext as M
from mlellp_ext import count_weights as cw
from mlellp_ext.reference import posterior_enumerate

from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("z", [[-400.0, -900.0, -400.0], [-372.0, -900.0, -372.0]])
def test_float64_posterior_of_far_apart_logits_is_not_nan(device, z):
    """Forced to take a tiny p_i at the band's edge, a scaled row fell to ~1e-175 and
    sum_k a(k) g(k) underflowed to 0 / 0 (float32 was right)."""
    logits = torch.tensor(z, dtype=torch.float64, device=device)
    y = 2
    offsets = torch.tensor([0, len(z)], device=device)
    counts = torch.tensor([y], device=device)
    ref_phi, ref_ll = posterior_enumerate(logits, offsets, counts)
    phi, ll = torch.ops.mlellp.posterior(logits, offsets, counts)
    assert torch.allclose(phi.cpu(), torch.from_numpy(ref_phi), rtol=1e-9, atol=0)  # phi[1] ~ 1e-217: relative
    assert math.isclose(float(ll), float(ref_ll[0]), rel_tol=1e-14)
    weighted, _ = M.posterior_weighted(logits, offsets, cw.exact(counts.cpu(), torch.tensor([len(z)])).to(device))
    assert torch.equal(weighted, phi)
    x = logits.clone().requires_grad_()
    grad, = torch.autograd.grad(M.bag_log_likelihood(x, offsets, counts), x)
    assert torch.isfinite(grad).all()
    em = M.EMTargets(offsets, counts)
    em.update(logits)
    assert torch.isfinite(em.phi).all()


def _rows(phi):
    return phi.sum(1)


def test_approximate_estep_rows_sum_to_one_when_it_does_not_converge():
    z = torch.tensor([[0.0, 10, 0], [10, 0, 0]], dtype=torch.float64)
    phi, _ = M.posterior_multiclass_approx(z, M.offsets_from_sizes([2]), torch.tensor([[1, 0, 1]]))
    assert torch.allclose(_rows(phi), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)
    assert ((phi >= 0) & (phi <= 1)).all() and (phi[:, 1] == 0).all()
    # where the instances point (the exact op: [[4.5e-5, 0, 0.99995], [0.99995, 0, 4.5e-5]])
    assert phi[0, 2] > 0.99 and phi[1, 0] > 0.99
    # at |z| ~ 1e3 rows were off by 0.5 and phi reached 1.17
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = torch.randn(12, 4, generator=g, dtype=torch.float64) * 1e3
        counts = torch.tensor([[2, 1, 2, 1], [1, 1, 3, 1]])
        phi, ll = M.posterior_multiclass_approx(z, M.offsets_from_sizes([6, 6]), counts)
        assert ((phi >= 0) & (phi <= 1)).all() and torch.isfinite(ll).all()
        assert torch.allclose(_rows(phi), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-15)


def test_approximate_estep_of_finite_logits_is_not_nan():
    z = torch.tensor([[801, -7, -1098, 1087], [-124, -1248, 1355, 372], [873, -352, 1456, -447]],
                     dtype=torch.float64)
    phi, ll = M.posterior_multiclass_approx(z, M.offsets_from_sizes([3]), torch.tensor([[2, 0, 0, 1]]))
    assert not phi.isnan().any() and torch.isfinite(ll).all()
    assert torch.allclose(_rows(phi), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(phi.sum(0), torch.tensor([2.0, 0, 0, 1], dtype=torch.float64))


def test_approximate_estep_nan_handling():
    nan, inf = math.nan, math.inf
    z = torch.tensor([[nan, inf, 0], [0, 0, 0]], dtype=torch.float64)
    phi, ll = M.posterior_multiclass_approx(z, M.offsets_from_sizes([2]), torch.tensor([[1, 1, 0]]))
    exact_phi, exact_ll = M.posterior_multiclass(z, M.offsets_from_sizes([2]), torch.tensor([[1, 1, 0]]))
    assert ll.isnan().all() and exact_ll.isnan().all() and phi.isnan().all()
    # a NaN in one bag leaves the other bags' phi bit for bit
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64) * 4
    offsets = M.offsets_from_sizes([8] * 5)
    counts = torch.tensor([[2, 2, 2, 1, 1]] * 5)
    phi, _ = M.posterior_multiclass_approx(z, offsets, counts)
    z[3, 1] = nan
    phi_nan, ll_nan = M.posterior_multiclass_approx(z, offsets, counts)
    assert phi_nan[:8].isnan().all() and ll_nan[0].isnan()
    assert torch.equal(phi_nan[8:], phi[8:])


def test_count_weights_at_extreme_scales():
    w = cw.gaussian([1.0], 1e-200, torch.tensor([3]))
    assert w[0] == -math.inf and w[2] == -math.inf and w[3] == -math.inf
    assert math.isclose(float(w[1]), -math.log(1e-200) - 0.5 * math.log(2 * math.pi), rel_tol=1e-15)
    w = cw.laplace([1.0], 1e17, torch.tensor([3]))
    # log((1 - a) / (1 + a)) with 1 - a = 1e-17 (1 - 1e-17 rounds to 1 in float64)
    assert torch.isfinite(w).all() and math.isclose(float(w[1]), math.log(1e-17 / 2), rel_tol=1e-12)
    # the weighted E-step takes them: one count possible, the posterior of that count
    phi, _ = M.posterior_weighted(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0, 3]),
                                  cw.gaussian([1.0], 1e-200, torch.tensor([3])))
    assert torch.allclose(phi, M.posterior(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64),
                                           torch.tensor([0, 3]), torch.tensor([1]))[0])


@pytest.mark.parametrize("fn", [M.dllp_loss, M.bag_log_likelihood])
def test_mean_over_zero_bags_is_zero(fn):
    z = torch.zeros(0, requires_grad=True)
    loss = fn(z, torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0,)
    z2 = torch.zeros(0, 3, requires_grad=True)  # multi-class too
    assert fn(z2, torch.zeros(1, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)).item() == 0.0


def test_max_states_must_be_an_integer():
    args = (torch.randn(3, 2), torch.tensor([0, 3]), torch.tensor([[1, 2]]))
    for bad in (1.5, 8.0, True, "8"):
        with pytest.raises(ValueError, match=f"posterior_multiclass: max_states must be an integer, got {bad!r}"):
            M.posterior_multiclass(*args, max_states=bad)
    with pytest.raises(ValueError, match="posterior_multiclass_auto: max_states must be an integer, got 1.5"):
        M.approx.posterior_multiclass_auto(*args, max_states=1.5)
    assert M.posterior_multiclass(*args, max_states=np.int64(8))[0].shape == (3, 2)


def _refuses_allocations_over(nbytes):
    """Whether this Linux refuses a malloc of nbytes outright (heuristic or strict
    overcommit, and less memory than that); elsewhere the allocation may succeed."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            mode = f.read().strip()
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return False
    return mode in ("0", "2") and info["MemTotal"] + info.get("SwapTotal", 0) < nbytes


def test_a_lattice_too_large_for_memory_names_the_bag():
    counts = torch.tensor([[1, 2, 0, 0, 0, 0, 0], [50] * 7])  # 51^7 ~ 9e11 states: 7 TB of float32 tables
    states = 51 ** 7
    nbytes = (2 * states + 2 * 350 * 7) * 4  # two tables, the shifted rows twice
    if not _refuses_allocations_over(nbytes):
        pytest.skip("this machine might grant a 7 TB allocation (overcommit), so the op would run instead")
    with pytest.raises(torch.OutOfMemoryError) as err:
        M.posterior_multiclass(torch.randn(353, 7), torch.tensor([0, 3, 353]), counts, max_states=1 << 40)
    text = str(err.value)
    assert f"posterior_multiclass: bag 1 with counts [50, 50, 50, 50, 50, 50, 50] has {states} count-vector " \
           f"states and needs {nbytes} bytes" in text and "max_states" in text


def test_a_jpeg_truncated_past_its_header_leaves_no_out_folder(tmp_path):
    from mlellp_ext.app.data import DataError
    from mlellp_ext.app.train import TrainConfig, train

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "img")
    rows, counts = ["path,bag,label"], ["bag,count"]
    for b in range(6):
        for j in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{b}_{j}.jpg")
            rows.append(f"img/{b}_{j}.jpg,bag{b},{j % 2}")
        counts.append(f"bag{b},2")
    (tmp_path / "inst.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "counts.csv").write_text("\n".join(counts) + "\n")
    broken = tmp_path / "img" / "2_1.jpg"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])  # the header reads; decoding fails
    out = tmp_path / "run"
    cfg = dict(dataset="manifest", data_root=str(tmp_path / "inst.csv"), counts_file=str(tmp_path / "counts.csv"),
               width=0.25, epochs=1, quiet=True, device="cpu", test_fraction=0.0)
    with pytest.raises(DataError, match=r"inst\.csv, line 11: cannot read image .*2_1\.jpg"):
        train(TrainConfig(out=str(out), **cfg))
    assert not out.exists()
    # a folder that was there before stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"2_1\.jpg"):
        train(TrainConfig(out=str(out), **cfg))
    assert (out / "notes.txt").read_text() == "mine"
