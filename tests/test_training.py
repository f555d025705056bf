"""Training driver and CLI on the bundled digits data: every method, files, resume."""
import csv
import json
import os
import re

import pytest
import torch

from mlellp_ext.app import cli
from mlellp_ext.app.train import METRIC_COLUMNS, TrainConfig, lr_factor, train

SMALL = dict(dataset="digits", backbone="cnn", width=0.25, num_bags=60, epochs=2, batch_size=64, quiet=True)


@pytest.mark.parametrize("method", ["mle", "mle-direct", "dllp", "supervised"])
def test_every_method_trains_and_writes_files(tmp_path, method):
    out = tmp_path / method
    history = train(TrainConfig(out=str(out), method=method, **SMALL))
    assert 1 <= len(history) <= 2
    for name in ("config.json", "metrics.csv", "model.pt", "checkpoint.pt", "curves.png"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0].keys()) == list(METRIC_COLUMNS) and len(rows) == len(history)
    assert 0 <= float(rows[-1]["test_accuracy"]) <= 1
    assert (rows[-1]["e_step_seconds"] != "") == (method == "mle")
    torch.load(out / "checkpoint.pt", weights_only=True)
    torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("estep,schedule", [("fresh", "constant"), ("recorded", "constant"), ("fresh", "cosine")])
def test_resume_equals_uninterrupted(tmp_path, estep, schedule):
    # Bitwise equality is promised on CPU: cuDNN's convolution backward is not deterministic.
    cfg = dict(SMALL, epochs=3, method="mle", estep=estep, tol=0.0, lr_schedule=schedule, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = str(tmp_path / "part")
    train(TrainConfig(out=part, **cfg), stop_after_epochs=1)
    assert not os.path.exists(os.path.join(part, "model.pt"))
    resumed = train(TrainConfig(out=part, resume=True, **cfg))
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(os.path.join(part, "model.pt"), weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["L"] for r in resumed] == [r["L"] for r in full]
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in full]


def test_resume_refuses_other_options(tmp_path):
    """A resumed run with another seed would draw other bags and apply the saved targets
    phi to other instances without a word; only the run length and display may change."""
    from mlellp_ext.app.data import DataError

    cfg = dict(SMALL, epochs=2, method="mle", tol=0.0)
    out = str(tmp_path / "run")
    train(TrainConfig(out=out, **cfg), stop_after_epochs=1)
    for change, message in ((dict(seed=1), "--seed 0 (this run: 1)"),
                            (dict(width=0.5), "--width 0.25 (this run: 0.5)"),
                            (dict(augment=False, lr=2e-3), "--lr 0.001 (this run: 0.002); augmentation (this run: "
                                                           "--no-augment)"),
                            (dict(bag_size="3:5"), "--bag-size '2:12' (this run: '3:5')")):
        with pytest.raises(DataError, match=re.escape("--resume: the checkpoint was written with " + message)):
            train(TrainConfig(out=out, resume=True, **dict(cfg, **change)))
    # the options left to change: longer, quieter; bag_size "2:12" given is the default it ran with
    history = train(TrainConfig(out=out, resume=True, **dict(cfg, epochs=3, tol=1e-3, min_epochs=5, bag_size="2:12")))
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(out=str(tmp_path), resume=True, **SMALL))


def test_cli_train_evaluate_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--num-bags", "40", "--epochs", "1", "--width", "0.25",
                     "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "auc", "n_instances", "bag_mae"} <= set(metrics) and metrics["n_instances"] > 0
    pred = tmp_path / "pred.csv"
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--out", str(pred), "--split", "all"]) == 0
    rows = list(csv.DictReader(open(pred)))
    bag_rows = list(csv.DictReader(open(tmp_path / "pred_bags.csv")))
    assert {"instance", "bag", "probability", "label"} <= set(rows[0]) and len(rows) > metrics["n_instances"]
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    assert sum(int(r["size"]) for r in bag_rows) == len(rows)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "nope", "--out", str(tmp_path)])
    assert cli.main(["train", "--dataset", "npz", "--data-root", str(tmp_path / "missing.npz"),
                     "--out", str(tmp_path), "--quiet"]) == 2
    assert "missing.npz" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--dataset", "npz", "--data-root", "{tmp}/missing.npz"], "missing.npz"),
    (["--dataset", "digits", "--resume"], "--resume: no checkpoint at {out}"),
])
def test_cli_failed_load_leaves_no_out_folder(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["train", *args, "--num-bags", "20", "--out", str(out), "--quiet"]) == 2
    assert message.format(out=out) in capsys.readouterr().err
    assert not out.exists()


