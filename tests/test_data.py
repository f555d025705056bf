"""Data loading, bag forming and splitting (mlellp_ext.app.data): small files made in tmp_path."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mlellp_ext.app.data import (
    BagDataset,
    Bags,
    DataError,
    instance_labels_available,
    load_dataset,
    parse_bag_size,
    random_bags,
    split_bags,
)
from mlellp_ext.bags import bag_index

CIFAR_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_bird_cat_train.npz")


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def sizes(offsets):
    return (offsets[1:] - offsets[:-1]).tolist()


def check_bags(bags: Bags, y=None, num_classes=2):
    """Layout invariants; with labels, counts are the positives per bag (two classes)
    or each bag's count vector (C >= 3), counted here instance by instance."""
    assert bags.index.dtype == bags.offsets.dtype == bags.counts.dtype == torch.int64
    assert int(bags.offsets[0]) == 0 and int(bags.offsets[-1]) == len(bags.index)
    assert len(bags.counts) == len(bags.bag_ids) == len(bags.offsets) - 1
    if y is not None:
        expect = torch.zeros(len(bags.counts), num_classes, dtype=torch.int64)
        for b, i in zip(bag_index(bags.offsets).tolist(), bags.index.tolist()):
            expect[b, int(y[i])] += 1
        assert torch.equal(bags.counts, expect[:, 1] if num_classes == 2 else expect)


def check_split(ds: BagDataset):
    check_bags(ds.train, ds.data.y, len(ds.data.classes))
    check_bags(ds.test, ds.data.y, len(ds.data.classes))
    both = torch.cat([ds.train.index, ds.test.index])
    assert len(torch.unique(both)) == len(both)  # no instance in two bags
    assert not set(ds.train.bag_ids) & set(ds.test.bag_ids)


# ---------------------------------------------------------------------------
# random_bags, split_bags, parse_bag_size


def test_random_bags_sizes_unique_and_deterministic():
    index, offsets = random_bags(1000, None, (2, 12), g(1))
    s = sizes(offsets)
    assert min(s) >= 2 and max(s) <= 12 and len(set(s)) > 5
    assert len(torch.unique(index)) == len(index) and int(index.max()) < 1000
    assert 1000 - 12 < len(index) <= 1000  # "as many as fit": fewer than one bag left over
    again = random_bags(1000, None, (2, 12), g(1))
    assert torch.equal(again[0], index) and torch.equal(again[1], offsets)
    other = random_bags(1000, None, (2, 12), g(2))
    assert not torch.equal(other[0][:50], index[:50])


def test_random_bags_fixed_number_and_single_size():
    index, offsets = random_bags(100, 7, (3, 3), g())
    assert sizes(offsets) == [3] * 7 and len(torch.unique(index)) == 21


def test_random_bags_errors():
    with pytest.raises(DataError, match=r"only 50 are available"):
        random_bags(50, 20, (2, 12), g())
    with pytest.raises(DataError, match="LO"):
        random_bags(50, 2, (0, 3), g())
    with pytest.raises(DataError, match="LO"):
        random_bags(50, 2, (4, 3), g())
    with pytest.raises(DataError, match="fewer than the smallest"):
        random_bags(3, None, (5, 6), g())


def make_bags(num=50):
    index, offsets = random_bags(500, num, (1, 6), g(3))
    counts = torch.arange(num, dtype=torch.int64)  # distinct, to follow bags through the split
    return Bags(index=index, offsets=offsets, counts=counts, bag_ids=[str(b) for b in range(num)])


def test_split_bags_whole_disjoint_80_20():
    bags = make_bags()
    train, test = split_bags(bags, 0.2, g())
    assert (len(train.bag_ids), len(test.bag_ids)) == (40, 10)
    assert not set(train.bag_ids) & set(test.bag_ids)
    assert sorted(train.bag_ids + test.bag_ids, key=int) == bags.bag_ids
    for part in (train, test):
        check_bags(part)
        for k, name in enumerate(part.bag_ids):
            b = int(name)
            orig = bags.index[bags.offsets[b]:bags.offsets[b + 1]]
            assert torch.equal(part.index[part.offsets[k]:part.offsets[k + 1]], orig)  # bag kept whole
            assert int(part.counts[k]) == b
    again = split_bags(bags, 0.2, g())
    assert again[1].bag_ids == test.bag_ids
    train0, test0 = split_bags(bags, 0.0, g())
    assert len(train0.bag_ids) == 50 and len(test0.bag_ids) == 0 and len(test0.offsets) == 1
    with pytest.raises(DataError, match="test fraction"):
        split_bags(bags, 1.0, g())


