"""Segmentation data: both layouts, joint transforms, up-front checks, the generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.cli import main
from vpeft.data import (
    IGNORE_INDEX,
    DataError,
    SegEvalTransform,
    SegTrainTransform,
    collate_segmentation,
    open_segmentation_dataset,
)
from vpeft.data.synthetic_seg import HIGH, LOW, SegSpec, make_seg_data, paste

from conftest import DATA

PLAIN = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # mean, std that leave pixels in [0, 1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated task without sources (drawn shapes on colour blocks), PNG images."""
    out = tmp_path_factory.mktemp("shapes")
    make_seg_data(out, {"train": 8, "val": 3, "test": 3}, SegSpec(size=48, fmt="png"), seed=3)
    return out


@pytest.fixture
def data(shapes: Path, tmp_path: Path) -> Path:
    """A private copy of the generated task, to be broken by a test."""
    return Path(shutil.copytree(shapes, tmp_path / "data"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def test_folders_layout_reads_every_pair_as_files_hold_it(shapes: Path) -> None:
    ds = open_segmentation_dataset(shapes, "train")
    assert (ds.layout, len(ds), ds.classes[0], ds.num_classes) == ("folders", 8, "background", 7)
    assert ds.describe()["classes"] == (shapes / "classes.txt").read_text().split()
    image, mask = ds[2]
    assert image.dtype == torch.float32 and mask.dtype == torch.int64
    raw = _pixels(shapes / "img_dir/train/000002.png")
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    assert torch.equal(mask, torch.from_numpy(_pixels(shapes / "ann_dir/train/000002.png")).long())


def test_list_layouts_select_the_named_pairs(data: Path) -> None:
    # pairs list at the root, paths relative to it
    (data / "pairs.txt").write_text("img_dir/val/000001.png ann_dir/val/000001.png\n\n"
                                    "img_dir/train/000004.png ann_dir/train/000004.png\n")
    ds = open_segmentation_dataset(data, "pairs")
    assert ds.layout == "list" and len(ds) == 2
    want = torch.from_numpy(_pixels(data / "ann_dir/train/000004.png")).long()
    assert torch.equal(ds[1][1], want)
    # names list selecting a subset of a folder split
    (data / "train.txt").write_text("000005\n000001\n")
    sub = open_segmentation_dataset(data, "train")
    assert sub.layout == "folders" and [p.name for p in sub.images] == ["000005.png", "000001.png"]


def _blocks(seed: int, h: int = 40, w: int = 56) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """An image of 8x8 blocks, each one colour of a palette, and its mask derived from the image:
    block colour k <-> class value ``values[k]`` (0, 3, 7: values that interpolation would mix)."""
    rng = np.random.default_rng(seed)
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250]], np.uint8)
    values = np.array([0, 3, 7], np.uint8)
    k = rng.integers(0, 3, (h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(palette[k]), Image.fromarray(values[k]), palette


def _class_from_image(image: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """The class value each pixel's colour says, or -1 where it is a blend of colours (an edge)."""
    pal = torch.from_numpy(palette).float().T[:, :, None, None] / 255  # (3, K, 1, 1)
    dist = (image[:, None] - pal).abs().amax(0)  # (K, H, W)
    best = dist.argmin(0)
    out = torch.tensor([0, 3, 7])[best]
    return torch.where(dist.amin(0) < 0.02, out, torch.full_like(out, -1))


def test_train_transform_moves_image_and_mask_together_and_keeps_mask_values() -> None:
    t = SegTrainTransform(32, *PLAIN, scale=(0.5, 2.0), seed=None)
    checked, padded = 0, 0
    torch.manual_seed(0)
    for seed in range(12):
        img, m, palette = _blocks(seed)
        image, mask = t(img, m)
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 3, 7, IGNORE_INDEX}  # nearest: nothing mixed
        said = _class_from_image(image, palette)
        pure = said >= 0
        assert torch.equal(said[pure], mask[pure])  # every pure-colour pixel has its own class
        pad = mask == IGNORE_INDEX
        assert torch.all(image[:, pad] == 0)  # padding is padding in both
        checked += int(pure.sum())
        padded += int(pad.sum())
    assert checked > 12 * 32 * 32 * 0.5 and padded > 0  # the test saw real crops and padding


def test_train_transform_flips_both() -> None:
    img, m, palette = _blocks(1, 32, 32)
    t = SegTrainTransform(32, *PLAIN, scale=(1.0, 1.0), seed=None)
    seen = set()
    for s in range(8):
        torch.manual_seed(s)
        image, mask = t(img, m)
        flipped = torch.equal(mask, torch.from_numpy(np.array(m)).long().flip(-1))
        seen.add(flipped)
        assert torch.equal(_class_from_image(image, palette), mask)
    assert seen == {True, False}


def test_eval_transforms_keep_the_full_resolution_mask() -> None:
    img, m, _ = _blocks(2, 40, 56)
    full = torch.from_numpy(np.array(m)).long()
    image, mask = SegEvalTransform(32, *PLAIN)(img, m)
    assert image.shape == (3, 32, 32) and torch.equal(mask, full)
    image, mask = SegEvalTransform(32, *PLAIN, mode="slide")(img, m)
    assert image.shape == (3, 32, 44) and torch.equal(mask, full)  # short side 32: 56 * 32 / 40
    with pytest.raises(ValueError, match="mode"):
        SegEvalTransform(32, *PLAIN, mode="crop")


def test_collate_pads_images_with_zero_and_masks_with_ignore() -> None:
    a = (torch.ones(3, 4, 6), torch.zeros(5, 7, dtype=torch.long))
    b = (torch.ones(3, 5, 5), torch.ones(6, 9, dtype=torch.long))
    images, masks = collate_segmentation([a, b])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 6, 9)
    assert images[0, :, 4].eq(0).all() and images[1, :, :, 5:].eq(0).all()
    assert images[0, :, :4, :6].eq(1).all()
    assert masks[0, 5:].eq(IGNORE_INDEX).all() and masks[0, :, 7:].eq(IGNORE_INDEX).all()
    assert masks[0, :5, :7].eq(0).all() and masks[1].eq(1).all()


def test_random_draws_depend_on_seed_epoch_and_index_only(shapes: Path) -> None:
    ds = open_segmentation_dataset(shapes, "train")
    ds.transform = SegTrainTransform(32, *PLAIN, seed=5)
    before = torch.get_rng_state()
    first = ds[3]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    torch.manual_seed(123)
    again = ds[3]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], first[0])
    plain, mirror = (open_segmentation_dataset(shapes, "train") for _ in range(2))
    mirror.hflip_seed = 0  # honoured: the pair is mirrored, jointly, for about half the indices
    flipped = []
    for i in range(8):
        (image, mask), (image_m, mask_m) = plain[i], mirror[i]
        flipped.append(not torch.equal(mask, mask_m))
        if flipped[-1]:
            assert torch.equal(mask.flip(-1), mask_m) and torch.equal(image.flip(-1), image_m)
    assert any(flipped) and not all(flipped)


