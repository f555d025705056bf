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
            "--bag-counts", "4,6", "--test-bags", "3", "--bags-repetitions", "1", "--bags-epochs", "1", "--timing-epochs", "2"]
    assert cli.main(args) == 0
    for name in ("curves", "bags", "timing"):
        for ext in ("csv", "png", "md"):
            assert (out / f"{name}.{ext}").exists(), f"{name}.{ext}"
    cols, rows = _columns(out / "claims.csv")
    assert [r["claim"] for r in rows] == list("abcdefg")
    assert all(r["verdict"] in ("holds", "does not hold", "cannot tell at this budget", "partly: fewer, not half")
               for r in rows)
    assert "| (a) |" in (out / "claims.md").read_text()
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
    assert {int(r["epochs_timed"]) for r in rows} == {1}  # of 2 epochs, the first (warm-up) not counted
    # A second invocation reads finished runs back instead of training again.
    done = [work / "curves" / "mle" / "rep0" / "model.pt", work / "timing" / "llpgan" / "model.pt"]
    mtimes = [p.stat().st_mtime for p in done]
    assert cli.main(args + ["--experiment", "timing"]) == 0
    assert [p.stat().st_mtime for p in done] == mtimes


def test_reproduce_rejects_unknown_method_and_missing_data(tmp_path, tiny_npz, capsys):
    out = tmp_path / "out"
    assert cli.main(["reproduce", "--data-root", tiny_npz, "--out", str(out), "--methods", "mle,foo"]) == 2
    assert "--methods: unknown ['foo']" in capsys.readouterr().err
    missing = str(tmp_path / "missing.npz")  # not to be taken for a CIFAR-10 folder
    assert cli.main(["reproduce", "--data-root", missing, "--out", str(out)]) == 2
    assert f"--data-root {missing}: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def _rows(method, accuracies_by_rep):
    return [{"method": method, "repetition": rep, "epoch": e + 1, "test_accuracy": a}
            for rep, curve in enumerate(accuracies_by_rep) for e, a in enumerate(curve)]


def test_claims_verdicts_follow_their_rules():
    """The verdict rules on made-up numbers: clear differences hold, noise cannot tell."""
    from mlellp_ext.app.reproduce import claims

    methods = ["supervised", "dllp", "llpgan", "mle"]
    curves = (_rows("supervised", [[0.7, 0.80], [0.7, 0.81], [0.7, 0.79]])
              + _rows("mle", [[0.75, 0.76], [0.75, 0.77], [0.75, 0.76]])      # flat from epoch 1
              + _rows("dllp", [[0.5, 0.70], [0.5, 0.80], [0.5, 0.60]])       # reaches it at epoch 2, noisy
              + _rows("llpgan", [[0.5, 0.55], [0.5, 0.56], [0.5, 0.55]]))
    bags = [{"method": m, "train_bags": k, "test_accuracy": a} for m, k, a in
            [("supervised", 200, 0.7), ("supervised", 1000, 0.8), ("mle", 200, 0.5), ("mle", 1000, 0.78),
             ("dllp", 200, 0.5), ("dllp", 1000, 0.75), ("llpgan", 200, 0.5), ("llpgan", 1000, 0.7)]]
    timing = [{"method": "mle", "epoch_seconds": 5.0, "epochs_to_99pct": 1},
              {"method": "dllp", "epoch_seconds": 5.0, "epochs_to_99pct": 2},
              {"method": "llpgan", "epoch_seconds": 20.0, "epochs_to_99pct": 2},
              {"method": "supervised", "epoch_seconds": 4.0, "epochs_to_99pct": 2}]
    verdicts = {r["claim"]: r["verdict"] for r in claims(curves, bags, timing, methods)}
    # (a): DLLP's sd is too large to call it below supervised; (b) means differ by 0.063
    # but within noise; (g): sds 0.006 vs 0.1 pass the F test's ratio.
    assert verdicts == {"a": "cannot tell at this budget", "b": "cannot tell at this budget", "c": "holds",
                        "d": "holds", "e": "holds", "f": "holds", "g": "holds"}
    timing[2]["epoch_seconds"] = 6.0
    verdicts = {r["claim"]: r["verdict"] for r in claims(curves, bags, timing, methods)}
    assert verdicts["e"] == "does not hold"