def test_parse_bag_size():
    assert parse_bag_size("2:12") == (2, 12)
    assert parse_bag_size("5") == (5, 5)
    assert parse_bag_size(" 3 : 4 ") == (3, 4)
    for bad in ["", "a:b", "2-12", "12:2", "0:3", "1:2:3", "-1", "2.5"]:
        with pytest.raises(DataError, match="--bag-size must be LO:HI"):
            parse_bag_size(bad)


def test_helpers():
    bags = Bags(index=torch.arange(5), offsets=torch.tensor([0, 2, 2, 5]), counts=torch.tensor([1, 0, 2]),
                bag_ids=["a", "b", "c"])
    assert bag_index(bags.offsets).tolist() == [0, 0, 2, 2, 2]


# ---------------------------------------------------------------------------
# digits


def test_digits():
    ds = load_dataset("digits", seed=0)
    x, y = ds.data.x, ds.data.y
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1}
    assert ds.data.classes == ["digit<5", "digit>=5"] and not ds.data.is_rgb
    assert instance_labels_available(ds) and instance_labels_available(ds.data)
    check_split(ds)
    s = sizes(ds.train.offsets) + sizes(ds.test.offsets)
    assert min(s) >= 2 and max(s) <= 12
    n = len(s)
    assert len(ds.test.bag_ids) == round(0.2 * n)
    same = load_dataset("digits", seed=0)
    assert torch.equal(same.train.index, ds.train.index) and same.test.bag_ids == ds.test.bag_ids
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.train.index[:100], ds.train.index[:100])
    # None (the CLI's "not given") means 2..12 and a 0.2 test split
    assert torch.equal(load_dataset("digits", seed=0, bag_size=(2, 12), test_fraction=0.2).train.index,
                       ds.train.index)
    few = load_dataset("digits", num_bags=30, bag_size=(4, 4))
    assert len(few.train.bag_ids) + len(few.test.bag_ids) == 30 and len(few.test.bag_ids) == 6
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")


@pytest.mark.parametrize("name, option, message", [
    ("digits", dict(data_root="cifar.npz"), "--data-root cifar.npz does not apply to --dataset digits"),
    ("family-faces", dict(data_root="faces", classes="f,m"), "--classes f,m does not apply to --dataset family-faces"),
    ("digits", dict(download=True), "--download does not apply to --dataset digits"),
    ("npz", dict(data_root="x.npz", counts_file="c.csv"), "--counts-file c.csv does not apply to --dataset npz"),
    ("manifest", dict(data_root="i.csv", classes="0,1"), "--classes 0,1 does not apply to --dataset manifest"),
    ("family-faces", dict(data_root="faces", bag_size=(3, 5)), "--bag-size 3:5 does not apply to --dataset family-faces"),
    ("manifest", dict(data_root="i.csv", bag_size=(2, 2)), "--bag-size 2:2 does not apply to --dataset manifest"),
    ("npz", dict(data_root="x.npz", test_root="t.npz", test_fraction=0.3),
     "--test-fraction 0.3 does not apply with --test-root"),
])
def test_options_a_dataset_does_not_use_are_errors(name, option, message):
    # Else `--data-root cifar.npz` without `--dataset npz` trains on digits without a word.
    with pytest.raises(DataError, match=message):
        load_dataset(name, **option)


# ---------------------------------------------------------------------------
# npz


def write_npz(path, n=60, labels=3, hw=(6, 5), channels=3, names=True, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *hw) + ((channels,) if channels else ())
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(n) % labels
    arrays = {"x": x, "y": y}
    if names:
        arrays["classes"] = np.array(["cat", "dog", "frog"][:labels])
    np.savez(path, **arrays)
    return x, y