def unlabelled_manifest(tmp_path, bags=6):
    """A manifest of random 8x6 images in `bags` bags of 3, without instance labels."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    (tmp_path / "img").mkdir()
    rows, counts = ["path,bag"], ["bag,count"]
    for b in range(bags):
        for i in range(3):
            pixels = torch.randint(0, 256, (6, 8, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "img" / f"{b}-{i}.png")
            rows.append(f"img/{b}-{i}.png,g{b}")
        counts.append(f"g{b},{b % 4}")
    (tmp_path / "inst.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "counts.csv").write_text("\n".join(counts) + "\n")
    return ["--dataset", "manifest", "--data-root", str(tmp_path / "inst.csv"),
            "--counts-file", str(tmp_path / "counts.csv")]


@pytest.mark.parametrize("args, message", [
    (["--weights", "w.pt"], "--weights applies to --backbone resnet18 only, got --backbone cnn"),
    (["--backbone", "resnet18", "--weights", "{tmp}/missing.pt"], "--weights {tmp}/missing.pt: no such file"),
    (["--method", "llpgan", "--backbone", "resnet18"], "--method llpgan uses --backbone cnn"),
])
def test_cli_rejects_backbone_and_method_combinations(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["train", "--dataset", "digits", *args, "--out", str(out), "--quiet"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not out.exists()


def test_cli_without_instance_labels(tmp_path, capsys):
    data = unlabelled_manifest(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", *data, "--method", "supervised", "--out", str(out), "--quiet"]) == 2
    assert "--method supervised needs instance labels" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["train", *data, "--epochs", "1", "--width", "0.25", "--test-fraction", "0.5",
                     "--out", str(out), "--quiet"]) == 0
    assert json.load(open(out / "config.json"))["bag_size"] is None  # given bags: no sizes stored
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    text = capsys.readouterr().out
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert metrics["accuracy"] is None and metrics["auc"] is None and metrics["n_bags"] == 3
    assert metrics["bag_mae"] >= 0
    # A model whose config holds the old defaults (bag_size 2:12) still evaluates on its given bags.
    payload = torch.load(out / "model.pt", weights_only=True)
    payload["config"]["bag_size"] = "2:12"
    torch.save(payload, out / "model.pt")
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["n_bags"] == 3


def test_cli_test_root_takes_no_test_fraction(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in (("train.npz", 40), ("test.npz", 20)):
        np.savez(tmp_path / name, x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), y=np.arange(n) % 2)
    data = ["--dataset", "npz", "--data-root", str(tmp_path / "train.npz"), "--test-root", str(tmp_path / "test.npz"),
            "--bag-size", "4:4"]
    out = tmp_path / "run"
    assert cli.main(["train", *data, "--test-fraction", "0.2", "--out", str(out), "--quiet"]) == 2
    assert "--test-fraction 0.2 does not apply with --test-root" in capsys.readouterr().err
    assert cli.main(["train", *data, "--epochs", "1", "--width", "0.25", "--out", str(out), "--quiet"]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    payload["config"]["test_fraction"] = 0.2  # as configs stored the old default
    torch.save(payload, out / "model.pt")
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["n_bags"] == 5  # all of test.npz's bags


def test_cli_out_must_be_a_folder(tmp_path, capsys):
    out = tmp_path / "run.txt"
    out.write_text("keep me")
    assert cli.main(["train", "--dataset", "digits", "--out", str(out), "--quiet"]) == 2
    assert f"--out {out} exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--batch-size", "-4", "--batch-size must be at least 1, got -4"),
    ("--lr", "-0.1", "--lr must be a positive number, got -0.1"),
    ("--lr", "nan", "--lr must be a positive number, got nan"),
    ("--width", "0", "--width must be a positive number, got 0.0"),
    ("--weight-decay", "-1", "--weight-decay must be a non-negative number, got -1.0"),
    ("--tol", "inf", "--tol must be a non-negative number, got inf"),
    ("--min-epochs", "-1", "--min-epochs must be non-negative, got -1"),
    ("--gan-weight", "-0.5", "--gan-weight must be a non-negative number, got -0.5"),
    ("--gan-weight", "nan", "--gan-weight must be a non-negative number, got nan"),
])
def test_cli_rejects_out_of_range_options(tmp_path, capsys, option, value, message):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", option, value, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # rejected before any work


def test_cli_evaluate_errors(tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "--model" in capsys.readouterr().err
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--num-bags", "20", "--epochs", "1", "--width", "0.25",
                     "--out", str(out), "--quiet"]) == 0
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--batch-size", "0",
                     "--out", str(tmp_path / "p.csv")]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--out", str(out)]) == 2
    assert f"--out {out}: {out} is a folder" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--out", str(tmp_path / "nowhere" / "p.csv")]) == 2
    assert "No such file or directory" in capsys.readouterr().err  # a clean error, not a traceback


@pytest.mark.parametrize("method", ["mle", "llpgan"])
def test_cosine_schedule_sets_every_optimiser(tmp_path, monkeypatch, method):
    import mlellp_ext.app.train as train_module

    seen = []
    original = train_module.Trainer.checkpoint_state

    def spy(trainer, epoch, history):  # the learning rates the epoch ran with
        opts = [trainer.optimizer] + ([trainer.method.g_optimizer] if method == "llpgan" else [])
        seen.append([g["lr"] for o in opts for g in o.param_groups])
        return original(trainer, epoch, history)

    monkeypatch.setattr(train_module.Trainer, "checkpoint_state", spy)
    cfg = dict(SMALL, epochs=4, method=method, tol=0.0, lr=2e-3, lr_schedule="cosine")
    if method == "llpgan":
        cfg["width"] = 0.125
    history = train(TrainConfig(out=str(tmp_path / method), **cfg))
    want = [2e-3 * lr_factor("cosine", e, 4) for e in range(4)]
    assert [r["lr"] for r in history] == pytest.approx(want)
    assert want[0] == pytest.approx(2e-3) and want[1] < want[0] and want[3] < want[2] < want[1]
    for lrs, w in zip(seen, want):
        assert lrs == pytest.approx([w] * len(lrs))
    assert len(seen[0]) == (2 if method == "llpgan" else 1)


def test_unknown_lr_schedule_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--lr-schedule must be one of constant, cosine, got 'step'"):
        train(TrainConfig(out=str(tmp_path / "x"), lr_schedule="step", **SMALL))


def test_cli_evaluate_and_predict_score_another_file_whole(tmp_path, capsys):
    """A model trained on train.npz with --num-bags, scored on a smaller test.npz: every
    instance of test.npz, bags drawn from all of it with the model's bag sizes; nothing of
    the training run's --num-bags or split carries over."""
    import numpy as np

    rng = np.random.default_rng(1)
    for name, n in (("train.npz", 300), ("test.npz", 70)):
        np.savez(tmp_path / name, x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), y=rng.integers(0, 2, n))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "npz", "--data-root", str(tmp_path / "train.npz"), "--num-bags", "50",
                     "--bag-size", "2:6", "--epochs", "1", "--width", "0.25", "--out", str(out), "--quiet"]) == 0
    model = str(out / "model.pt")
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", model]) == 0  # its own data: the test split of its 50 bags
    own = json.loads(capsys.readouterr().out)
    assert own["n_bags"] == 10 and own["split"] == "test" and own["data"] == "the model's"
    test_file = ["--data-root", str(tmp_path / "test.npz")]
    assert cli.main(["evaluate", "--model", model, *test_file]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["n_instances"] == 70 and other["split"] == "all" and other["data"] == "other"
    assert 70 - 5 <= other["n_bag_instances"] <= 70 and other["n_bags"] >= 70 // 6
    assert other["accuracy"] is not None and other["bag_mae"] is not None
    pred = tmp_path / "p.csv"
    assert cli.main(["predict", "--model", model, *test_file, "--out", str(pred)]) == 0
    rows = list(csv.DictReader(open(pred)))
    assert sorted(int(r["instance"]) for r in rows) == list(range(70))
    bag_rows = list(csv.DictReader(open(tmp_path / "p_bags.csv")))
    assert len(bag_rows) == other["n_bags"]
    assert sum(r["bag"] != "" for r in rows) == other["n_bag_instances"]
    for extra, message in ((["--split", "test"], "--split test applies to the model's own data"),
                           (["--test-fraction", "0.5"], "--test-root and --test-fraction apply to the model's own")):
        assert cli.main(["evaluate", "--model", model, *test_file, *extra]) == 2
        assert message in capsys.readouterr().err


def test_cli_evaluate_another_manifest_needs_its_own_counts(tmp_path, capsys):
    # The training run's counts file belongs to its own instances: another manifest
    # without --counts-file is refused rather than scored with those counts.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = unlabelled_manifest(tmp_path / "a", bags=6)
    other = unlabelled_manifest(tmp_path / "b", bags=4)
    out = tmp_path / "run"
    assert cli.main(["train", *data, "--epochs", "1", "--width", "0.25", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt"), "--data-root", other[3]]) == 2
    assert "counts" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(out / "model.pt"), *other[2:]]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_bags"] == 4 and metrics["n_instances"] == 12 and metrics["data"] == "other"