def _expect(data: Path, split: str, *patterns: str, **kwargs) -> None:
    with pytest.raises(DataError) as e:
        open_segmentation_dataset(data, split, **kwargs)
    for p in patterns:
        assert p in str(e.value), (p, str(e.value))


def test_a_missing_mask_or_image_names_the_file(data: Path) -> None:
    Image.new("RGB", (48, 48)).save(data / "img_dir/train/000002.jpg")
    _expect(data, "train", "000002.jpg", "000002.png", "share the name")
    (data / "img_dir/train/000002.jpg").unlink()
    (data / "ann_dir/train/000002.png").unlink()
    _expect(data, "train", "000002.png", "has no mask")
    (data / "img_dir/val/000001.png").unlink()
    _expect(data, "val", "ann_dir/val/000001.png", "has no image")
    (data / "test.txt").write_text("000000\n000009\n")
    _expect(data, "test", "test.txt:2", "000009")
    (data / "pairs.txt").write_text("img_dir/test/000000.png ann_dir/test/000404.png\n")
    _expect(data, "pairs", "pairs.txt:1", "ann_dir/test/000404.png", "not found")
    (data / "pairs.txt").write_text("img_dir/test/000000.png\n")
    _expect(data, "pairs", "pairs.txt:1", "<image path> <mask path>")


def test_a_mask_of_another_size_or_value_names_the_file(data: Path) -> None:
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(data / "ann_dir/train/000003.png")
    _expect(data, "train", "ann_dir/train/000003.png", "40x48", "48x48")
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(data / "ann_dir/val/000000.png")
    _expect(data, "val", "ann_dir/val/000000.png", "value 7", "0..6")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(data / "ann_dir/test/000001.png")
    _expect(data, "test", "ann_dir/test/000001.png", "mode RGB")
    # a palette mask's pixels are the palette indices, as in VOC: valid here
    pal = Image.fromarray(np.full((48, 48), 6, np.uint8)).convert("P")
    pal.putpalette([0] * 768)
    pal.save(data / "ann_dir/test/000001.png")
    assert open_segmentation_dataset(data, "test")[1][1].eq(6).all()
    # unchecked, the file names still match and the bad mask only shows when read
    assert len(open_segmentation_dataset(data, "train", check=False)) == 8