def test_npz_by_name_and_number(tmp_path):
    path = str(tmp_path / "d.npz")
    x, y = write_npz(path)
    ds = load_dataset("npz", data_root=path, classes="frog,cat", bag_size=(2, 4))
    assert ds.data.classes == ["frog", "cat"] and ds.data.is_rgb
    assert ds.data.x.dtype == torch.uint8 and ds.data.x.shape == (40, 3, 6, 5)
    keep = np.flatnonzero(y != 1)
    # NHWC -> NCHW, instances of other classes dropped; frog (2) -> 0, cat (0) -> 1.
    assert torch.equal(ds.data.x, torch.from_numpy(x[keep]).permute(0, 3, 1, 2))
    assert ds.data.y.tolist() == [int(v == 0) for v in y[keep]]
    check_split(ds)
    by_number = load_dataset("npz", data_root=path, classes="2,0", bag_size=(2, 4))
    assert by_number.data.classes == ["frog", "cat"] and torch.equal(by_number.data.y, ds.data.y)
    assert torch.equal(by_number.train.index, ds.train.index)


def test_npz_without_class_names(tmp_path):
    path = str(tmp_path / "d.npz")
    write_npz(path, names=False)
    ds = load_dataset("npz", data_root=path, classes="1,2", bag_size=(2, 4))
    assert ds.data.classes == ["1", "2"] and len(ds.data.y) == 40
    with pytest.raises(DataError, match=r"d.npz.*class 'cat' is unknown.*label values: 0, 1, 2"):
        load_dataset("npz", data_root=path, classes="cat,1")


def test_npz_multiclass(tmp_path):
    path = str(tmp_path / "d.npz")
    x, y = write_npz(path)
    ds = load_dataset("npz", data_root=path, classes="all", bag_size=(2, 5))
    assert ds.data.classes == ["cat", "dog", "frog"] and torch.equal(ds.data.y, torch.from_numpy(y))
    assert ds.train.counts.shape == (len(ds.train.bag_ids), 3)
    assert torch.equal(ds.train.counts.sum(1), ds.train.offsets.diff())
    check_split(ds)
    # Named order sets the labels: frog -> 0, cat -> 1, dog -> 2.
    named = load_dataset("npz", data_root=path, classes="frog,cat,dog", bag_size=(2, 5))
    assert named.data.classes == ["frog", "cat", "dog"]
    assert named.data.y.tolist() == [{2: 0, 0: 1, 1: 2}[int(v)] for v in y]
    assert torch.equal(named.train.index, ds.train.index)  # the same bags, other label order
    check_split(named)
    # "all" over two classes present is the binary problem.
    two = str(tmp_path / "two.npz")
    write_npz(two, labels=2, names=False)
    binary = load_dataset("npz", data_root=two, classes="all", bag_size=(2, 5))
    assert binary.data.classes == ["0", "1"] and binary.train.counts.dim() == 1


def test_npz_test_root_multiclass_maps_by_the_training_classes(tmp_path):
    """The test file's labels go through the training set's classes (by label value),
    even where it lacks one; named files must name those values alike."""
    train_path, test_path = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
    write_npz(train_path, names=False)  # labels 0, 1, 2
    rng = np.random.default_rng(5)
    ty = np.array([0, 2, 2, 5, 0, 2] * 4)  # no 1; 5 is not a training class
    np.savez(test_path, x=rng.integers(0, 256, (len(ty), 6, 5, 3), dtype=np.uint8), y=ty)
    ds = load_dataset("npz", data_root=train_path, test_root=test_path, classes="all", bag_size=(2, 3))
    assert ds.data.classes == ["0", "1", "2"] and ds.test.counts.shape[1] == 3
    n_train = len(ds.data.y) - int((ty != 5).sum())
    assert ds.data.y[n_train:].tolist() == [int(v) for v in ty if v != 5]
    check_split(ds)
    write_npz(train_path)  # cat, dog, frog
    np.savez(test_path, x=rng.integers(0, 256, (6, 6, 5, 3), dtype=np.uint8), y=np.arange(6) % 3,
             classes=np.array(["cat", "frog", "dog"]))
    with pytest.raises(DataError, match=r"test\.npz: classes \['cat', 'frog', 'dog'\] differ from \['cat', 'dog', 'frog'\]"):
        load_dataset("npz", data_root=train_path, test_root=test_path, classes="all")


