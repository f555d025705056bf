"""CPU benchmark of the E-step (run with `make bench`; report: bench/report.py).

Implementations on the same 100,000 bags of sizes 2..12, in one run:
  * mlellp:     torch.ops.mlellp.posterior (float32; bags in SIMD lanes)
  * mlellp-per-bag: the same op with MLELLP_CPU_LANES=0 (one bag at a time)
  * mlellp-float64: the op on float64 logits
  * padded_dp:  padded log-space DP in plain PyTorch, phi by autograd
  * enumerate:  all C(n, y) labelings in NumPy (the method's original
                reference code), on the first ENUMERATE_BAGS bags only
Each records its instance count in extra_info so the report can give
instances per second and ratios. Agreement is checked, timing never asserted.
"""
import numpy as np
import pytest
import torch

from mlellp_ext.reference import posterior_enumerate, posterior_padded_dp

from conftest import ENUMERATE_BAGS

GROUP = "posterior-cpu-100k-bags-2..12"


def _record(benchmark, logits, offsets, impl):
    benchmark.group = GROUP
    benchmark.extra_info.update(
        impl=impl,
        instances=int(logits.numel()),
        bags=int(offsets.numel() - 1),
        dtype=str(logits.dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
    )


def test_mlellp(benchmark, workload):
    logits, offsets, counts = workload
    _record(benchmark, logits, offsets, "mlellp")
    phi, ll = benchmark.pedantic(torch.ops.mlellp.posterior, (logits, offsets, counts), rounds=20, warmup_rounds=2)
    ref_phi, ref_ll = posterior_padded_dp(logits.double(), offsets, counts)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=0, atol=1e-5)
    torch.testing.assert_close(ll.double(), ref_ll, rtol=1e-5, atol=1e-5)


def test_mlellp_per_bag(benchmark, workload, monkeypatch):
    logits, offsets, counts = workload
    monkeypatch.setenv("MLELLP_CPU_LANES", "0")
    _record(benchmark, logits, offsets, "mlellp-per-bag")
    benchmark.pedantic(torch.ops.mlellp.posterior, (logits, offsets, counts), rounds=20, warmup_rounds=2)


def test_mlellp_float64(benchmark, workload):
    logits, offsets, counts = workload
    logits = logits.double()
    _record(benchmark, logits, offsets, "mlellp-float64")
    phi, ll = benchmark.pedantic(torch.ops.mlellp.posterior, (logits, offsets, counts), rounds=20, warmup_rounds=2)
    ref_phi, ref_ll = posterior_padded_dp(logits, offsets, counts)
    torch.testing.assert_close(phi, ref_phi, rtol=0, atol=1e-10)
    torch.testing.assert_close(ll, ref_ll, rtol=1e-10, atol=1e-10)


def test_padded_dp(benchmark, workload):
    logits, offsets, counts = workload
    _record(benchmark, logits, offsets, "padded_dp")
    benchmark.pedantic(posterior_padded_dp, (logits, offsets, counts), rounds=5, warmup_rounds=1)


def test_enumerate(benchmark, workload):
    logits, offsets, counts = workload
    offsets = offsets[: ENUMERATE_BAGS + 1]
    logits = logits[: int(offsets[-1])]
    counts = counts[:ENUMERATE_BAGS]
    _record(benchmark, logits, offsets, "enumerate")
    phi, ll = benchmark.pedantic(posterior_enumerate, (logits, offsets, counts), rounds=3)
    ours_phi, ours_ll = torch.ops.mlellp.posterior(logits.double(), offsets, counts)
    np.testing.assert_allclose(ours_phi.numpy(), phi, atol=1e-10)
    np.testing.assert_allclose(ours_ll.numpy(), ll, atol=1e-10)
