"""posterior_multiclass: the exact E-step over count vectors, against brute-force
enumeration of labelings, the binary op (C = 2), autograd, opcheck and compile."""
import itertools
import math

import pytest
import torch

from conftest import DEVICES
from mlellp_ext import (bag_log_likelihood, offsets_from_sizes, posterior, posterior_multiclass,
                        posterior_multiclass_approx)

OP = torch.ops.mlellp.posterior_multiclass


def brute_force(logits, counts):
    """phi and log P(counts) of one bag by enumerating every labeling (float64)."""
    n, C = logits.shape
    if n == 0:
        return torch.zeros(0, C, dtype=torch.float64), 0.0
    lp = torch.log_softmax(logits.double(), -1)
    labelings = torch.tensor(list(itertools.product(range(C), repeat=n)))
    keep = (torch.nn.functional.one_hot(labelings, C).sum(1) == counts).all(1)
    labelings = labelings[keep]
    if labelings.numel() == 0:
        return None, -math.inf
    scores = lp.gather(1, labelings.T).sum(0)  # log-probability of each labeling
    log_p = torch.logsumexp(scores, 0)
    if log_p == -math.inf:
        return None, -math.inf
    weights = (scores - log_p).exp()
    phi = torch.zeros(n, C, dtype=torch.float64)
    for i in range(n):
        phi[i].index_add_(0, labelings[:, i], weights)
    return phi, float(log_p)


def random_multiclass(gen, num_bags, C, max_size, scale=2.0, dtype=torch.float64, device="cpu"):
    sizes = torch.randint(0, max_size + 1, (num_bags,), generator=gen)
    logits = torch.randn(int(sizes.sum()), C, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, C, (int(sizes.sum()),), generator=gen)  # counts of a random labeling
    offsets = offsets_from_sizes(sizes)
    bag = torch.repeat_interleave(torch.arange(num_bags), sizes)
    counts = torch.zeros(num_bags, C, dtype=torch.long).index_put_((bag, labels), torch.ones_like(labels),
                                                                    accumulate=True)
    return logits.to(dtype=dtype, device=device), offsets.to(device), counts.to(device)


def check_against_brute_force(logits, offsets, counts, phi, log_lik, tol):
    for b in range(counts.shape[0]):
        s, e = int(offsets[b]), int(offsets[b + 1])
        ref_phi, ref_ll = brute_force(logits[s:e].cpu(), counts[b].cpu())
        if ref_ll == -math.inf:
            assert log_lik[b] == -math.inf and (e == s or phi[s:e].isnan().all()), b
            continue
        assert abs(float(log_lik[b]) - ref_ll) <= tol * max(1.0, abs(ref_ll)), (b, float(log_lik[b]), ref_ll)
        if e > s:
            assert (phi[s:e].double().cpu() - ref_phi).abs().max() <= tol, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, max_size", [(3, 8), (4, 7), (5, 6)])