def test_digits_classes():
    ds = load_dataset("digits", classes="all", bag_size=(4, 8))
    assert ds.data.classes == [str(k) for k in range(10)] and ds.train.counts.shape[1] == 10
    check_split(ds)
    pair = load_dataset("digits", classes="3,8")
    assert pair.data.classes == ["3", "8"] and pair.train.counts.dim() == 1 and len(pair.data.y) < 400
    check_split(pair)
    with pytest.raises(DataError, match="digits: class '10' has no instances"):
        load_dataset("digits", classes="1,10")


def test_npz_errors(tmp_path):
    path = str(tmp_path / "d.npz")
    write_npz(path)
    with pytest.raises(DataError, match=r"d.npz.*not binary.*--classes"):
        load_dataset("npz", data_root=path)
    with pytest.raises(DataError, match=r"class 'horse' is unknown; available names: cat, dog, frog"):
        load_dataset("npz", data_root=path, classes="cat,horse")
    with pytest.raises(DataError, match="'all' or two or more classes.*got 'cat'"):
        load_dataset("npz", data_root=path, classes="cat")
    with pytest.raises(DataError, match="names the same class twice.*'2'"):
        load_dataset("npz", data_root=path, classes="cat,frog,2")
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", data_root=str(tmp_path / "missing.npz"))
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"notes\.npz: not an \.npz archive .*starts with b'x,y\\n1,'"):
        load_dataset("npz", data_root=str(text))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npz: a single \.npy array, not an \.npz archive"):
        load_dataset("npz", data_root=str(single))


def test_npz_binary_grayscale(tmp_path):
    path = str(tmp_path / "g.npz")
    x, y = write_npz(path, labels=2, channels=None, names=False)
    ds = load_dataset("npz", data_root=path, bag_size=(3, 3))
    assert ds.data.x.shape == (60, 1, 6, 5) and not ds.data.is_rgb
    assert torch.equal(ds.data.x[:, 0], torch.from_numpy(x)) and ds.data.classes == ["0", "1"]
    assert (len(ds.train.bag_ids), len(ds.test.bag_ids)) == (16, 4)
    check_split(ds)


def test_npz_test_root(tmp_path):
    train_path, test_path = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
    write_npz(train_path, n=60)
    write_npz(test_path, n=30, seed=1)
    ds = load_dataset("npz", data_root=train_path, test_root=test_path, classes="cat,dog", bag_size=(2, 2))
    assert len(ds.data.y) == 40 + 20
    assert (len(ds.train.bag_ids), len(ds.test.bag_ids)) == (20, 10)  # all training bags train
    assert int(ds.train.index.max()) < 40 and int(ds.test.index.min()) >= 40
    check_split(ds)


@pytest.mark.skipif(not os.path.exists(CIFAR_NPZ), reason=f"real CIFAR-10 bird/cat npz not found at {CIFAR_NPZ}")
def test_npz_real_cifar_bird_cat():
    ds = load_dataset("npz", data_root=CIFAR_NPZ, seed=0)
    assert ds.data.x.shape == (10000, 3, 32, 32) and ds.data.x.dtype == torch.uint8
    assert ds.data.classes == ["bird", "cat"] and ds.data.is_rgb and int(ds.data.y.sum()) == 5000
    check_split(ds)
    num_bags = len(ds.train.bag_ids) + len(ds.test.bag_ids)
    assert abs(len(ds.test.bag_ids) - 0.2 * num_bags) <= 1
    swapped = load_dataset("npz", data_root=CIFAR_NPZ, classes="cat,bird", num_bags=100)
    assert swapped.data.classes == ["cat", "bird"] and torch.equal(swapped.data.y, 1 - ds.data.y)


