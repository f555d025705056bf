"""BatchAugment draws what the per-image torchvision pipeline draws (statistics over
many draws); the op it calls is checked against torchvision in test_augment_images.py."""
import pytest
import torch
from torchvision.transforms import v2

from mlellp_ext.app import augment as A


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_statistics_match_the_per_image_pipeline(dtype):
    """One image augmented 3,000 times each way: the mean and spread of every pixel
    agree (the per-image pipeline works on uint8, so to within rounding)."""
    torch.manual_seed(1)
    img = torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8)
    pipe = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
                       v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)])
    reps = 3000
    theirs = torch.stack([pipe(img) for _ in range(reps)]).float() / 255
    batch = img.expand(reps, -1, -1, -1).contiguous()
    ours = A.BatchAugment()(batch if dtype == torch.uint8 else batch.float().div(255))
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape and 0 <= float(ours.min()) and float(ours.max()) <= 1
    # Per-pixel means and standard deviations over the draws, and the image-level
    # distributions of flips (left/right asymmetry) and of brightness.
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.02
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.02
    asym = lambda t: (t[..., :5] - t[..., 5:].flip(-1)).mean((1, 2, 3))  # noqa: E731
    assert abs(float((asym(ours) > 0).float().mean() - (asym(theirs) > 0).float().mean())) < 0.04
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert (torch.quantile(ours.mean((1, 2, 3)), q) - torch.quantile(theirs.mean((1, 2, 3)), q)).abs().max() < 0.01
    # Contrast (spread of each draw's grey levels) and saturation (each draw's mean
    # channel range): quantiles within 0.11 of their spread over the draws (about
    # 0.07 here; a contrast or saturation range of 0.3 instead of 0.2 gives 0.12-0.2).
    gray = lambda t: 0.2989 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    for stat in (lambda t: gray(t).std((1, 2)), lambda t: (t.amax(1) - t.amin(1)).mean((1, 2))):
        a, b = stat(ours), stat(theirs)
        assert (torch.quantile(a, q) - torch.quantile(b, q)).abs().max() < 0.11 * b.std()


def test_draws_come_from_the_global_generator():
    x = torch.rand(5, 3, 8, 8)
    torch.manual_seed(3)
    a = A.BatchAugment()(x)
    torch.manual_seed(3)
    assert torch.equal(A.BatchAugment()(x), a)


def test_training_with_batched_augmentation_resumes_exactly(tmp_path):
    """RGB data: the trainer augments with BatchAugment, whose draws come from the
    checkpointed global generator, so a resumed run equals an uninterrupted one."""
    import numpy as np

    from mlellp_ext.app.train import TrainConfig, train

    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    np.savez(data, x=rng.integers(0, 256, (160, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 2, 160))
    cfg = dict(dataset="npz", data_root=str(data), width=0.25, epochs=3, batch_size=32, tol=0.0, quiet=True,
               device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = str(tmp_path / "part")
    train(TrainConfig(out=part, **cfg), stop_after_epochs=1)
    resumed = train(TrainConfig(out=part, resume=True, **cfg))
    assert [r["L"] for r in resumed] == [r["L"] for r in full]
    no_aug = train(TrainConfig(out=str(tmp_path / "plain"), augment=False, **cfg))
    assert [r["L"] for r in no_aug] != [r["L"] for r in full]  # augmentation did run