@pytest.mark.parametrize("scale", [0.5, 3.0, 60.0, 1e4])  # 60 and 1e4 take the log-space path
def test_matches_brute_force(gen, device, C, max_size, scale):
    logits, offsets, counts = random_multiclass(gen, 6, C, max_size, scale, device=device)
    phi, log_lik = OP(logits, offsets, counts)
    check_against_brute_force(logits, offsets, counts, phi, log_lik, 1e-10)
    finite = log_lik.isfinite()
    rows = torch.repeat_interleave(finite.cpu(), offsets.diff().cpu()).to(device)
    assert torch.allclose(phi[rows].sum(1), torch.ones_like(phi[rows, 0]), atol=1e-12)
    assert (phi[counts[torch.repeat_interleave(torch.arange(6, device=device), offsets.diff())] == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_two_classes_is_the_binary_op(gen, device):
    logits, offsets, counts = random_multiclass(gen, 40, 2, 30, 3.0, device=device)
    phi, log_lik = posterior(logits, offsets, counts)
    phi_b, log_lik_b = posterior(logits[:, 1] - logits[:, 0], offsets, counts[:, 1])
    assert torch.allclose(phi[:, 1], phi_b, rtol=0, atol=1e-12)
    assert torch.allclose(phi[:, 0], 1 - phi_b, rtol=0, atol=1e-12)
    assert torch.allclose(log_lik, log_lik_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_infinite_and_nan_logits_stay_in_their_bag(device):
    inf, nan = math.inf, math.nan
    logits = torch.tensor([[inf, 0.0, 0.0], [0.0, 1.0, 2.0],          # bag 0: instance 0 certainly class 0
                           [inf, 0.0, 0.0], [0.5, 0.0, -1.0],         # bag 1: counts demand no class 0
                           [nan, 0.0, 0.0], [0.0, 0.0, 0.0],          # bag 2: a NaN logit
                           [-inf, -inf, -inf],                        # bag 3: no distribution
                           [1.0, -inf, 0.0], [inf, inf, 0.0]],        # bag 4: two +inf share the mass
                          dtype=torch.float64, device=device)
    offsets = torch.tensor([0, 2, 4, 6, 7, 9], device=device)
    counts = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], device=device)
    phi, log_lik = OP(logits, offsets, counts)
    phi, log_lik = phi.cpu(), log_lik.cpu()
    assert phi[0].tolist() == [1.0, 0.0, 0.0] and phi[1].tolist() == [0.0, 1.0, 0.0]
    assert log_lik[0] == pytest.approx(math.log(torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)[1].item()))
    assert log_lik[1] == -inf and phi[2:4].isnan().all()
    assert log_lik[2].isnan() and phi[4:6].isnan().all()
    assert log_lik[3].isnan() and phi[6].isnan().all()
    # bag 4: instance 1 is class 0 or 1 (1/2 each); instance 0 takes the other (p(1) = 0 for it).
    ref_phi, ref_ll = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], math.log(torch.softmax(torch.tensor([1.0, 0.0]), 0)[0] * 0.5)
    assert log_lik[4] == pytest.approx(ref_ll) and phi[7:9].tolist() == ref_phi


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_non_contiguous_logits(gen, device, dtype):
    logits, offsets, counts = random_multiclass(gen, 20, 4, 9, 2.0, device=device)
    ref_phi, ref_ll = OP(logits.to(dtype).double(), offsets, counts)  # the same inputs, rounded to dtype
    non_contiguous = logits.to(dtype).T.contiguous().T
    assert not non_contiguous.is_contiguous()
    phi, log_lik = OP(non_contiguous, offsets, counts)
    assert phi.dtype == dtype and log_lik.dtype == torch.float32 and phi.shape == logits.shape
    assert torch.allclose(phi.double(), ref_phi, atol={torch.float32: 1e-5}.get(dtype, 1e-2))
    assert torch.allclose(log_lik.double(), ref_ll, rtol=1e-5, atol=1e-4)


def test_gradcheck_and_gradient_identity(gen):
    logits, offsets, counts = random_multiclass(gen, 5, 4, 6, 1.5)
    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: bag_log_likelihood(z, offsets, counts, reduction="none"), (z,))
    phi, log_lik = posterior(z, offsets, counts)
    assert not phi.requires_grad  # a non-differentiable output (EM's fixed target)
    grad, = torch.autograd.grad(log_lik.sum(), z)
    assert torch.allclose(grad, phi - torch.softmax(logits, 1), atol=1e-12)


