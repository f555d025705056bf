"""EM: EMTargets (the library's E-step state) against the op, and the EM method
learning from counts alone."""

import pytest
import torch
import torch.nn.functional as F

import mlellp_ext
from mlellp_ext import EMTargets, offsets_from_sizes, posterior
from mlellp_ext.app.batches import Batches
from mlellp_ext.app.distributed import SINGLE
from mlellp_ext.app.methods import build_method


def synthetic(gen, num_bags=400, dim=5):
    """Two Gaussian classes in `dim` dimensions, bags of sizes 2..12, known labels."""
    sizes = torch.randint(2, 13, (num_bags,), generator=gen)
    n = int(sizes.sum())
    y = (torch.rand(n, generator=gen) < 0.5).long()
    w = torch.randn(dim, generator=gen)
    x = torch.randn(n, dim, generator=gen) + (2 * y - 1).float()[:, None] * w / w.norm() * 1.5
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    bag = torch.repeat_interleave(torch.arange(num_bags), sizes)
    counts = torch.zeros(num_bags, dtype=torch.long).index_add_(0, bag, y)
    return x, y, offsets, counts


def random_layout(gen, num_bags=30, max_size=9):
    sizes = torch.randint(0, max_size + 1, (num_bags,), generator=gen)
    counts = (torch.rand(num_bags, generator=gen) * (sizes + 1)).floor().long().minimum(sizes)
    return mlellp_ext.offsets_from_sizes(sizes), counts


# ---- EMTargets against the op

def test_initial_targets_are_bag_proportions(gen):
    offsets, counts = random_layout(gen)
    em = EMTargets(offsets, counts)
    sizes = offsets.diff()
    want = torch.cat([torch.full((int(n),), float(y) / int(n)) for n, y in zip(sizes, counts) if n > 0])
    assert em.phi.dtype == torch.float32 and em.phi.shape == (int(offsets[-1]),)
    torch.testing.assert_close(em.phi, want)
    assert em.log_likelihood is None and em.iterations == 0 and not em.converged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_equals_posterior(gen, dtype):
    offsets, counts = random_layout(gen)
    em = EMTargets(offsets, counts)
    logits = (torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64) * 3).to(dtype)
    L = em.update(logits)
    phi, ll = mlellp_ext.posterior(logits, offsets, counts)
    torch.testing.assert_close(em.phi, phi.float())  # float32 targets, whatever the logits
    assert em.phi.dtype == torch.float32
    assert L == em.log_likelihood
    assert L == pytest.approx(float(ll.double().mean()), rel=1e-6)
    positions = torch.randperm(int(offsets[-1]), generator=gen)[:7]
    torch.testing.assert_close(em.targets(positions), phi.float()[positions])
    torch.testing.assert_close(em.targets(positions.tolist()), phi.float()[positions])


def test_stopping_rule(gen):
    offsets, counts = random_layout(gen)
    n = int(offsets[-1])
    em = EMTargets(offsets, counts, tol=1e-3, min_iterations=3)
    z = torch.randn(n, generator=gen)
    em.update(z)
    em.update(z)  # |dL| = 0 < tol, but only 2 iterations
    assert not em.converged
    em.update(z + 5)  # 3 iterations, a large change
    assert not em.converged
    em.update(z + 5)  # no change, past min_iterations
    assert em.converged
    em.update(z)
    assert not em.converged  # a change again
    em0 = EMTargets(offsets, counts, tol=1e9, min_iterations=0)
    em0.update(z)
    assert not em0.converged  # needs a previous L to compare with
    em0.update(z)
    assert em0.converged


