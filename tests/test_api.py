"""The Python API: nested tensors, bag_log_likelihood, offsets helpers."""
import pytest
import torch

import mlellp_ext

from conftest import random_bags


def test_offsets_from_sizes():
    assert mlellp_ext.offsets_from_sizes([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert mlellp_ext.offsets_from_sizes(torch.tensor([], dtype=torch.long)).tolist() == [0]
    empty = mlellp_ext.offsets_from_sizes([])  # B = 0 from a list (torch would make it float32)
    assert empty.tolist() == [0] and empty.dtype == torch.int64
    off = mlellp_ext.offsets_from_sizes(torch.tensor([4, 1], dtype=torch.int32))
    assert off.dtype == torch.int64
    assert mlellp_ext.sizes_from_offsets(off).tolist() == [4, 1]


def test_nested_jagged_input(gen):
    logits, offsets, counts = random_bags(gen, 20, min_size=1)
    nt = torch.nested.nested_tensor_from_jagged(logits, offsets)
    phi_n, ll_n = mlellp_ext.posterior(nt, counts)
    phi, ll = mlellp_ext.posterior(logits, offsets, counts)
    assert phi_n.is_nested
    torch.testing.assert_close(phi_n.values(), phi)
    torch.testing.assert_close(ll_n, ll)
    pmf_n = mlellp_ext.log_pmf(nt)
    torch.testing.assert_close(pmf_n.values(), mlellp_ext.log_pmf(logits, offsets))
    assert pmf_n.offsets().tolist() == (offsets + torch.arange(21)).tolist()
    # keyword form and gradient through the nested values
    z = logits.clone().requires_grad_(True)
    nt = torch.nested.nested_tensor_from_jagged(z, offsets)
    mlellp_ext.bag_log_likelihood(nt, counts=counts, reduction="sum").backward()
    torch.testing.assert_close(z.grad, phi - torch.sigmoid(logits))
    with pytest.raises(ValueError, match="pass counts only"):
        mlellp_ext.posterior(nt, offsets, counts)
    with pytest.raises(ValueError, match="log_pmf: with nested logits pass no offsets"):
        mlellp_ext.log_pmf(nt, offsets)  # used to be ignored silently
    with pytest.raises(ValueError, match="posterior: counts must be a plain 1-D int64 tensor, got a nested"):
        mlellp_ext.posterior(nt, torch.nested.nested_tensor_from_jagged(counts, offsets_from_counts(counts)))


def offsets_from_counts(counts):
    return mlellp_ext.offsets_from_sizes(torch.ones_like(counts))


def test_nested_with_holes(gen):
    """A jagged view that skips entries (lengths=, as torch.nested.narrow makes): the
    skipped values must not enter any bag, as they did when values() was taken as is."""
    logits, offsets, counts = random_bags(gen, 12, min_size=2)
    sizes = offsets[1:] - offsets[:-1]
    keep = sizes - torch.randint(0, 2, sizes.shape, generator=gen).minimum(sizes)  # drop a bag's last logit or not
    counts = torch.minimum(counts, keep)
    z = logits.clone().requires_grad_(True)
    nt = torch.nested.nested_tensor_from_jagged(z, offsets, lengths=keep)
    phi_n, ll_n = mlellp_ext.posterior(nt, counts)
    kept = torch.cat([logits[int(a):int(a) + int(k)] for a, k in zip(offsets[:-1], keep)])
    phi, ll = mlellp_ext.posterior(kept, mlellp_ext.offsets_from_sizes(keep), counts)
    torch.testing.assert_close(phi_n.values(), phi)
    torch.testing.assert_close(ll_n, ll)
    mlellp_ext.bag_log_likelihood(nt, counts=counts, reduction="sum").backward()
    want = torch.zeros_like(logits)
    for b, (a, k) in enumerate(zip(offsets[:-1].tolist(), keep.tolist())):
        start = int(mlellp_ext.offsets_from_sizes(keep)[b])
        want[a:a + k] = phi[start:start + k] - torch.sigmoid(logits[a:a + k])
    torch.testing.assert_close(z.grad, want)  # skipped logits get no gradient
    assert bool((keep < sizes).any())  # the draw did make holes


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bag_log_likelihood_reductions(gen, reduction):
    logits, offsets, counts = random_bags(gen, 30)
    per_bag = torch.ops.mlellp.posterior(logits, offsets, counts)[1]
    out = mlellp_ext.bag_log_likelihood(logits, offsets, counts, reduction=reduction)
    expect = {"none": per_bag, "mean": per_bag.mean(), "sum": per_bag.sum()}[reduction]
    torch.testing.assert_close(out, expect)


def test_docstring_example():
    out = mlellp_ext.log_pmf(torch.tensor([0.0, 0.0]), mlellp_ext.offsets_from_sizes([2]))
    torch.testing.assert_close(out.exp(), torch.tensor([0.25, 0.5, 0.25]))