def test_cifar10_needs_classes_and_download(tmp_path):
    with pytest.raises(DataError, match="--classes"):
        load_dataset("cifar10", data_root=str(tmp_path))
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", data_root=str(tmp_path), classes="bird,cat")


# ---------------------------------------------------------------------------
# family-faces


def save_image(path, size=(10, 14), color=(200, 30, 40)):
    Image.new("RGB", size, color).save(path)


def test_family_faces(tmp_path):
    files = {"0002-001f.png": 1, "0002-002m.PNG": 0, "0002-003f.jpg": 1,
             "0001-001m.png": 0, "0001-002F.bmp": 1, "0003-x-m.jpeg": 0}
    for name in files:
        save_image(tmp_path / name)
    ds = load_dataset("family-faces", data_root=str(tmp_path), test_fraction=0.0)
    assert ds.data.x.shape == (6, 3, 120, 96) and ds.data.x.dtype == torch.uint8
    assert ds.data.classes == ["m", "f"] and ds.data.is_rgb
    assert ds.train.bag_ids == ["0001", "0002", "0003"] and sizes(ds.train.offsets) == [2, 3, 1]
    assert ds.train.counts.tolist() == [1, 2, 0]
    assert ds.data.y.tolist() == [0, 1, 1, 0, 1, 0]  # sorted by bag, then file name
    assert int(ds.data.x[0, 0].float().mean().round()) == 200  # pixels survive the resize
    check_split(ds)
    split = load_dataset("family-faces", data_root=str(tmp_path), test_fraction=0.34)
    assert len(split.test.bag_ids) == 1 and len(split.train.bag_ids) == 2
    first = load_dataset("family-faces", data_root=str(tmp_path), num_bags=2, test_fraction=0.0)
    assert first.train.bag_ids == ["0001", "0002"] and len(first.data.y) == 5


