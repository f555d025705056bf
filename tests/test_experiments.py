"""The experiments' code runs against the current API: each CIFAR variant trains one
epoch on a tiny image file (its results come from the real runs; this only keeps the
code working). Nothing in the package imports from experiments/."""
import importlib.util
import os

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments", "cifar10_bird_cat")


@pytest.fixture(autouse=True)
def registry_restored():
    """The variants register methods; leave the registry as it was for other tests."""
    from mlellp_ext.app.methods import METHODS

    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 2, 120))
    return str(path)


@pytest.mark.parametrize("args", [["plain"], ["supervised"], ["te"], ["cotrain"], ["labels"], ["fixmatch"],
                                  ["plain", "--rotation-weight", "1"], ["supervised", "--rotation-weight", "1"]])
def test_variant_trains_an_epoch(tmp_path, tiny_images, args):
    variants = _load("variants")
    threads = torch.get_num_threads()  # variants.main sets one thread; restored below
    try:
        variants.main([*args, "--epochs", "1", "--num-bags", "12", "--data-root", tiny_images,
                       "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "metrics.csv").exists()


def test_rotnet_then_init_and_restart(tmp_path, tiny_images):
    variants = _load("variants")
    threads = torch.get_num_threads()
    common = ["--epochs", "1", "--num-bags", "12", "--data-root", tiny_images]
    try:
        variants.main(["rotnet", *common, "--out", str(tmp_path / "rot")])
        variants.main(["plain", "--init", str(tmp_path / "rot" / "body.pt"), *common, "--out", str(tmp_path / "a")])
        variants.main(["restart", "--phi-from", str(tmp_path / "a" / "checkpoint.pt"), *common,
                       "--out", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "b" / "model.pt").exists()
    _load("fit").main([str(tmp_path / "a"), str(tmp_path / "b")])  # runs of variant methods read back


def test_tuning_on_training_images_only(tmp_path, tiny_images):
    spec = importlib.util.spec_from_file_location("experiment_tune", os.path.join(ROOT, "experiments", "reproduction",
                                                                                  "tune.py"))
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    tune.main(["--method", "dllp", "--data-root", tiny_images, "--num-bags", "12", "--epochs", "1", "--width", "0.25",
               "--out", str(tmp_path)])
    rows = list(__import__("csv").DictReader(open(tmp_path / "tuning.csv")))
    assert len(rows) == 4
    train_only = np.load(tmp_path / "train_only.npz")
    assert 0 < len(train_only["y"]) < 120  # the split's training images, not all of them


def test_package_does_not_import_experiments():
    import ast

    for folder, _, files in os.walk(os.path.join(ROOT, "mlellp_ext")):
        for f in files:
            if f.endswith(".py"):
                for node in ast.walk(ast.parse(open(os.path.join(folder, f)).read())):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    assert not any(n.split(".")[0] == "experiments" for n in names), (f, names)


def test_cifar10_multiclass_runs_and_summarises(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "experiment_multiclass", os.path.join(ROOT, "experiments", "cifar10_multiclass", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(1)
    data = tmp_path / "three.npz"
    np.savez(data, x=rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 3, 96),
             classes=np.array(["a", "b", "c"]))
    threads = torch.get_num_threads()
    try:
        module.main(["--runs", str(tmp_path / "runs"), "--data", str(data), "--bag-size", "8", "--epochs", "2",
                     "--width", "0.125"])
    finally:
        torch.set_num_threads(threads)
    module.main(["--runs", str(tmp_path / "runs"), "--summarise", str(tmp_path / "doc")])
    rows = (tmp_path / "doc" / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and all(",True" in r for r in rows[1:])
    assert (tmp_path / "doc" / "accuracy.png").exists()
    assert (tmp_path / "doc" / "bags8-s0-mle" / "metrics.csv").exists()


def test_noisy_counts_runs_and_summarises(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "experiment_noisy", os.path.join(ROOT, "experiments", "noisy_counts", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--runs", str(tmp_path / "runs"), "--dataset", "digits", "--epochs", "1", "--seeds", "0",
                     "--epsilons", "inf", "1"])
    finally:
        torch.set_num_threads(threads)
    module.main(["--runs", str(tmp_path / "runs"), "--summarise", str(tmp_path / "doc")])
    rows = (tmp_path / "doc" / "runs.csv").read_text().splitlines()
    assert len(rows) == 7  # 3 learners x 2 epsilons
    table = (tmp_path / "doc" / "summary.md").read_text()
    assert table.index("ε = ∞") < table.index("ε = 1")
    assert (tmp_path / "doc" / "accuracy.png").exists()
