"""The library layer beside the ops: dllp_loss and BagBatchSampler (EMTargets: test_em.py)."""
import pytest
import torch

import mlellp_ext
from mlellp_ext import BagBatchSampler, dllp_loss


def layout(gen, num_bags=25, min_size=0, max_size=9):
    sizes = torch.randint(min_size, max_size + 1, (num_bags,), generator=gen)
    counts = (torch.rand(num_bags, generator=gen) * (sizes + 1)).floor().long().minimum(sizes)
    counts[0], sizes[0] = 0, max(int(sizes[0]), 1)  # a proportion 0 and (below) 1 for sure
    counts[1] = sizes[1]
    return mlellp_ext.offsets_from_sizes(sizes), counts


def dllp_reference(z, offsets, counts):
    """The textbook DLLP bag loss in float64: BCE(y/n, mean sigmoid), 0 for empty bags."""
    out = []
    for b in range(counts.numel()):
        zb = z[offsets[b]:offsets[b + 1]].double()
        if zb.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        q, p = torch.sigmoid(zb).mean(), counts[b].double() / zb.numel()
        terms = []
        if p > 0:
            terms.append(p * q.log())
        if p < 1:
            terms.append((1 - p) * (1 - q).log())
        out.append(-sum(terms))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dllp_loss_equals_reference(gen, dtype):
    offsets, counts = layout(gen)
    z = (torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64) * 4).to(dtype)
    want = dllp_reference(z, offsets, counts)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    got = dllp_loss(z, offsets, counts, reduction="none")
    assert got.dtype == dtype and got.shape == counts.shape
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(dllp_loss(z, offsets, counts).double(), want.mean(), **tol)
    torch.testing.assert_close(dllp_loss(z, offsets, counts, reduction="sum").double(), want.sum(), **tol)


def test_dllp_loss_gradcheck_and_extremes(gen):
    offsets, counts = layout(gen, num_bags=8, min_size=1, max_size=5)
    z = torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dllp_loss(t, offsets, counts, reduction="none"), (z,))
    # Far from 0 the textbook form rounds q to 0 or 1 (log 0); the log-space form stays finite.
    big = (torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float32) * 60).requires_grad_()
    loss = dllp_loss(big, offsets, counts)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    ref = dllp_reference(big.detach().double(), offsets, counts)
    if torch.isfinite(ref).all():
        torch.testing.assert_close(loss.double(), ref.mean(), rtol=1e-4, atol=1e-4)


