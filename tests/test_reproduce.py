"""`mlellp reproduce`: every experiment end to end on a tiny configuration."""
import csv

import numpy as np
import pytest

from mlellp_ext.app import cli


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    x[y == 1, :, :, 0] = 255  # a learnable cue
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y, classes=np.array(["bird", "cat"]))
    return str(path)


def _columns(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return set(rows[0]), rows


def test_reproduce_all_experiments_tiny(tmp_path, tiny_npz):
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["reproduce", "--data-root", tiny_npz, "--out", str(out), "--work", str(work), "--device", "cpu",
            "--repetitions", "1", "--epochs", "1", "--width", "0.125", "--curves-bags", "12",
            "--bag-counts", "4,6", "--test-bags", "3", "--bags-repetitions", "1", "--bags-epochs", "1"]
    assert cli.main(args) == 0
    for name in ("curves", "bags", "timing"):
        for ext in ("csv", "png", "md"):
            assert (out / f"{name}.{ext}").exists(), f"{name}.{ext}"
    cols, rows = _columns(out / "curves.csv")
    assert {"method", "repetition", "epoch", "test_accuracy", "epoch_seconds"} <= cols
    assert {r["method"] for r in rows} == {"supervised", "dllp", "llpgan", "mle"}
    cols, rows = _columns(out / "bags.csv")
    assert {"method", "train_bags", "test_bags", "test_accuracy"} <= cols
    assert {int(r["train_bags"]) for r in rows} == {4, 6} and {r["test_bags"] for r in rows} == {"3"}
    cols, rows = _columns(out / "timing.csv")
    assert {"method", "epoch_seconds", "e_step_seconds", "m_step_seconds", "inference_seconds",
            "epochs_to_99pct"} <= cols
    by = {r["method"]: r for r in rows}
    assert by["mle"]["e_step_seconds"] != "" and by["dllp"]["e_step_seconds"] == ""
    assert float(by["mle"]["e_step_seconds"]) < float(by["mle"]["epoch_seconds"])
    # A second invocation reads finished runs back instead of training again.
    mtime = (work / "curves" / "mle" / "rep0" / "model.pt").stat().st_mtime
    assert cli.main(args + ["--experiment", "timing"]) == 0
    assert (work / "curves" / "mle" / "rep0" / "model.pt").stat().st_mtime == mtime


def test_reproduce_rejects_unknown_method_and_missing_data(tmp_path, tiny_npz, capsys):
    out = tmp_path / "out"
    assert cli.main(["reproduce", "--data-root", tiny_npz, "--out", str(out), "--methods", "mle,foo"]) == 2
    assert "--methods: unknown ['foo']" in capsys.readouterr().err
    missing = str(tmp_path / "missing.npz")  # not to be taken for a CIFAR-10 folder
    assert cli.main(["reproduce", "--data-root", missing, "--out", str(out)]) == 2
    assert f"--data-root {missing}: no such file or folder" in capsys.readouterr().err
    assert not out.exists()
