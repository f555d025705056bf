import pytest
import torch

import mlellp_ext

NUM_BAGS = 100_000
MIN_SIZE, MAX_SIZE = 2, 12  # the seed paper's bag sizes
ENUMERATE_BAGS = 2_000  # the enumeration baseline is too slow for all bags


def make_workload(num_bags, device="cpu", dtype=torch.float32, seed=0):
    """num_bags bags of uniform sizes MIN_SIZE..MAX_SIZE, logits ~ N(0, 4), counts uniform in [0, n]."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(MIN_SIZE, MAX_SIZE + 1, (num_bags,), generator=gen)
    logits = torch.randn(int(sizes.sum()), generator=gen) * 2
    counts = torch.minimum((torch.rand(num_bags, generator=gen) * (sizes + 1)).floor().long(), sizes)
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    return logits.to(device=device, dtype=dtype), offsets.to(device), counts.to(device)


@pytest.fixture(scope="session")
def workload():
    return make_workload(NUM_BAGS)
