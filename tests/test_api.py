"""The Python API: nested tensors, bag_log_likelihood, offsets helpers."""
import pytest
import torch

import mlellp_ext

from conftest import random_bags


def test_offsets_from_sizes():
    assert mlellp_ext.offsets_from_sizes([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert mlellp_ext.offsets_from_sizes(torch.tensor([], dtype=torch.long)).tolist() == [0]
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