def test_family_faces_errors(tmp_path):
    save_image(tmp_path / "0001-001f.png")
    (tmp_path / "0001-002x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"0001-002x\.png.*does not match"):
        load_dataset("family-faces", data_root=str(tmp_path))
    os.remove(tmp_path / "0001-002x.png")
    (tmp_path / "0001-002m.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"0001-002m\.jpg.*cannot read image"):
        load_dataset("family-faces", data_root=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no face images"):
        load_dataset("family-faces", data_root=str(empty))


# ---------------------------------------------------------------------------
# manifest


def write_manifest(tmp_path, instances, counts):
    """Write the two CSVs (full text, header included) beside img/a..d.png (8x6) and img/big.png (16x12)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for i, name in enumerate("abcd"):
        save_image(tmp_path / "img" / f"{name}.png", size=(8, 6), color=(i * 60, 0, 0))
    save_image(tmp_path / "img" / "big.png", size=(16, 12))
    (tmp_path / "inst.csv").write_text(instances)
    (tmp_path / "counts.csv").write_text(counts)
    return str(tmp_path / "inst.csv"), str(tmp_path / "counts.csv")


GOOD_INSTANCES = "path,bag,label\nimg/a.png,b1,1\nimg/b.png,b2,0\nimg/c.png,b1,0\nimg/big.png,b2,1\nimg/d.png,b3,1\n"
GOOD_COUNTS = "bag,count\nb1,1\nb2,1\nb3,1\n"


def load_manifest(inst, counts, **kw):
    return load_dataset("manifest", data_root=inst, counts_file=counts, **kw)


def test_manifest(tmp_path):
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES, GOOD_COUNTS)
    ds = load_manifest(inst, counts, test_fraction=0.0)
    # Bags in order of first appearance, each bag's rows in file order; big.png resized to 8x6.
    assert ds.data.x.shape == (5, 3, 6, 8) and ds.data.x.dtype == torch.uint8 and ds.data.is_rgb
    assert ds.train.bag_ids == ["b1", "b2", "b3"] and sizes(ds.train.offsets) == [2, 2, 1]
    assert ds.train.counts.tolist() == [1, 1, 1] and ds.data.y.tolist() == [1, 0, 0, 1, 1]
    assert int(ds.data.x[1, 0, 0, 0]) == 120  # c.png (third colour) is second: bag b1 grouped
    check_split(ds)
    split = load_manifest(inst, counts, test_fraction=0.3)
    assert len(split.test.bag_ids) == 1
    check_split(split)


def test_manifest_without_labels(tmp_path):
    inst, counts = write_manifest(tmp_path, "path,bag\nimg/a.png,x\nimg/b.png,x\n", "bag,count\nx,2\n")
    ds = load_manifest(inst, counts, test_fraction=0.0)
    assert ds.data.y is None and not instance_labels_available(ds)
    assert ds.train.counts.tolist() == [2]
    partial = "path,bag,label\nimg/a.png,x,1\nimg/b.png,x,\n"
    inst, counts = write_manifest(tmp_path, partial, "bag,count\nx,2\n")
    assert load_manifest(inst, counts).data.y is None


@pytest.mark.parametrize("instances,counts,match", [
    ("path,label\nimg/a.png,1\n", GOOD_COUNTS, r"inst\.csv, line 1: missing column 'bag'"),
    ("path,bag\nimg/a.png,b1\n,b1\n", "bag,count\nb1,0\n", r"inst\.csv, line 3: empty path"),
    ("path,bag,label\nimg/a.png,b1,1\nimg/b.png,b1,2\n", "bag,count\nb1,0\n",
     r"inst\.csv, line 3: label must be 0 or 1"),
    ("path,bag\nimg/a.png,b1\nimg/zz.png,b1\n", "bag,count\nb1,0\n",
     r"inst\.csv, line 3: image 'img/zz.png' not found"),
    ("path,bag\nimg/a.png,b1\nimg/bad.png,b1\n", "bag,count\nb1,0\n", r"inst\.csv, line 3: cannot read image"),
    ("path,bag\nimg/a.png,b1\nimg/b.png,b1\n./img/a.png,b1\n", "bag,count\nb1,1\n",
     r"inst\.csv, line 4: image './img/a.png' is listed twice in bag 'b1' \(first on line 2\)"),
    (GOOD_INSTANCES, "bag\nb1\n", r"counts\.csv, line 1: missing column 'count'"),
    (GOOD_INSTANCES, "bag,count\nb1,1\nb2,1\nb1,0\nb3,1\n", r"counts\.csv, line 4: bag 'b1' is listed twice"),
    (GOOD_INSTANCES, "bag,count\nb1,1\nb2,one\n", r"counts\.csv, line 3: count 'one' for bag 'b2' is not an integer"),
    (GOOD_INSTANCES, "bag,count\nb1,1\nb2,1.5\n", r"counts\.csv, line 3: count '1.5'.*not an integer"),
    (GOOD_INSTANCES, "bag,count\nb1,-1\n", r"counts\.csv, line 2: count -1 for bag 'b1' is negative"),
    (GOOD_INSTANCES, "bag,count\nb1,1\nb2,1\nb3,2\n",
     r"counts\.csv, line 4: count 2 for bag 'b3' is larger than its 1 instances"),
    (GOOD_INSTANCES, "bag,count\nb1,1\nb3,1\n", r"inst\.csv, line 3: bag 'b2' has no count in .*counts\.csv"),
    (GOOD_INSTANCES, GOOD_COUNTS + "b4,0\n", r"counts\.csv, line 5: bag 'b4' has no instances in .*inst\.csv"),
])
def test_manifest_errors(tmp_path, instances, counts, match):
    inst, cnt = write_manifest(tmp_path, instances, counts)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=match):
        load_manifest(inst, cnt)


MULTI_INSTANCES = ("path,bag,label\nimg/a.png,b1,cat\nimg/b.png,b1,dog\nimg/c.png,b2,2\n"
                   "img/big.png,b2,Cow\nimg/d.png,b3,dog\n")
MULTI_COUNTS = "bag,cat,dog,Cow\nb1,1,1,0\nb2,0,0,2\nb3,0,1,0\n"


def test_manifest_multiclass(tmp_path):
    inst, counts = write_manifest(tmp_path, MULTI_INSTANCES, MULTI_COUNTS)
    ds = load_manifest(inst, counts, test_fraction=0.0)
    # The header names the classes, as written; labels by name or number.
    assert ds.data.classes == ["cat", "dog", "Cow"] and ds.data.y.tolist() == [0, 1, 2, 2, 1]
    assert ds.train.counts.tolist() == [[1, 1, 0], [0, 0, 2], [0, 1, 0]]
    check_split(ds)
    # Two class columns are the binary problem: counts of the second class.
    inst, counts = write_manifest(tmp_path, "path,bag,label\nimg/a.png,x,cat\nimg/b.png,x,dog\n", "bag,cat,dog\nx,1,1\n")
    two = load_manifest(inst, counts, test_fraction=0.0)
    assert two.data.classes == ["cat", "dog"] and two.train.counts.tolist() == [1] and two.data.y.tolist() == [0, 1]


def test_manifest_trailing_commas_still_load(tmp_path):
    """Spreadsheets save empty header names for trailing commas; binary files with them load as before."""
    inst, counts = write_manifest(tmp_path, GOOD_INSTANCES.replace("path,bag,label", "path,bag,label,,"),
                                  GOOD_COUNTS.replace("bag,count", "bag,count,,"))
    assert load_manifest(inst, counts, test_fraction=0.0).train.counts.tolist() == [1, 1, 1]
    inst, counts = write_manifest(tmp_path, MULTI_INSTANCES, MULTI_COUNTS.replace("bag,cat,dog,Cow", "bag,cat,dog,Cow,"))
    assert load_manifest(inst, counts, test_fraction=0.0).data.classes == ["cat", "dog", "Cow"]


@pytest.mark.parametrize("instances,counts,match", [
    (MULTI_INSTANCES, "bag,cat,dog,Cow\nb1,1,0,0\nb2,0,0,2\nb3,0,1,0\n",
     r"counts\.csv, line 2: the counts of bag 'b1' sum to 1, but it has 2 instances"),
    (MULTI_INSTANCES, "bag,cat,dog,Cow\nb1,1,1,0\nb2,0,x,2\nb3,0,1,0\n",
     r"counts\.csv, line 3: count of class 'dog' 'x' for bag 'b2' is not an integer"),
    (MULTI_INSTANCES, "bag,cat,dog,Cow\nb1,1,1,0\nb2,-1,1,2\nb3,0,1,0\n",
     r"counts\.csv, line 3: count of class 'cat' -1 for bag 'b2' is negative"),
    (MULTI_INSTANCES.replace("b3,dog", "b3,horse"), MULTI_COUNTS,
     r"inst\.csv, line 6: label must be a class name \(cat, dog, Cow\) or its number 0..2, got 'horse'"),
    (MULTI_INSTANCES, "bag,cat,cat\nb1,1,1\n", r"counts\.csv, line 1: column 'cat' appears twice"),
    (MULTI_INSTANCES, "bag,cat,dog,Cow,count\nb1,1,1,0,2\n", r"counts\.csv, line 1: the header has a 'count' "
                                                               r"column and other columns \(cat, dog, Cow\)"),
    (MULTI_INSTANCES.replace("b3,dog", "b3,01"), MULTI_COUNTS, r"line 6: label must be a class name.*got '01'"),
    (MULTI_INSTANCES, "bag,cat\nb1,2\n", r"counts\.csv, line 1: missing column 'count'.*bag,CLASS1,CLASS2"),
])
def test_manifest_multiclass_errors(tmp_path, instances, counts, match):
    inst, cnt = write_manifest(tmp_path, instances, counts)
    with pytest.raises(DataError, match=match):
        load_manifest(inst, cnt)


def test_manifest_needs_counts_file(tmp_path):
    inst, _ = write_manifest(tmp_path, GOOD_INSTANCES, GOOD_COUNTS)
    with pytest.raises(DataError, match="--counts-file"):
        load_dataset("manifest", data_root=inst)
    with pytest.raises(DataError, match=r"nope\.csv: counts file not found"):
        load_manifest(inst, str(tmp_path / "nope.csv"))
