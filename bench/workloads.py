"""The benchmarks' workload, shared by the pytest benchmarks (through conftest.py) and the
GPU scripts (which import it directly: under the test suite, `conftest` is another module)."""
import torch

import mlellp_ext

MIN_SIZE, MAX_SIZE = 2, 12  # the seed paper's bag sizes


def make_workload(num_bags, device="cpu", dtype=torch.float32, seed=0):
    """num_bags bags of uniform sizes MIN_SIZE..MAX_SIZE, logits ~ N(0, 4), counts uniform in [0, n]."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(MIN_SIZE, MAX_SIZE + 1, (num_bags,), generator=gen)
    logits = torch.randn(int(sizes.sum()), generator=gen) * 2
    counts = torch.minimum((torch.rand(num_bags, generator=gen) * (sizes + 1)).floor().long(), sizes)
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    return logits.to(device=device, dtype=dtype), offsets.to(device), counts.to(device)
