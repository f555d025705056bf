import atexit
import os
import shutil
import tempfile
import zlib

# torch.compile's on-disk caches key a compiled backward by its graph and torch, not by
# the Python autograd code of these ops: a cache from an older checkout would replay its
# backward. Each test session compiles afresh.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlellp-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import mlellp_ext  # noqa: F401  (loads the ops)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine"))]

CIFAR_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_bird_cat_train.npz")


def random_bags(gen, num_bags, min_size=0, max_size=12, scale=3.0, dtype=torch.float64, device="cpu"):
    """Random ragged bags: sizes uniform in [min_size, max_size], logits ~ N(0, scale^2)
    with a few larger ones mixed in, counts uniform in [0, n_b]."""
    sizes = torch.randint(min_size, max_size + 1, (num_bags,), generator=gen)
    n = int(sizes.sum())
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    wide = torch.rand(n, generator=gen) < 0.05
    logits[wide] *= 6
    counts = (torch.rand(num_bags, generator=gen, dtype=torch.float64) * (sizes + 1)).floor().long()
    counts = torch.minimum(counts, sizes)
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    return logits.to(dtype=dtype, device=device), offsets.to(device), counts.to(device)


@pytest.fixture
def gen(request):
    # A fresh seed per test, stable across runs, so failures reproduce.
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_addoption(parser):
    parser.addoption("--properties-long", action="store_true", default=False,
                     help="test_properties.py: 20 times the seeded cases (before a release)")
