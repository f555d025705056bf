"""The EM driver on synthetic data: learning from counts alone, and monotonicity."""
import types

import torch

import mlellp_ext
from mlellp_ext.em import EM, e_step


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


def fake_trainer(x, offsets, counts, model, seed=0):
    """The attributes em.EM and em.m_step use, without a dataset on disk."""
    bags = types.SimpleNamespace(index=torch.arange(x.shape[0]), offsets=offsets, counts=counts)
    return types.SimpleNamespace(
        model=model, train_bags=bags, cfg=types.SimpleNamespace(batch_size=64),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.05), generator=torch.Generator().manual_seed(seed),
        preprocess=lambda idx, train: x[idx], progress=lambda it, desc: it)


def test_em_learns_from_counts_alone(gen):
    torch.manual_seed(0)
    x, y, offsets, counts = synthetic(gen)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Flatten(0))
    trainer = fake_trainer(x, offsets, counts, model)
    em = EM(trainer, estep="fresh", tol=1e-4)
    history = []
    for _ in range(30):
        history.append(em.epoch(trainer)["L"])
        if em.converged:
            break
    with torch.no_grad():
        acc = ((model(x) > 0).long() == y).float().mean()
    assert acc >= 0.9, (float(acc), history)
    assert history[-1] > history[0]


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


def test_e_step_returns_mean_log_likelihood(gen):
    logits = torch.randn(20, generator=gen)
    offsets = mlellp_ext.offsets_from_sizes([5, 7, 8])
    counts = torch.tensor([1, 3, 8])
    phi, L = e_step(logits, offsets, counts)
    ref_phi, ll = mlellp_ext.posterior(logits, offsets, counts)
    torch.testing.assert_close(phi, ref_phi)
    assert abs(L - float(ll.mean())) < 1e-6


def test_stopping_rule_waits_for_min_epochs(gen):
    x, y, offsets, counts = synthetic(gen, num_bags=40)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Flatten(0))
    trainer = fake_trainer(x, offsets, counts, model)
    em = EM(trainer, estep="recorded", tol=1e9, min_epochs=3)  # any change counts as converged
    epochs = 0
    while not em.converged:
        em.epoch(trainer)
        epochs += 1
    assert epochs == 3
    restored = EM(trainer, estep="recorded", tol=1e9, min_epochs=3)
    restored.load_state_dict(em.state_dict())
    assert restored.iterations == 3 and restored.converged
