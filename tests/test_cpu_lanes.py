"""The CPU kernel's SIMD lanes (bags of one (n, y) in lock-step) against the
per-bag path: bitwise equal, whatever shares a bag's group or thread."""
import pytest
import torch

import mlellp_ext

from conftest import random_bags

post = torch.ops.mlellp.posterior
DTYPES = [torch.float32, torch.float64]


# MLELLP_CPU_LANES: "1" the widest vectors the CPU has (AVX2 here), "sse" the
# baseline ISA's 16-byte vectors, "0" no lanes (every bag alone).
LANES = ["1", "sse"]


def _alone(monkeypatch, lanes, *args):
    """posterior with every bag run alone."""
    monkeypatch.setenv("MLELLP_CPU_LANES", "0")
    try:
        return post(*args)
    finally:
        monkeypatch.setenv("MLELLP_CPU_LANES", lanes)


def _assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_bitwise_equal_per_bag_path(gen, monkeypatch, dtype, lanes):
    # sizes 0..40 straddle the lane limit (32); 5,000 bags span several
    # windows and give every (n, y) bucket full and partial groups
    logits, offsets, counts = random_bags(gen, 5000, max_size=40, dtype=dtype)
    monkeypatch.setenv("MLELLP_CPU_LANES", lanes)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = _alone(monkeypatch, lanes, logits, offsets, counts)
    _assert_bitwise(phi, ref_phi)
    _assert_bitwise(ll, ref_ll)
    assert torch.isfinite(phi).all() and torch.isfinite(ll).all()


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_that_fail_rerun_alone(gen, monkeypatch, dtype, lanes):
    # extreme logits make the scaled path of some lanes fail (they rerun in
    # log space); NaN and inf logits take the per-bag handling; their group
    # mates are unaffected
    logits, offsets, counts = random_bags(gen, 3000, min_size=2, max_size=12, dtype=dtype)
    picks = torch.randint(0, logits.numel(), (60,), generator=gen)
    logits[picks[:20]] = 1e4
    logits[picks[20:40]] = -1e4
    logits[picks[40:50]] = float("inf")
    logits[picks[50:55]] = -float("inf")
    logits[picks[55:]] = float("nan")
    monkeypatch.setenv("MLELLP_CPU_LANES", lanes)
    phi, ll = post(logits, offsets, counts)
    ref_phi, ref_ll = _alone(monkeypatch, lanes, logits, offsets, counts)
    _assert_bitwise(phi, ref_phi)
    _assert_bitwise(ll, ref_ll)
    # a NaN stays in its bag
    bag_of = torch.repeat_interleave(torch.arange(counts.numel()), offsets.diff())
    nan_bags = bag_of[picks[55:]].unique()
    assert torch.isnan(ll[nan_bags]).all()
    clean = torch.ones(counts.numel(), dtype=torch.bool)
    clean[bag_of[picks].unique()] = False
    assert torch.isfinite(ll[clean]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_of_a_bag_independent_of_the_batch(gen, dtype):
    # the same bags in another order, and each bag alone, give bitwise the
    # same phi and log-likelihood: a bag's lane mates do not matter
    logits, offsets, counts = random_bags(gen, 2500, min_size=1, max_size=12, dtype=dtype)
    phi, ll = post(logits, offsets, counts)
    perm = torch.randperm(counts.numel(), generator=gen)
    sizes = offsets.diff()
    pieces = [logits[offsets[b]:offsets[b + 1]] for b in perm.tolist()]
    p_phi, p_ll = post(torch.cat(pieces), mlellp_ext.offsets_from_sizes(sizes[perm]), counts[perm])
    _assert_bitwise(p_ll, ll[perm])
    _assert_bitwise(torch.cat([phi[offsets[b]:offsets[b + 1]] for b in perm.tolist()]), p_phi)
    for b in torch.randint(0, counts.numel(), (20,), generator=gen).tolist():
        s, e = int(offsets[b]), int(offsets[b + 1])
        one_phi, one_ll = post(logits[s:e], torch.tensor([0, e - s]), counts[b:b + 1])
        _assert_bitwise(one_phi, phi[s:e])
        _assert_bitwise(one_ll, ll[b:b + 1])


def test_threads_do_not_change_results(gen):
    logits, offsets, counts = random_bags(gen, 20000, max_size=40, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = post(logits, offsets, counts)
        torch.set_num_threads(max(2, threads))
        many = post(logits, offsets, counts)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(one[0], many[0])
    _assert_bitwise(one[1], many[1])
