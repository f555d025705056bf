"""CPU benchmark of d phi / dz (run with `make bench`; report: bench/report.py).

On the same 20,000 bags of sizes 2..12 (float64), in one run:
  * mlellp:           torch.ops.mlellp.phi_jvp, Cov(h | S = y) times a tangent
  * padded_dp_hvp:    the same product from autograd's second derivatives of the
                      padded log-space DP in plain PyTorch (what a user would write)
  * mlellp-posterior: the E-step op on the same bags, for the cost of phi_jvp
                      relative to the forward
Agreement is checked, timing never asserted.
"""
import torch

from mlellp_ext.reference import phi_jvp_padded_dp

from conftest import make_workload

GROUP = "phi-jvp-cpu-20k-bags-2..12"
NUM_BAGS = 20_000


def _setup():
    logits, offsets, counts = make_workload(NUM_BAGS, dtype=torch.float64, seed=1)
    tangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return tangent, logits, offsets, counts


def _record(benchmark, logits, offsets, impl):
    benchmark.group = GROUP
    benchmark.extra_info.update(impl=impl, instances=int(logits.numel()), bags=int(offsets.numel() - 1),
                                dtype=str(logits.dtype).replace("torch.", ""), threads=torch.get_num_threads())


def test_mlellp(benchmark):
    tangent, logits, offsets, counts = _setup()
    _record(benchmark, logits, offsets, "mlellp")
    out = benchmark.pedantic(torch.ops.mlellp.phi_jvp, (tangent, logits, offsets, counts), rounds=10, warmup_rounds=1)
    torch.testing.assert_close(out, phi_jvp_padded_dp(tangent, logits, offsets, counts), rtol=0, atol=1e-10)


def test_padded_dp_hvp(benchmark):
    tangent, logits, offsets, counts = _setup()
    _record(benchmark, logits, offsets, "padded_dp_hvp")
    benchmark.pedantic(phi_jvp_padded_dp, (tangent, logits, offsets, counts), rounds=3, warmup_rounds=1)


def test_mlellp_posterior(benchmark):
    _tangent, logits, offsets, counts = _setup()
    _record(benchmark, logits, offsets, "mlellp-posterior")
    benchmark.pedantic(torch.ops.mlellp.posterior, (logits, offsets, counts), rounds=10, warmup_rounds=1)