def test_opcheck_and_compile(gen):
    logits, offsets, counts = random_multiclass(gen, 6, 3, 7, 1.0)
    for args in [(logits, offsets, counts), (logits.float(), offsets, counts),
                 (logits.clone().requires_grad_(), offsets, counts)]:
        torch.library.opcheck(OP, args)
    torch.library.opcheck(OP, (logits, offsets, counts), {"max_states": 10_000})
    compiled = torch.compile(lambda z: posterior(z, offsets, counts), fullgraph=True)
    phi, log_lik = compiled(logits)
    ref_phi, ref_ll = posterior(logits, offsets, counts)
    assert torch.equal(phi, ref_phi) and torch.equal(log_lik, ref_ll)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument_and_value(device):
    z = torch.randn(5, 3, device=device)
    off = torch.tensor([0, 2, 5], device=device)
    ok = torch.tensor([[1, 1, 0], [0, 1, 2]], device=device)
    cases = [
        ((z[:, 0], off, ok), "logits must be 2-D (num_instances, num_classes), got shape [5]"),
        ((z[:, :1], off, ok), "logits must have at least 2 classes (columns), got shape [5, 1]"),
        ((z.long(), off, ok), "logits must be float32, float64, float16 or bfloat16, got Long"),
        ((z, off.int(), ok), "offsets must be int64, got Int"),
        ((z, off, ok[:, 0]), "counts must be 2-D (num_bags, num_classes), got shape [2]"),
        ((z, off, ok.float()), "counts must be int64, got Float"),
        ((z, off, ok[:1]), "counts must have num_bags = len(offsets) - 1 = 2 rows, got shape [1, 3]"),
        ((z, off, ok[:, :2]), "counts must have one column per class of logits (3), got shape [2, 2]"),
        ((z, off, torch.tensor([[1, 1, 0], [1, 1, 2]], device=device)),
         "counts[1] = [1, 1, 2] sums to 4 but bag 1 has 3 instances (offsets[2] - offsets[1])"),
        ((z, off, torch.tensor([[1, 1, 0], [4, -1, 0]], device=device)),
         "counts must be non-negative, got counts[1, 1] = -1"),
        ((z, torch.tensor([0, 3, 2], device=device), ok), "offsets must be non-decreasing"),
        ((z, torch.tensor([0, 2, 4], device=device), ok), "offsets[-1] must equal len(logits) = 5, got offsets[2] = 4"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=f"^posterior_multiclass: {_escape(message)}"):
            OP(*args)
    for bad in (0, 2 ** 40 + 1):
        with pytest.raises(ValueError, match=rf"posterior_multiclass: max_states must be between 1 and "
                                             rf"2\^40 = 1099511627776, got {bad}"):
            OP(z, off, ok, max_states=bad)
    # Over the state budget: the bag, its counts and its state count are named.
    big = torch.randn(64, 10, device=device)
    counts = torch.tensor([[10] + [6] * 9], device=device)
    with pytest.raises(ValueError, match=r"bag 0 with counts \[10, 6, 6, 6, 6, 6, 6, 6, 6, 6\] has 4\.4389e\+08 "
                                         r"count-vector states .* over max_states = 16777216"):
        OP(big, torch.tensor([0, 64], device=device), counts)
    with pytest.raises(ValueError, match=r"bag 1 with counts \[0, 1, 2\] has 6 count-vector states .* "
                                         r"over max_states = 5"):
        OP(z, off, ok, max_states=5)
    phi, _ = OP(z, off, ok, max_states=6)  # exactly at the budget
    assert phi.shape == z.shape
    with pytest.raises(ValueError, match="over max_states = 5"):
        bag_log_likelihood(z, off, ok, max_states=5)
    assert bag_log_likelihood(z, off, ok, max_states=6).isfinite()


def test_the_fake_kernel_checks_as_the_kernel_does():
    z = torch.empty(5, 3, device="meta")
    off = torch.empty(3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"counts must have one column per class of logits \(3\), got shape \[2, 2\]"):
        OP(z, off, torch.empty(2, 2, dtype=torch.long, device="meta"))
    phi, log_lik = OP(z.half(), off, torch.empty(2, 3, dtype=torch.long, device="meta"))
    assert phi.shape == (5, 3) and phi.dtype == torch.float16 and log_lik.shape == (2,) and log_lik.dtype == torch.float32


def test_python_api_requires_offsets_and_counts():
    with pytest.raises(ValueError, match="posterior_multiclass: offsets and counts are required"):
        posterior_multiclass(torch.randn(3, 2), None, None)
    with pytest.raises(ValueError, match=r"posterior: logits of shape \[3, 2\] are read as \(N, C\) multi-class "
                                         r"logits, which need \(B, C\) counts, got counts of shape \[1\]"):
        posterior(torch.randn(3, 2), torch.tensor([0, 3]), torch.tensor([1]))


def _escape(text):
    import re

    return re.escape(text)


def test_approximate_e_step(gen):
    """Exact for C = 2; otherwise rows sum to 1, columns to the counts, and it stays
    close to the exact posterior (bench/multiclass.py measures how close)."""
    logits, offsets, counts = random_multiclass(gen, 30, 2, 12, 2.0)
    phi, ll = posterior_multiclass_approx(logits, offsets, counts)
    ref_phi, ref_ll = posterior(logits, offsets, counts)
    assert torch.allclose(phi, ref_phi, atol=1e-12) and torch.allclose(ll, 2 * ref_ll, atol=1e-10)
    logits, offsets, counts = random_multiclass(gen, 30, 6, 12, 2.0)
    phi, _ = posterior_multiclass_approx(logits, offsets, counts, tol=1e-8)
    ref_phi, _ = posterior(logits, offsets, counts)
    bag = torch.repeat_interleave(torch.arange(30), offsets.diff())
    assert torch.allclose(phi.sum(1), torch.ones(len(bag), dtype=phi.dtype), atol=1e-12)
    sums = torch.zeros(30, 6, dtype=phi.dtype).index_add_(0, bag, phi)
    assert torch.allclose(sums, counts.double(), atol=1e-8)
    assert (phi[counts[bag] == 0] == 0).all()
    assert (phi - ref_phi).abs().mean() < 0.05  # measured ~0.02; the prior p alone is ~0.3 off
    assert (torch.softmax(logits, 1) - ref_phi).abs().mean() > 0.1
    with pytest.raises(ValueError, match=r"posterior_multiclass_approx: counts\[\d+\] = .* (sums to|has \d+ in class)"):
        posterior_multiclass_approx(logits, offsets, counts + 1)
    with pytest.raises(ValueError, match="max_iterations must be a positive integer, got 0"):
        posterior_multiclass_approx(logits, offsets, counts, max_iterations=0)


def test_benchmark_baseline_computes_the_same_posterior(gen):
    """bench/multiclass.py's PyTorch lattice DP (the speed baseline) is a correct one."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "multiclass.py")
    spec = importlib.util.spec_from_file_location("bench_multiclass", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits, offsets, counts = random_multiclass(gen, 8, 10, 9, 2.0)
    phi, log_lik = bench.torch_dp(logits, bench.lattice_index(offsets, counts))
    ref_phi, ref_ll = OP(logits, offsets, counts)
    assert torch.allclose(phi, ref_phi, atol=1e-10) and torch.allclose(log_lik, ref_ll, atol=1e-10)


def test_second_derivatives_raise_instead_of_dropping_phi(gen):
    logits, offsets, counts = random_multiclass(gen, 4, 3, 5, 1.0)
    z = logits.clone().requires_grad_()
    _, log_lik = posterior(z, offsets, counts)
    grad, = torch.autograd.grad(log_lik.sum() + (z ** 3).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of mlellp::posterior_multiclass are not supported"):
        torch.autograd.grad(grad.sum(), z)
    with pytest.raises(RuntimeError):
        torch.func.jacrev(torch.func.grad(lambda z: posterior(z, offsets, counts)[1].sum()))(logits)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_log_space_path_against_float64(gen, device):
    """Logits ~ N(0, 60^2) put every bag on the log-space path, in float32 here."""
    logits, offsets, counts = random_multiclass(gen, 20, 4, 9, 60.0, device=device)
    ref_phi, ref_ll = OP(logits.float().double(), offsets, counts)  # float64 on the same (rounded) inputs
    phi, log_lik = OP(logits.float(), offsets, counts)
    # phi = exp(a + t - log P) with terms of size |log P|: float32 (eps 6e-8) loses
    # about |log P| * 6e-8 in each exponent.
    bag = torch.repeat_interleave(torch.arange(20, device=device), offsets.diff())
    tol = 1e-6 + 3e-7 * ref_ll.abs()[bag].unsqueeze(1)
    assert ((phi.double() - ref_phi).abs() <= tol).all()
    assert torch.allclose(log_lik.double(), ref_ll, rtol=1e-6, atol=1e-5)


def test_approximate_e_step_with_confident_and_infinite_logits():
    inf = math.inf
    # A confident prediction the counts rule out (its per-class posteriors underflow).
    phi, log_lik = posterior_multiclass_approx(torch.tensor([[200.0, 0, 0], [0, 0, 0]]), torch.tensor([0, 2]),
                                               torch.tensor([[0, 1, 1]]))
    assert torch.allclose(phi, torch.tensor([[0, 0.5, 0.5], [0, 0.5, 0.5]])) and log_lik.isfinite().all()
    # Two +inf share the mass, as in the exact op.
    z = torch.tensor([[inf, inf, 0], [0, 0, 0]])
    phi, log_lik = posterior_multiclass_approx(z, torch.tensor([0, 2]), torch.tensor([[1, 1, 0]]))
    assert not phi.isnan().any() and log_lik.isfinite().all()
    assert torch.allclose(phi.sum(1), torch.ones(2))
    phi, log_lik = posterior_multiclass_approx(torch.tensor([[math.nan, 0, 0], [0, 0, 0]]), torch.tensor([0, 1, 2]),
                                               torch.tensor([[1, 0, 0], [1, 0, 0]]))
    assert phi[0].isnan().all() and log_lik[0].isnan() and not phi[1].isnan().any()


def test_python_checks_match_the_ops_words():
    from mlellp_ext.bags import check_count_vectors

    offsets = torch.tensor([0, 2, 5])
    for counts in (torch.tensor([[1, 2, 0], [0, -1, 4]]), torch.tensor([[1, 1, 0], [0, -1, 4]]),
                   torch.tensor([[3, 0, 0], [1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 1, 0]])):
        with pytest.raises(ValueError) as op_error:
            OP(torch.zeros(5, 3), offsets, counts)
        with pytest.raises(ValueError) as py_error:
            check_count_vectors("posterior_multiclass", 5, offsets, counts, 1 << 24)
        assert str(py_error.value) == str(op_error.value)
    big = torch.tensor([[16, 0, 0], [1, 1, 1]])  # 17 and 8 states; at max_states = 16 bag 0 is over
    off = torch.tensor([0, 16, 19])
    with pytest.raises(ValueError) as op_error:
        OP(torch.zeros(19, 3), off, big, max_states=16)
    with pytest.raises(ValueError) as py_error:
        check_count_vectors("posterior_multiclass", 19, off, big, 16)
    assert str(py_error.value) == str(op_error.value)
    check_count_vectors("posterior_multiclass", 19, off, big, 17)  # exactly at the budget


def test_vmap_over_logits_and_counts(gen):
    logits, offsets, counts = random_multiclass(gen, 5, 3, 6, 1.5)
    batch_z = torch.stack([logits, logits * 2, -logits])
    batch_c = torch.stack([counts, counts, counts.flip(1)])
    for fn in (lambda z, c: posterior_multiclass(z, offsets, c), lambda z, c: OP(z, offsets, c)):
        phi, log_lik = torch.vmap(fn)(batch_z, batch_c)
        for k in range(3):
            ref_phi, ref_ll = OP(batch_z[k], offsets, batch_c[k])
            assert torch.equal(phi[k], ref_phi) and torch.equal(log_lik[k], ref_ll)
    # torch.func.grad of a per-entry log-likelihood, batched
    grads = torch.vmap(torch.func.grad(lambda z, c: posterior_multiclass(z, offsets, c)[1].sum()))(batch_z, batch_c)
    for k in range(3):
        z = batch_z[k].clone().requires_grad_()
        ref, = torch.autograd.grad(posterior_multiclass(z, offsets, batch_c[k])[1].sum(), z)
        assert torch.allclose(grads[k], ref)
    with pytest.raises(ValueError, match="vmap over offsets is not supported"):
        torch.vmap(lambda o: OP(logits, o, counts))(torch.stack([offsets, offsets]))
