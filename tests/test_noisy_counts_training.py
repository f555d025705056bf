"""Counts you cannot fully trust, in the application: manifest intervals and noisy
counts (--count-noise), --privatize-counts with the matched noise model or ignored,
and their errors."""
import math

import pytest
import torch

from mlellp_ext import count_weights as cw
from mlellp_ext.app import cli
from mlellp_ext.app.data import DataError, load_dataset
from mlellp_ext.app.train import TrainConfig, load_data, observed_training_bags, train

from test_data import GOOD_INSTANCES, write_manifest

SMALL = dict(dataset="digits", backbone="cnn", width=0.25, num_bags=60, epochs=2, batch_size=64, quiet=True,
             device="cpu")


def test_manifest_interval_counts(tmp_path):
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES, "bag,count_lo,count_hi\nb1,0,2\nb2,1,1\nb3,0,1\n")
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0)
    sizes = ds.train.offsets.diff()
    assert ds.train.counts.tolist() == [1, 1, 0]  # midpoints, rounded down
    assert torch.equal(ds.train.count_log_weights,
                       cw.interval(torch.tensor([0, 1, 0]), torch.tensor([2, 1, 1]), sizes))


def test_manifest_noisy_counts(tmp_path):
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES, "bag,count\nb1,-1\nb2,3\nb3,0\n")
    with pytest.raises(DataError, match="count -1 for bag 'b1' is negative"):
        load_dataset("manifest", data_root=inst, counts_file=counts)
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, count_noise="laplace:2", test_fraction=0.0)
    sizes = ds.train.offsets.diff()
    assert ds.train.counts.tolist() == [0, 2, 0]  # clipped to 0..n
    assert torch.equal(ds.train.count_log_weights, cw.laplace(torch.tensor([-1.0, 3.0, 0.0]), 2.0, sizes))
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES, "bag,count\nb1,0.4\nb2,1.5\nb3,-0.2\n")
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, count_noise="gaussian:0.5", test_fraction=0.0)
    assert torch.equal(ds.train.count_log_weights,
                       cw.gaussian(torch.tensor([0.4, 1.5, -0.2], dtype=torch.float64), 0.5, ds.train.offsets.diff()))


@pytest.mark.parametrize("counts, noise, match", [
    ("bag,count_lo,count_hi\nb1,2,1\nb2,1,1\nb3,0,1\n", None, "count_lo 2 for bag 'b1' is larger than its count_hi 1"),
    ("bag,count_lo\nb1,1\n", None, "an interval of counts needs the header bag,count_lo,count_hi"),
    ("bag,count_lo,count_hi\nb1,0,3\nb2,1,1\nb3,0,1\n", None, "count_hi 3 for bag 'b1' is larger than its 2"),
    ("bag,count\nb1,1.5\nb2,1\nb3,0\n", "laplace:1", r"count '1.5' for bag 'b1' is not an integer \(--count-noise"),
    ("bag,count_lo,count_hi\nb1,0,1\nb2,1,1\nb3,0,1\n", "laplace:1", "--count-noise applies to a counts CSV bag,count"),
    ("bag,count\nb1,1\nb2,1\nb3,0\n", "laplace:-1", "--count-noise must be laplace:SCALE or gaussian:SIGMA"),
    ("bag,count\nb1,1\nb2,1\nb3,0\n", "poisson:1", "--count-noise must be laplace:SCALE or gaussian:SIGMA"),
])
def test_noisy_count_errors(tmp_path, counts, noise, match):
    inst, cnt = write_manifest(tmp_path, GOOD_INSTANCES, counts)
    with pytest.raises(DataError, match=match):
        load_dataset("manifest", data_root=inst, counts_file=cnt, count_noise=noise)


