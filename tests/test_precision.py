"""--amp and --compile on CPU: bf16 autocast learns and resumes exactly, fp16 runs
through its gradient scaler (saved in the checkpoint), a compiled network trains and
its model.pt loads as a plain one."""
import json
import os

import pytest
import torch

from mlellp_ext.app import cli
from mlellp_ext.app.train import TrainConfig, load_data, train

SMALL = dict(dataset="digits", backbone="cnn", width=0.25, epochs=2, batch_size=64, quiet=True, device="cpu",
             tol=0.0)


def test_bf16_learns_and_resumes_exactly(tmp_path):
    torch.set_num_threads(2)
    cfg = dict(SMALL, epochs=5, batch_size=32, lr=2e-3, amp="bf16")
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    data = load_data(TrainConfig(out="unused", dataset="digits"))
    y = data.data.y[data.test.index].float()
    constant = float(max(y.mean(), 1 - y.mean()))
    assert full[-1]["test_accuracy"] >= constant + 0.2, [r["test_accuracy"] for r in full]
    part = str(tmp_path / "part")
    train(TrainConfig(out=part, **dict(cfg, epochs=5)), stop_after_epochs=2)
    resumed = train(TrainConfig(out=part, resume=True, **cfg))
    assert [r["L"] for r in resumed] == [r["L"] for r in full]
    assert not torch.is_autocast_enabled("cpu")  # autocast stays with the network's calls


def test_fp16_uses_a_gradient_scaler_and_resumes(tmp_path):
    cfg = dict(SMALL, epochs=2, amp="fp16", num_bags=60)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert len(state["grad_scalers"]) == 1 and state["grad_scalers"][0]["scale"] > 0
    part = str(tmp_path / "part")
    train(TrainConfig(out=part, **cfg), stop_after_epochs=1)
    resumed = train(TrainConfig(out=part, resume=True, **cfg))
    assert [r["L"] for r in resumed] == [r["L"] for r in full]


def test_llpgan_under_bf16(tmp_path):
    history = train(TrainConfig(out=str(tmp_path / "gan"), **dict(SMALL, epochs=1, method="llpgan", amp="bf16",
                                                                     num_bags=20)))
    assert len(history) == 1


def test_compiled_network_trains_and_its_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--width", "0.25", "--epochs", "1", "--num-bags", "60",
                     "--compile", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(out / "metrics.csv") as f:
        last = f.read().splitlines()[-1].split(",")
    assert abs(metrics["accuracy"] - float(last[8])) < 1e-6  # the same network, loaded plain


def test_bad_amp(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--amp", "fp8", "--out", str(tmp_path)])
    from mlellp_ext.app.data import DataError

    with pytest.raises(DataError, match="--amp must be one of off, bf16, fp16, got 'int8'"):
        train(TrainConfig(out=str(tmp_path / "r"), amp="int8", **SMALL))
    assert not os.path.exists(tmp_path / "r")


def test_autocast_outputs_are_float32():
    from mlellp_ext.app.models import build_backbone
    from mlellp_ext.app.precision import prepare_model

    net = prepare_model(build_backbone("cnn", 3, 2, 0.25), torch.device("cpu"), "bf16", False)
    x = torch.randn(4, 3, 16, 16)
    for out in (net(x), net.class_logits(x), net.features(x)):
        assert out.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    # A copy runs its own weights, under autocast too; the state_dict is the network's own.
    import copy

    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert not torch.equal(twin(x), net(x)) and twin(x).dtype == torch.float32
    plain = build_backbone("cnn", 3, 2, 0.25)
    assert plain.load_state_dict(net.state_dict()) is not None and isinstance(net, type(plain))
    assert type(prepare_model(net, torch.device("cpu"), "fp16", False)).__bases__[0] is type(plain)