def test_unreadable_files_name_the_file(data: Path) -> None:
    (data / "ann_dir/train/000001.png").write_bytes(b"not a png")
    _expect(data, "train", "cannot read mask", "ann_dir/train/000001.png")
    (data / "img_dir/val/000002.png").write_bytes(b"")
    _expect(data, "val", "cannot read image", "img_dir/val/000002.png")
    png = (data / "img_dir/test/000000.png").read_bytes()
    (data / "img_dir/test/000000.png").write_bytes(png[: len(png) // 2])  # header intact
    ds = open_segmentation_dataset(data, "test")
    with pytest.raises(DataError, match=r"img_dir/test/000000\.png"):
        ds[0]


def test_splits_and_classes_are_checked(data: Path) -> None:
    _expect(data, "training", "no split 'training'", "test, train, val")
    for f in (data / "img_dir/val").iterdir():
        f.unlink()
    for f in (data / "ann_dir/val").iterdir():
        f.unlink()
    _expect(data, "val", "holds no images")
    classes = (data / "classes.txt").read_text().split()
    assert open_segmentation_dataset(data, "test", classes=classes).classes == classes
    _expect(data, "test", "differ", classes=["background", "cat"])
    (data / "classes.txt").unlink()
    _expect(data, "test", "classes.txt not found")
    assert open_segmentation_dataset(data, "test", classes=classes).num_classes == 7


def test_generator_masks_agree_with_the_pasted_objects(shapes: Path) -> None:
    records = json.loads((shapes / "objects.json").read_text())
    assert [len(records[s]) for s in ("train", "val", "test")] == [8, 3, 3]
    for split, items in records.items():
        for item in items:
            image = _pixels(shapes / f"img_dir/{split}/{item['image']}.png").astype(int)
            mask = _pixels(shapes / f"ann_dir/{split}/{item['image']}.png")
            inside = np.zeros(mask.shape, bool)
            for obj in item["objects"]:
                x0, y0, x1, y1 = obj["box"]
                inside[y0:y1, x0:x1] = True
            assert (mask[~inside] == 0).all()  # nothing labelled outside every object
            for obj in item["objects"]:
                x0, y0, x1, y1 = obj["box"]
                box = np.zeros(mask.shape, bool)
                box[y0:y1, x0:x1] = True
                mine = box & (mask == obj["class"])
                assert ((mask == obj["class"]) & ~inside).sum() == 0
                if mine.any():  # visible: its pixels are its colour (opacity >= HIGH)
                    err = np.abs(image[mine] - np.array(obj["colour"])).max(1)
                    assert np.median(err) < 20
            assert set(np.unique(mask).tolist()) <= {0, IGNORE_INDEX} | set(range(1, 7))
    assert len(open_segmentation_dataset(shapes, "val")) == 3


def test_paste_labels_by_opacity() -> None:
    image = np.zeros((4, 6, 3), np.float32)
    mask = np.full((4, 6), 9, np.uint8)
    alpha = np.array([[0.0, LOW / 2, (LOW + HIGH) / 2], [HIGH, 1.0, 1.0]], np.float32)
    paste(image, mask, alpha, np.array([100.0, 200.0, 50.0]), 4, 1, 2)
    assert mask[1:3, 2:5].tolist() == [[9, 9, IGNORE_INDEX], [4, 4, 4]]
    assert (mask[0] == 9).all() and (mask[:, :2] == 9).all()
    assert np.allclose(image[2, 3], [100, 200, 50]) and np.allclose(image[1, 2], 0)


def test_generator_is_deterministic(tmp_path: Path, shapes: Path) -> None:
    make_seg_data(tmp_path / "a", {"train": 8, "val": 3, "test": 3}, SegSpec(size=48, fmt="png"),
                  seed=3)
    for f in sorted((shapes).rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "a" / f.relative_to(shapes)).read_bytes(), f
    make_seg_data(tmp_path / "b", {"train": 2}, SegSpec(size=48, fmt="png"), seed=4)
    assert (tmp_path / "b/ann_dir/train/000000.png").read_bytes() != \
        (shapes / "ann_dir/train/000000.png").read_bytes()


def test_cli_writes_jpg_task_and_refuses_bad_input(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "seg"
    assert main(["make-seg-data", "--out", str(out), "--images", "3", "1", "1", "--size", "32",
                 "--max-classes", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == ["background", "disk", "square"]
    assert summary["images"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(p.name for p in (out / "img_dir/train").iterdir())[0] == "000000.jpg"
    assert open_segmentation_dataset(out, "train").num_classes == 3
    assert main(["make-seg-data", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["make-seg-data", "--out", str(tmp_path / "x"), "--objects", str(out)]) == 2
    assert "has no train800.txt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "cifar10").is_dir(),
                    reason=f"real VTAB-1k folders not found in {DATA}")
def test_real_digits_and_items_on_cifar(tmp_path: Path) -> None:
    summary = make_seg_data(tmp_path, {"train": 6, "val": 2}, SegSpec(size=64, max_classes=11),
                            background=DATA / "cifar10",
                            objects=[DATA / "mnist", DATA / "fashion_mnist"], seed=1)
    assert summary["classes"][:3] == ["background", "mnist:0", "mnist:1"]
    assert summary["classes"][-2:] == ["mnist:9", "fashion_mnist:T-shirt/top"]
    ds = open_segmentation_dataset(tmp_path, "train")
    assert ds.num_classes == 12
    masks = torch.stack([ds[i][1] for i in range(6)])
    assert (masks > 0).any() and ((masks < 12) | (masks == IGNORE_INDEX)).all()
    records = json.loads((tmp_path / "objects.json").read_text())["train"]
    sources = [o["source"] for r in records for o in r["objects"]]
    assert all("/images/train800/" in s for s in sources)
