"""Each training method learns: a few epochs on digits (label digit >= 5, bags of 2..12
of which only the counts are seen) must beat the best constant classifier by a margin
that a method whose loss no longer carries the labels' signal cannot reach."""
import pytest
import torch

from mlellp_ext.app.train import TrainConfig, load_data, train

# LLP-GAN is not here yet: on digits it stays at 0.5-0.66 (its CIFAR numbers are in
# docs/experiments/reproduction.md); a test that it learns comes with its fix.
METHODS = ["mle", "mle-direct", "dllp", "supervised"]
CONFIG = dict(dataset="digits", backbone="cnn", width=0.25, epochs=6, batch_size=32, lr=2e-3, tol=0.0, seed=0,
              quiet=True, device="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_method_learns(tmp_path, method):
    torch.set_num_threads(2)
    history = train(TrainConfig(out=str(tmp_path / method), method=method, **CONFIG))
    data = load_data(TrainConfig(out="unused", dataset=CONFIG["dataset"], seed=CONFIG["seed"]))  # the run's split
    y = data.data.y[data.test.index].float()
    constant = float(max(y.mean(), 1 - y.mean()))  # the best a classifier that learnt nothing can do
    accuracy = history[-1]["test_accuracy"]
    assert accuracy >= constant + 0.2, (method, [round(r["test_accuracy"], 3) for r in history], constant)
