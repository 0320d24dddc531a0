"""Data sets in every layout (list files, image folders, idx), their errors, and preprocessing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen import write_folder_dataset, write_idx_dataset, write_list_dataset
from vpeft.data import (
    DataError,
    IdxError,
    available_splits,
    data_config,
    eval_transform,
    open_dataset,
    read_idx,
    write_idx,
)

from conftest import DATA, tiny_model


def _transform(size: int = 32):
    return eval_transform(data_config(tiny_model(), size))


# -- the three layouts ----------------------------------------------------------------------------
def test_list_layout(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 12, "val200": 4, "test": 6}, classes=3)
    ds = open_dataset(root, "train800val200")
    assert (ds.layout, len(ds), ds.num_classes) == ("vtab-list", 16, 3)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.labels == [int(line.split()[1]) for line in
                         (root / "train800val200.txt").read_text().splitlines()]
    ds.transform = _transform()
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.labels[0]
    assert available_splits(root) == ["test", "train800", "train800val200", "val200"]


def test_list_layout_without_classes_file_counts_labels(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 8, "val200": 4, "test": 4}, classes=4)
    (root / "classes.txt").unlink()
    assert open_dataset(root, "val200").num_classes == 4


def test_gray_images_become_three_channels(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 4, "val200": 2, "test": 2}, gray=True)
    ds = open_dataset(root, "test")
    assert Image.open(ds.sources[0]).mode == "L"
    assert ds.load(0).mode == "RGB"
    ds.transform = _transform()
    assert ds[0][0].shape == (3, 32, 32)


def test_folder_layout(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path, {"train": 9, "test": 6}, classes=3)
    ds = open_dataset(root, "train")
    assert (ds.layout, len(ds), ds.classes) == ("image-folders", 9, ["cat", "dog", "emu"])
    assert all(ds.sources[i].parent.name == ds.classes[ds.labels[i]] for i in range(len(ds)))
    # evaluation takes the training classes: a missing class folder keeps the label mapping
    for f in (root / "test" / "cat").iterdir():
        f.unlink()
    (root / "test" / "cat").rmdir()
    test = open_dataset(root, "test", classes=ds.classes)
    assert test.classes == ds.classes and 0 not in test.labels
    (root / "test" / "yak").mkdir()
    with pytest.raises(DataError, match="yak"):
        open_dataset(root, "test", classes=ds.classes)


def test_idx_layout(tmp_path: Path) -> None:
    root = write_idx_dataset(tmp_path, {"train": 10, "t10k": 6}, classes=4)
    train, test = open_dataset(root, "train"), open_dataset(root, "test")  # test finds t10k
    assert (train.layout, len(train), len(test), train.num_classes) == ("idx", 10, 6, 4)
    assert train.load(0).mode == "RGB" and train.load(0).size == (28, 28)
    train.transform = _transform(16)
    assert train[3][0].shape == (3, 16, 16)
    assert available_splits(root) == ["test", "train"]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, a)
    np.testing.assert_array_equal(read_idx(path), a)


def test_idx_errors(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x08\x00\x08\x01\x00\x00\x00\x02\x01\x02")
    with pytest.raises(IdxError, match="magic"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01\x02")
    with pytest.raises(IdxError, match="9 bytes"):
        read_idx(tmp_path / "short.gz")


# -- errors name the file and line ---------------------------------------------------------------
def test_missing_folder_and_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere", "test")
    root = write_list_dataset(tmp_path / "d", {"train800": 4, "val200": 2, "test": 2})
    with pytest.raises(DataError, match=r"no split 'train'.*train800val200"):
        open_dataset(root, "train")


def test_list_line_with_missing_file(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 4, "val200": 2, "test": 3})
    (root / "images" / "test" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"test\.txt:2: image .*000001\.png not found"):
        open_dataset(root, "test")


def test_label_out_of_range_and_bad_line(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 4, "val200": 2, "test": 3}, classes=4)
    lines = (root / "test.txt").read_text().splitlines()
    (root / "test.txt").write_text("\n".join([lines[0], lines[1].split()[0] + " 7", lines[2]]))
    with pytest.raises(DataError, match=r"test\.txt:2: label 7 is out of range for 4 classes"):
        open_dataset(root, "test")
    (root / "test.txt").write_text("\n".join([lines[0], lines[1].split()[0] + " cat"]))
    with pytest.raises(DataError, match=r"test\.txt:2: expected '<image path> <integer label>'"):
        open_dataset(root, "test")


def test_unreadable_image(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 4, "val200": 2, "test": 3})
    (root / "images" / "test" / "000002.png").write_bytes(b"not a png")
    ds = open_dataset(root, "test")  # found when read, named with its list line
    with pytest.raises(DataError, match=r"cannot read image .*000002\.png \(from .*test\.txt:3\)"):
        ds[2]


# -- preprocessing ---------------------------------------------------------------------------------
def test_transform_resizes_without_crop_and_normalises_like_the_model(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = data_config(model, 24)
    assert cfg["input_size"] == (3, 24, 24) and cfg["crop_pct"] == 1.0
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 4, 20))  # a blue band at the left edge survives: no crop
    x = eval_transform(cfg)(img)
    assert x.shape == (3, 24, 24)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    red = (torch.tensor([1.0, 0, 0]) - mean) / std
    torch.testing.assert_close(x[:, 12, 20], red, atol=1e-3, rtol=0)
    assert x[2, 12, 0] > x[0, 12, 0]
    assert data_config(model)["input_size"] == (3, 32, 32)  # the model's own size by default


def test_hflip_depends_on_seed_epoch_index_only(tmp_path: Path) -> None:
    root = write_list_dataset(tmp_path, {"train800": 16, "val200": 2, "test": 2})
    ds = open_dataset(root, "train800")
    ds.transform = _transform()
    plain = torch.stack([ds[i][0] for i in range(16)])
    ds.hflip_seed = 3
    flips = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        x = torch.stack([ds[i][0] for i in range(16)])
        flipped = [bool(torch.equal(x[i], plain[i].flip(-1))) and not torch.equal(x[i], plain[i])
                   for i in range(16)]
        flips.append(flipped)
    assert flips[0] == flips[2] and flips[0] != flips[1] and 0 < sum(flips[0]) < 16


def test_shared_vtab_tasks_open() -> None:
    for task, mode in (("cifar10", "RGB"), ("fashion_mnist", "L")):
        root = DATA / task
        if not root.is_dir():
            pytest.skip(f"VTAB-1k task {root} not found (set VPEFT_DATA)")
        ds = open_dataset(root, "train800val200")
        assert len(ds) == 1000 and ds.num_classes == 10
        assert Image.open(ds.sources[0]).mode == mode and ds.load(0).mode == "RGB"
        assert len(open_dataset(root, "test", classes=ds.classes)) == 2000
