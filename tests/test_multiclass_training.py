"""Multi-class training in the application: --classes with three or more classes trains
a C-way classifier from count vectors, with every method, and evaluate/predict report
per class. Digits (10 classes, bundled) for speed; CIFAR-10's 20k file where present."""
import csv
import json
import os

import pytest
import torch

from mlellp_ext.app import cli
from mlellp_ext.app.data import DataError
from mlellp_ext.app.train import TrainConfig, instance_metrics, load_data, train

CIFAR20K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_train_20k.npz")

METHODS = ["mle", "mle-direct", "dllp", "supervised", "llpgan"]
OPTIONS = {"llpgan": dict(gan_weight=0.1)}  # as in test_methods_learn.py, and why
CONFIG = dict(dataset="digits", classes="all", bag_size="2:8", backbone="cnn", width=0.5, epochs=5, batch_size=32,
              lr=2e-3, tol=0.0, seed=0, quiet=True, device="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_multiclass_method_learns(tmp_path, method):
    """Ten digit classes from count vectors: each method must beat the best constant
    classifier (the most frequent class, about 0.1) by a margin that a loss that has
    lost the counts' signal cannot reach."""
    torch.set_num_threads(2)
    history = train(TrainConfig(out=str(tmp_path / method), method=method, **{**CONFIG, **OPTIONS.get(method, {})}))
    data = load_data(TrainConfig(out="unused", dataset="digits", classes="all", bag_size="2:8", seed=0))
    y = data.data.y[data.test.index]
    constant = float(torch.bincount(y, minlength=10).max()) / y.numel()
    accuracy = history[-1]["test_accuracy"]
    assert accuracy >= constant + 0.35, (method, [round(r["test_accuracy"], 3) for r in history], constant)
    assert history[-1]["test_auc"] > 0.8


def test_multiclass_network_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), **dict(CONFIG, epochs=1, num_bags=40, method="mle", width=0.25)))
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["num_outputs"] == 10 and payload["classes"] == [str(k) for k in range(10)]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    phi = state["method"]["phi"]
    assert phi.dim() == 2 and phi.shape[1] == 10
    torch.testing.assert_close(phi.sum(1), torch.ones(phi.shape[0]))


def test_multiclass_resume_equals_uninterrupted(tmp_path):
    cfg = dict(CONFIG, epochs=2, num_bags=40, method="mle", width=0.25)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = str(tmp_path / "part")
    train(TrainConfig(out=part, **cfg), stop_after_epochs=1)
    resumed = train(TrainConfig(out=part, resume=True, **cfg))
    assert [r["L"] for r in resumed] == [r["L"] for r in full]
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in full]


def test_cli_multiclass_train_evaluate_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--classes", "0,1,2", "--bag-size", "3:6", "--epochs", "2",
                     "--width", "0.25", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["classes"] == ["0", "1", "2"] and set(metrics["per_class_accuracy"]) == {"0", "1", "2"}
    pred = tmp_path / "pred.csv"
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--out", str(pred)]) == 0
    rows = list(csv.DictReader(open(pred)))
    bag_rows = list(csv.DictReader(open(tmp_path / "pred_bags.csv")))
    assert list(rows[0]) == ["instance", "bag", "p_0", "p_1", "p_2", "label"] and len(rows) == metrics["n_instances"]
    for r in rows:
        assert abs(sum(float(r[f"p_{c}"]) for c in "012") - 1) < 1e-5 and r["label"] in "012"
    assert list(bag_rows[0]) == ["bag", "size", "count_0", "count_1", "count_2",
                                 "expected_0", "expected_1", "expected_2"]
    for r in bag_rows:
        size = int(r["size"])
        assert sum(int(r[f"count_{c}"]) for c in "012") == size
        assert abs(sum(float(r[f"expected_{c}"]) for c in "012") - size) < 1e-3
    # Expected counts are the sums of the instances' probabilities in each bag.
    by_bag = {}
    for r in rows:
        by_bag.setdefault(r["bag"], []).append(float(r["p_1"]))
    for r in bag_rows:
        assert abs(sum(by_bag[r["bag"]]) - float(r["expected_1"])) < 1e-3