def test_state_round_trip(gen, tmp_path):
    offsets, counts = random_layout(gen)
    em = EMTargets(offsets, counts, min_iterations=2, tol=1e9)
    for _ in range(2):
        em.update(torch.randn(int(offsets[-1]), generator=gen))
    assert em.converged
    path = tmp_path / "em.pt"
    torch.save(em.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = EMTargets(offsets, counts, min_iterations=2, tol=1e9)
    other.load_state_dict(state)
    assert torch.equal(other.phi, em.phi) and other.log_likelihood == em.log_likelihood
    assert other.iterations == 2 and other.converged
    fresh = EMTargets(offsets, counts)
    fresh.load_state_dict(EMTargets(offsets, counts).state_dict())
    assert fresh.log_likelihood is None and fresh.iterations == 0
    # the EM method's checkpoints of 0.1 (key last_L) still load
    fresh.load_state_dict({"phi": em.phi, "last_L": torch.tensor(-1.5), "converged": torch.tensor(False),
                           "iterations": torch.tensor(4)})
    assert fresh.log_likelihood == -1.5 and fresh.iterations == 4
    with pytest.raises(ValueError, match="not an EMTargets state .missing log_likelihood"):
        fresh.load_state_dict({"phi": em.phi, "iterations": torch.tensor(1), "converged": torch.tensor(False)})
    with pytest.raises(ValueError, match=r"phi must have shape \[\d+\]"):
        fresh.load_state_dict({**state, "phi": torch.zeros(int(offsets[-1]) + 1)})


def test_errors_name_the_argument():
    offsets = mlellp_ext.offsets_from_sizes([3, 2])
    with pytest.raises(ValueError, match=r"counts\[0\] = 4 is outside \[0, n_b\] = \[0, 3\] for bag 0"):
        EMTargets(offsets, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="offsets must be int64, got Float"):
        EMTargets(offsets.float(), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        EMTargets(torch.tensor([0, 3, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="counts must have num_bags = len\\(offsets\\) - 1 = 2 elements, got 3"):
        EMTargets(offsets, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="counts must be an int64 tensor, got list"):
        EMTargets(offsets, [1, 1])
    with pytest.raises(ValueError, match="tol must be a non-negative number"):
        EMTargets(offsets, torch.tensor([1, 1]), tol=-1.0)
    with pytest.raises(ValueError, match="min_iterations must be a non-negative integer"):
        EMTargets(offsets, torch.tensor([1, 1]), min_iterations=2.5)
    em = EMTargets(offsets, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"logits must be 1-D with one entry per instance \(N = 5\), got shape \[4\]"):
        em.update(torch.zeros(4))
    with pytest.raises(ValueError, match=r"got shape \[5, 1\]"):
        em.update(torch.zeros(5, 1))
    with pytest.raises(ValueError, match="logits must be float32, float64, float16 or bfloat16, got Long"):
        em.update(torch.zeros(5, dtype=torch.long))
    with pytest.raises(IndexError, match="position 5 is out of range for 5 instances"):
        em.targets(torch.tensor([0, 5]))
    with pytest.raises(IndexError, match="position -1 is out of range for 5 instances"):
        em.targets(torch.tensor([-1]))
    with pytest.raises(ValueError, match="positions must be integers"):
        em.targets(torch.tensor([0.0]))
    assert em.iterations == 0  # nothing was half-done


# ---- learning

def _em_method(x, offsets, counts, estep, **options):
    method = build_method("mle", offsets=offsets, counts=counts, batch_size=64, estep=estep, **options)
    gen = torch.Generator().manual_seed(0)
    return method, Batches(offsets, counts, 64, gen), lambda pos, train: x[pos]


def test_em_method_learns_from_counts_alone(gen):
    torch.manual_seed(0)
    x, y, offsets, counts = synthetic(gen)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Flatten(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    em, batches, inputs = _em_method(x, offsets, counts, "fresh", tol=1e-4)
    history = []
    for _ in range(30):
        history.append(em.epoch(model=model, optimizer=optimizer, batches=batches, inputs=inputs, world=SINGLE,
                                progress=lambda it, desc: it)["L"])
        if em.converged:
            break
    with torch.no_grad():
        acc = ((model(x) > 0).long() == y).float().mean()
    assert acc >= 0.9, (float(acc), history)
    assert history[-1] > history[0]


def test_em_targets_learn_in_a_plain_loop(gen):
    # The library alone, as the README's loop: no trainer, no method object.
    torch.manual_seed(1)
    x, y, offsets, counts = synthetic(gen)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Flatten(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    em = EMTargets(offsets, counts)
    for _ in range(30):
        for pos in torch.randperm(x.shape[0]).split(64):
            loss = F.binary_cross_entropy_with_logits(model(x[pos]), em.targets(pos))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            em.update(model(x))
        if em.converged:
            break
    acc = ((model(x) > 0).long() == y).float().mean()
    assert acc >= 0.9, float(acc)
    # a constant classifier, which learnt nothing, scores about 0.5 here
    assert float(y.float().mean()) < 0.6


def test_em_monotone_with_exact_m_step(gen):
    # With the M-step run to convergence, EM never decreases the likelihood.
    x, y, offsets, counts = synthetic(gen, num_bags=150, dim=3)
    x = x.double()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    logits = lambda: x @ w[:-1] + w[-1]  # noqa: E731
    sizes = offsets[1:] - offsets[:-1]
    phi = torch.repeat_interleave(counts.double() / sizes.double(), sizes)
    Ls = []
    for _ in range(12):
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(), phi, reduction="sum")
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            phi, L = mlellp_ext.posterior(logits(), offsets, counts)
        Ls.append(float(L.sum()))
    diffs = torch.tensor(Ls).diff()
    assert (diffs > -1e-7).all(), Ls
    assert Ls[-1] - Ls[0] > 1.0  # it did improve


def test_stopping_rule_of_the_method_waits_for_min_epochs(gen):
    x, y, offsets, counts = synthetic(gen, num_bags=40)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Flatten(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    em, batches, inputs = _em_method(x, offsets, counts, "recorded", tol=1e9, min_epochs=3)  # any change converges
    epochs = 0
    while not em.converged:
        em.epoch(model=model, optimizer=optimizer, batches=batches, inputs=inputs, world=SINGLE,
                 progress=lambda it, desc: it)
        epochs += 1
    assert epochs == 3
    restored, _, _ = _em_method(x, offsets, counts, "recorded", tol=1e9, min_epochs=3)
    restored.load_state_dict(em.state_dict())
    assert restored.em.iterations == 3 and restored.converged


def test_multiclass_targets_are_the_posterior_of_count_vectors(gen):
    """Count vectors (B, C): (N, C) targets starting at each bag's proportions, then the
    exact multi-class posterior; C = 2 agrees with the binary targets on z1 - z0."""
    sizes = torch.randint(1, 8, (12,), generator=gen)
    offsets = offsets_from_sizes(sizes)
    labels = torch.randint(0, 4, (int(sizes.sum()),), generator=gen)
    bag = torch.repeat_interleave(torch.arange(12), sizes)
    counts = torch.zeros(12, 4, dtype=torch.long).index_put_((bag, labels), torch.ones_like(labels), accumulate=True)
    em = EMTargets(offsets, counts, min_iterations=0)
    assert em.phi.shape == (len(labels), 4) and em.num_classes == 4
    assert torch.allclose(em.phi, (counts.float() / sizes.unsqueeze(1))[bag])
    logits = torch.randn(len(labels), 4, generator=gen)
    L = em.update(logits)
    phi, ll = posterior(logits, offsets, counts)
    assert torch.equal(em.phi, phi) and L == pytest.approx(float(ll.double().mean()))
    assert em.targets(torch.tensor([0, 2])).shape == (2, 4)
    with pytest.raises(ValueError, match=r"logits must be 2-D with one row per instance and one column per class "
                                         r"\(\(N, C\) = \(\d+, 4\)\), got shape \[\d+\]"):
        em.update(logits[:, 0])
    with pytest.raises(ValueError, match=r"EMTargets: counts\[0\] = \[.*\] sums to \d+ but bag 0 has"):
        EMTargets(offsets, counts + torch.eye(4, dtype=torch.long)[0])
    with pytest.raises(ValueError, match=r"EMTargets: bag 0 with counts \[.*\] has .* over max_states = 1"):
        EMTargets(offsets, counts, max_states=1)
    state = em.state_dict()
    fresh = EMTargets(offsets, counts)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.phi, em.phi)
    # Two classes: the binary EM on z1 - z0 and counts of class 1.
    two = torch.stack([sizes - counts[:, 1], counts[:, 1]], 1)
    em2, em1 = EMTargets(offsets, two), EMTargets(offsets, counts[:, 1])
    z = torch.randn(len(labels), 2, generator=gen, dtype=torch.float64)
    assert em2.update(z) == pytest.approx(em1.update(z[:, 1] - z[:, 0]), abs=1e-6)
    assert torch.allclose(em2.phi[:, 1], em1.phi, atol=1e-6)


def test_multiclass_auto_approximates_only_bags_over_the_budget(gen):
    sizes = torch.tensor([3, 9, 4, 10])
    offsets = offsets_from_sizes(sizes)
    counts = torch.tensor([[1, 1, 1], [3, 3, 3], [2, 1, 1], [4, 3, 3]])  # states 8, 64, 12, 80
    logits = torch.randn(int(sizes.sum()), 3, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="bag 1 with counts \\[3, 3, 3\\] has 64 count-vector states"):
        EMTargets(offsets, counts, max_states=20)
    em = EMTargets(offsets, counts, max_states=20, estep="auto")
    em.update(logits)
    assert em.approximated_bags == 2
    exact, _ = posterior(logits, offsets, counts)
    approx, _ = mlellp_ext.posterior_multiclass_approx(logits, offsets, counts)
    bag = torch.repeat_interleave(torch.arange(4), sizes)
    big = torch.tensor([False, True, False, True])[bag]
    assert torch.allclose(em.phi[~big], exact[~big].float()) and torch.allclose(em.phi[big], approx[big].float())
    with pytest.raises(ValueError, match="estep must be one of exact, approx, auto, got 'fast'"):
        EMTargets(offsets, counts, estep="fast")
    with pytest.raises(ValueError, match="estep='auto' is for count vectors"):
        EMTargets(offsets, counts[:, 0], estep="auto")
