"""Image files are not all held in memory: manifest (and family-faces) images are decoded
when needed, ahead of each batch by DataLoader workers, with the same results as the
same images held in memory."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mlellp_ext.app import train as train_module
from mlellp_ext.app.data import DataError, ImageFiles, load_dataset
from mlellp_ext.app.train import TrainConfig, train


def write_manifest(root, num_bags=40, bag_size=6, seed=0):
    """A few hundred small RGB files (two colour families), in bags with their counts."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "img", exist_ok=True)
    rows, counts = ["path,bag,label"], ["bag,count"]
    for b in range(num_bags):
        labels = rng.integers(0, 2, bag_size)
        for j, label in enumerate(labels):
            base = np.array([200, 40, 40]) if label else np.array([40, 40, 200])
            pixels = np.clip(base + rng.normal(0, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
            name = f"img/{b}_{j}.png"
            Image.fromarray(pixels).save(root / name)
            rows.append(f"{name},bag{b},{label}")
        counts.append(f"bag{b},{int(labels.sum())}")
    (root / "inst.csv").write_text("\n".join(rows) + "\n")
    (root / "counts.csv").write_text("\n".join(counts) + "\n")
    return str(root / "inst.csv"), str(root / "counts.csv")


def test_image_files_index_like_a_tensor(tmp_path):
    inst, counts = write_manifest(tmp_path, num_bags=3)
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0)
    x = ds.data.x
    assert isinstance(x, ImageFiles) and x.shape == (18, 3, 12, 12) and x.dtype == torch.uint8
    whole = x[torch.arange(18)]
    assert whole.shape == (18, 3, 12, 12) and whole.dtype == torch.uint8
    assert torch.equal(x[4], whole[4]) and torch.equal(x[[2, 0]], whole[[2, 0]])
    assert int(x[1, 0, 0, 0]) == int(whole[1, 0, 0, 0])


def test_a_file_unreadable_after_the_check_is_named(tmp_path):
    inst, counts = write_manifest(tmp_path, num_bags=2)
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0)
    os.remove(tmp_path / "img" / "1_2.png")
    with pytest.raises(DataError, match=r"inst\.csv, line 10: cannot read image .*1_2\.png"):
        ds.data.x[torch.arange(12)]


@pytest.mark.parametrize("method", ["mle", "dllp"])
def test_lazy_training_equals_in_memory(tmp_path, monkeypatch, method):
    inst, counts = write_manifest(tmp_path)  # 240 image files
    cfg = dict(dataset="manifest", data_root=inst, counts_file=counts, method=method, width=0.25, epochs=2,
               batch_size=32, tol=0.0, quiet=True, device="cpu")
    lazy = train(TrainConfig(out=str(tmp_path / "lazy"), workers=2, **cfg))
    real_load = train_module.load_data

    def in_memory(c):
        dataset = real_load(c)
        dataset.data.x = dataset.data.x[torch.arange(len(dataset.data.x))]  # every image decoded, as a tensor
        return dataset

    monkeypatch.setattr(train_module, "load_data", in_memory)
    held = train(TrainConfig(out=str(tmp_path / "held"), workers=0, **cfg))
    assert [r["L"] for r in lazy] == [r["L"] for r in held]
    assert [r["test_accuracy"] for r in lazy] == [r["test_accuracy"] for r in held]


def test_workers_decode_every_batch(tmp_path, monkeypatch):
    """With workers, training, the E-step's inference pass and the test metrics all follow
    their plans: the main process decodes no image itself."""
    inst, counts = write_manifest(tmp_path, num_bags=20)
    calls = []
    real = ImageFiles.image
    main = os.getpid()

    def counted(self, i):
        if os.getpid() == main:
            calls.append(i)
        return real(self, i)

    monkeypatch.setattr(ImageFiles, "image", counted)
    train(TrainConfig(out=str(tmp_path / "r"), dataset="manifest", data_root=inst, counts_file=counts, method="mle",
                      width=0.25, epochs=1, batch_size=16, tol=0.0, quiet=True, device="cpu", workers=2))
    assert calls == []


def test_a_worker_error_is_the_file_s_own_one_line_error(tmp_path):
    import multiprocessing

    inst, counts = write_manifest(tmp_path, num_bags=10)
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0)
    from mlellp_ext.app.batches import Preprocess

    pre = Preprocess(ds.data.x, True, False, torch.device("cpu"), workers=2)
    plan = [torch.arange(0, 20), torch.arange(20, 40)]
    os.remove(tmp_path / "img" / "1_0.png")  # image 6, in the first batch (workers start decoding at plan)
    pre.plan(plan)
    with pytest.raises(DataError) as err:
        pre(plan[0], train=False)
    assert str(err.value).startswith(f"{inst}, line 8: cannot read image")
    assert "Traceback" not in str(err.value)
    assert pre._loader is None and not multiprocessing.active_children()


def test_truncated_png_is_named_when_loading(tmp_path):
    inst, counts = write_manifest(tmp_path, num_bags=2)
    path = tmp_path / "img" / "0_3.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"inst\.csv, line 5: cannot read image .*0_3\.png"):
        load_dataset("manifest", data_root=inst, counts_file=counts)


def test_image_files_refuse_ambiguous_keys_and_take_slices(tmp_path):
    inst, counts = write_manifest(tmp_path, num_bags=1)
    x = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0).data.x
    assert torch.equal(x[1:4], x[torch.tensor([1, 2, 3])]) and x[:, 0].shape == (6, 12, 12)
    for key in (torch.tensor([True, False, True, False, False, False]), [[0, 1]], torch.tensor([0.5])):
        with pytest.raises(IndexError, match="ImageFiles: index with"):
            x[key]


def test_a_batch_asked_twice_keeps_the_plan(tmp_path, monkeypatch):
    inst, counts = write_manifest(tmp_path, num_bags=10)
    ds = load_dataset("manifest", data_root=inst, counts_file=counts, test_fraction=0.0)
    from mlellp_ext.app.batches import Preprocess

    calls = []
    real, main = ImageFiles.image, os.getpid()
    monkeypatch.setattr(ImageFiles, "image",
                        lambda self, i: (calls.append(i) if os.getpid() == main else None) or real(self, i))
    pre = Preprocess(ds.data.x, True, False, torch.device("cpu"), workers=2)
    plan = [torch.arange(0, 20), torch.arange(20, 40), torch.arange(40, 60)]
    pre.plan(plan)
    first = pre(plan[0], train=False)
    again = pre(plan[0], train=False)  # a second view of the same batch: decoded here
    pre(plan[1], train=False)
    pre(plan[2], train=False)
    assert torch.equal(first, again) and sorted(calls) == list(range(20))