def test_state_budget_and_approximate_estep(tmp_path, capsys):
    """Bags of 64 over ten digit classes have ~10^8 count vectors: the exact E-step says
    so before training, with the way out; --multiclass-estep auto trains and reports
    how many bags it approximated."""
    base = ["train", "--dataset", "digits", "--classes", "all", "--bag-size", "64:64", "--epochs", "1",
            "--width", "0.25", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "exact")]) == 2
    err = capsys.readouterr().err
    assert "too large for the exact multi-class E-step" in err and "--multiclass-estep auto" in err
    assert not (tmp_path / "exact").exists()
    history = train(TrainConfig(out=str(tmp_path / "auto"), **dict(CONFIG, bag_size="64:64", epochs=1, width=0.25,
                                                                    method="mle", multiclass_estep="auto")))
    assert history[-1]["approximated_bags"] == len(load_data(TrainConfig(
        out="unused", dataset="digits", classes="all", bag_size="64:64")).train.bag_ids)
    rows = list(csv.DictReader(open(tmp_path / "auto" / "metrics.csv")))
    assert int(rows[-1]["approximated_bags"]) == history[-1]["approximated_bags"]


@pytest.mark.parametrize("args, message", [
    (["--multiclass-estep", "auto"], "--multiclass-estep auto applies to multi-class bags"),
    (["--classes", "all", "--method", "dllp", "--multiclass-estep", "approx"],
     "--multiclass-estep approx applies to --method mle"),
    (["--classes", "all", "--method", "mle-direct", "--bag-size", "64:64"],
     "too large for the exact multi-class E-step.*--method mle with --multiclass-estep auto"),
])
def test_multiclass_option_errors(tmp_path, capsys, args, message):
    import re

    assert cli.main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]
                    + args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_instance_metrics_multiclass():
    prob = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    y = torch.tensor([0, 1, 1, 0])
    m = instance_metrics(prob, y, ["a", "b", "c"])
    assert m["accuracy"] == 0.5
    assert m["per_class_accuracy"]["a"] == 0.5 and m["per_class_accuracy"]["b"] == 0.5
    assert m["per_class_accuracy"]["c"] != m["per_class_accuracy"]["c"]  # no instance of c: NaN
    from sklearn.metrics import roc_auc_score

    # Macro over the classes present with both signs (a, b); c has no positives.
    expect = (roc_auc_score((y == 0).numpy(), prob[:, 0].numpy()) + roc_auc_score((y == 1).numpy(),
                                                                                  prob[:, 1].numpy())) / 2
    assert abs(m["auc"] - expect) < 1e-12


@pytest.mark.skipif(not os.path.exists(CIFAR20K), reason="../shared/data/cifar10_train_20k.npz is absent")
def test_cifar10_20k_ten_classes(tmp_path, capsys):
    """The issue's command, on a few bags: trains, evaluates and predicts."""
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "npz", "--data-root", CIFAR20K, "--classes", "all", "--bag-size", "16:16",
                     "--method", "mle", "--num-bags", "24", "--epochs", "1", "--width", "0.125", "--out", str(out),
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics["classes"]) == 10 and "airplane" in metrics["classes"]
    assert metrics["n_instances"] == 16 * 5 and metrics["L"] is not None
    assert cli.main(["predict", "--model", str(out / "model.pt"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "p_bags.csv")))) == 5


def test_unknown_class_is_a_data_error():
    with pytest.raises(DataError, match="class 'horse' is unknown"):
        load_data(TrainConfig(out="unused", dataset="digits", classes="1,2,horse"))


def test_evaluate_checks_the_data_classes_against_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--classes", "0,1,2", "--bag-size", "3:6", "--epochs", "1",
                     "--width", "0.25", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    model = str(out / "model.pt")
    assert cli.main(["evaluate", "--model", model, "--classes", "2,1,0"]) == 2
    assert "in another order" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", model, "--classes", "0,1,2,3"]) == 2
    assert "trained on 3 classes (0,1,2) but these data have 4" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", model, "--classes", "3,4,5"]) == 0  # other digits, the same shape


def test_binary_only_methods_refuse_count_vectors(tmp_path):
    from mlellp_ext.app.methods import METHODS, EM, register_method

    before = dict(METHODS)
    try:
        register_method("binary-em", EM, "a method registered without multiclass=True")
        with pytest.raises(DataError, match="--method binary-em trains binary classifiers only"):
            train(TrainConfig(out=str(tmp_path / "r"), **dict(CONFIG, method="binary-em", epochs=1)))
    finally:
        METHODS.clear()
        METHODS.update(before)