def test_privatized_training_counts():
    cfg = TrainConfig(out="unused", privatize_counts=0.5, **SMALL)
    dataset = load_data(cfg)
    a, b = observed_training_bags(cfg, dataset), observed_training_bags(cfg, dataset)
    assert torch.equal(a.counts, b.counts)  # seeded by --seed
    sizes = a.offsets.diff()
    assert not torch.equal(a.counts, dataset.train.counts)  # noise at epsilon 0.5
    assert bool((a.counts >= 0).all() and (a.counts <= sizes).all())
    # The weights are the discrete Laplace likelihood of the released counts, whose
    # clipped values are the point counts.
    released = cw.privatize(dataset.train.counts, 0.5, generator=torch.Generator().manual_seed(cfg.seed + 104729))
    assert torch.equal(a.count_log_weights, cw.laplace(released.double(), 2.0, sizes))
    assert torch.equal(a.counts, torch.minimum(released.clamp(min=0), sizes))
    ignored = observed_training_bags(TrainConfig(out="unused", privatize_counts=0.5, count_noise_model="ignore",
                                                 **SMALL), dataset)
    assert ignored.count_log_weights is None and torch.equal(ignored.counts, a.counts)
    exact = observed_training_bags(TrainConfig(out="unused", privatize_counts=math.inf, **SMALL), dataset)
    assert exact.count_log_weights is None and torch.equal(exact.counts, dataset.train.counts)
    # test bags keep their true counts
    assert torch.equal(load_data(cfg).test.counts, dataset.test.counts)


@pytest.mark.parametrize("method", ["mle", "mle-direct", "dllp"])
def test_training_with_privatized_counts(tmp_path, method):
    matched = train(TrainConfig(out=str(tmp_path / "m"), method=method, privatize_counts=1.0, **SMALL))
    ignored = train(TrainConfig(out=str(tmp_path / "i"), method=method, privatize_counts=1.0,
                                count_noise_model="ignore", **SMALL))
    assert all(math.isfinite(r["L"]) for r in matched + ignored)
    if method != "dllp":  # dllp takes the clipped counts either way; EM's targets differ
        assert [r["L"] for r in matched] != [r["L"] for r in ignored]
    else:
        assert [r["train_loss"] for r in matched] == [r["train_loss"] for r in ignored]


def test_option_errors(tmp_path, capsys):
    base = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]
    assert cli.main(base + ["--privatize-counts", "0"]) == 2
    assert "--privatize-counts must be a positive epsilon" in capsys.readouterr().err
    assert cli.main(base + ["--classes", "all", "--privatize-counts", "1"]) == 2
    assert "supported for two classes only" in capsys.readouterr().err
    assert cli.main(base + ["--count-noise", "laplace:1"]) == 2
    assert "--count-noise laplace:1 does not apply to --dataset digits" in capsys.readouterr().err


def test_privatizing_interval_counts_is_an_error(tmp_path):
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES, "bag,count_lo,count_hi\nb1,0,2\nb2,1,1\nb3,0,1\n")
    with pytest.raises(DataError, match="--privatize-counts adds noise to exact counts; these counts are intervals"):
        train(TrainConfig(out=str(tmp_path / "r"), dataset="manifest", data_root=inst, counts_file=counts,
                          privatize_counts=1.0, epochs=1, quiet=True, width=0.25))


def test_resume_compares_options_a_checkpoint_predates(tmp_path):
    """A checkpoint written before --privatize-counts existed ran without it: resuming with it is refused."""
    import json

    cfg = dict(SMALL, epochs=2, method="mle", tol=0.0)
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), **cfg), stop_after_epochs=1)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("privatize_counts", "count_noise_model", "count_noise"):
        state["config"].pop(key)
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(DataError, match=r"--privatize-counts None \(this run: 1.0\)"):
        train(TrainConfig(out=str(out), resume=True, privatize_counts=1.0, **cfg))
    assert len(train(TrainConfig(out=str(out), resume=True, **cfg))) == 2
    json.dumps(state["config"])  # still a plain config
