"""Each training method learns: a few epochs on digits (label digit >= 5, bags of 2..12
of which only the counts are seen) must beat the best constant classifier by a margin
that a method whose loss no longer carries the labels' signal cannot reach."""
import pytest
import torch

from mlellp_ext.app.train import TrainConfig, load_data, train

METHODS = ["mle", "mle-direct", "dllp", "supervised", "llpgan"]
# LLP-GAN's real/fake terms at its default weight (0.3, tuned on CIFAR) or the paper's 1
# keep it near chance for the first epochs here: on 8x8 digits its generator matches the
# real images' features within an epoch, and the discriminator's real/fake task takes
# over (docs/experiments/reproduction.md). At 0.1 it learns in these 6 epochs, which is
# what this test is for: that its losses and updates carry the labels' signal.
OPTIONS = {"llpgan": dict(gan_weight=0.1)}
CONFIG = dict(dataset="digits", backbone="cnn", width=0.25, epochs=6, batch_size=32, lr=2e-3, tol=0.0, seed=0,
              quiet=True, device="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_method_learns(tmp_path, method):
    torch.set_num_threads(2)
    history = train(TrainConfig(out=str(tmp_path / method), method=method, **{**CONFIG, **OPTIONS.get(method, {})}))
    data = load_data(TrainConfig(out="unused", dataset=CONFIG["dataset"], seed=CONFIG["seed"]))  # the run's split
    y = data.data.y[data.test.index].float()
    constant = float(max(y.mean(), 1 - y.mean()))  # the best a classifier that learnt nothing can do
    accuracy = history[-1]["test_accuracy"]
    assert accuracy >= constant + 0.2, (method, [round(r["test_accuracy"], 3) for r in history], constant)