def test_dllp_loss_nested_and_learning_signal(gen):
    offsets, counts = layout(gen, num_bags=6, min_size=1)
    z = torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64)
    nested = torch.nested.nested_tensor_from_jagged(z, offsets)
    torch.testing.assert_close(dllp_loss(nested, counts), dllp_loss(z, offsets, counts))
    # Its minimum over a bag's common logit is at the bag's proportion.
    off = mlellp_ext.offsets_from_sizes([4])
    t = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([t], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = dllp_loss(t, off, torch.tensor([1]))
        loss.backward()
        return loss
    opt.step(closure)
    assert float(torch.sigmoid(t.detach()).mean()) == pytest.approx(0.25, abs=1e-5)


def test_dllp_loss_errors():
    off = mlellp_ext.offsets_from_sizes([3, 2])
    z = torch.zeros(5)
    with pytest.raises(ValueError, match=r"dllp_loss: counts\[1\] = 3 is outside \[0, n_b\] = \[0, 2\] for bag 1"):
        dllp_loss(z, off, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=r"dllp_loss: offsets\[-1\] must equal len\(logits\) = 4"):
        dllp_loss(z[:4], off, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="dllp_loss: counts must be int64, got Float"):
        dllp_loss(z, off, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="dllp_loss: reduction must be one of"):
        dllp_loss(z, off, torch.tensor([1, 1]), reduction="avg")
    with pytest.raises(ValueError, match="dllp_loss: counts is required, got None"):
        dllp_loss(z, off)
    with pytest.raises(ValueError, match="dllp_loss: offsets must be non-decreasing"):
        dllp_loss(z, torch.tensor([0, 4, 3, 5]), torch.tensor([1, 0, 1]))


# ---- BagBatchSampler

@pytest.mark.parametrize("batch_size", [1, 7, 30, 1000])
def test_sampler_whole_bags_each_instance_once(gen, batch_size):
    offsets, counts = layout(gen, num_bags=40)
    sampler = BagBatchSampler(offsets, batch_size, generator=gen)
    sizes = offsets.diff()
    for _ in range(2):  # two epochs
        n_batches = len(sampler)
        batches = list(sampler)
        assert len(batches) == n_batches
        seen = torch.tensor([p for b in batches for p in b], dtype=torch.long)
        assert torch.equal(seen.sort().values, torch.arange(int(offsets[-1])))  # every instance once
        for i, batch in enumerate(batches):
            local_offsets, local_counts = sampler.bag_layout(torch.tensor(batch), counts)
            n = local_offsets.diff()
            assert (n > 0).all() and int(n.sum()) == len(batch)
            assert int(n.sum()) >= batch_size or i == len(batches) - 1  # closes once full ...
            assert int(n[:-1].sum()) < batch_size  # ... and not before
            bags = torch.unique_consecutive(torch.bucketize(torch.tensor(batch), offsets[1:], right=True))
            assert torch.equal(local_counts, counts[bags]) and torch.equal(n, sizes[bags])


def test_sampler_order_and_seed(gen):
    offsets, counts = layout(gen, num_bags=20, min_size=1)
    plain = list(BagBatchSampler(offsets, 5, shuffle=False))
    assert [p for b in plain for p in b] == list(range(int(offsets[-1])))
    a = list(BagBatchSampler(offsets, 5, generator=torch.Generator().manual_seed(3)))
    b = list(BagBatchSampler(offsets, 5, generator=torch.Generator().manual_seed(3)))
    c = list(BagBatchSampler(offsets, 5, generator=torch.Generator().manual_seed(4)))
    assert a == b and a != c


def test_sampler_in_a_dataloader(gen):
    offsets, counts = layout(gen, num_bags=30)
    x = torch.randn(int(offsets[-1]), 3)
    dataset = torch.utils.data.TensorDataset(x, torch.arange(x.shape[0]))
    sampler = BagBatchSampler(offsets, 16, generator=gen)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    total = 0
    for xb, positions in loader:
        local_offsets, local_counts = sampler.bag_layout(positions, counts)
        assert torch.equal(xb, x[positions])
        z = torch.randn(xb.shape[0], requires_grad=True)
        dllp_loss(z, local_offsets, local_counts).backward()
        total += positions.numel()
    assert total == x.shape[0]


def test_sampler_errors():
    off = mlellp_ext.offsets_from_sizes([3, 2])
    with pytest.raises(ValueError, match="BagBatchSampler: offsets must be a 1-D int64 tensor"):
        BagBatchSampler(off.float(), 4)
    with pytest.raises(ValueError, match="BagBatchSampler: offsets must be non-decreasing"):
        BagBatchSampler(torch.tensor([0, 3, 2]), 4)
    with pytest.raises(ValueError, match="BagBatchSampler: offsets\\[0\\] must be 0, got 1"):
        BagBatchSampler(torch.tensor([1, 3]), 4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            BagBatchSampler(off, bad)
    sampler = BagBatchSampler(off, 4, shuffle=False)
    with pytest.raises(ValueError, match="positions must hold whole bags"):
        sampler.bag_layout(torch.tensor([0, 1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="positions must hold whole bags"):
        sampler.bag_layout(torch.tensor([0, 3, 1, 2, 4]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="positions must hold whole bags"):
        sampler.bag_layout(torch.tensor([0, 0, 0]), torch.tensor([1, 1]))  # as many positions as bag 0 has
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
        sampler.bag_layout(torch.tensor([3, 4, 5]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"counts must have shape \[2\]"):
        sampler.bag_layout(torch.tensor([3, 4]), torch.tensor([1]))


def test_dllp_loss_multiclass_is_the_proportion_cross_entropy(gen):
    """(N, C) logits with count vectors: -sum_c p_bc log(mean softmax), the textbook form;
    C = 2 equals the binary loss of z1 - z0."""
    sizes = torch.tensor([3, 0, 5, 1])
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    counts = torch.tensor([[1, 2, 0], [0, 0, 0], [2, 2, 1], [0, 0, 1]])
    z = torch.randn(9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    got = dllp_loss(z, offsets, counts, reduction="none")
    want = []
    for b in range(4):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if e == s:
            want.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        q = torch.softmax(z[s:e], 1).mean(0)
        p = counts[b].double() / (e - s)
        want.append(-(p[p > 0] * q[p > 0].log()).sum())
    torch.testing.assert_close(got, torch.stack(want))
    assert torch.autograd.gradcheck(lambda t: dllp_loss(t, offsets, counts), (z,))
    assert torch.isfinite(dllp_loss(z.detach() * 1e4, offsets, counts))
    two = torch.stack([sizes - counts[:, 2], counts[:, 2]], 1)
    torch.testing.assert_close(dllp_loss(z[:, :2], offsets, two), dllp_loss(z[:, 1] - z[:, 0], offsets, two[:, 1]))
    with pytest.raises(ValueError, match=r"dllp_loss: counts\[0\] = \[1, 1, 0\] sums to 2 but bag 0 has 3"):
        dllp_loss(z, offsets, counts - torch.tensor([0, 1, 0]) * (torch.arange(4) == 0).long().unsqueeze(1))
