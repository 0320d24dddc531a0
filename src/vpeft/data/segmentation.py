"""Semantic segmentation data: images with one class index per pixel, in two on-disk layouts.

* **Folders** (mmsegmentation's layout): ``<root>/img_dir/<split>/<name>.<jpg|png>`` and
  ``<root>/ann_dir/<split>/<name>.png``; an optional ``<root>/<split>.txt`` of names (one a line)
  selects a subset of the split.
* **List**: ``<root>/<split>.txt`` of ``<image path> <mask path>`` lines, paths relative to root.

Both need ``<root>/classes.txt`` (one class name a line; the index is the line). A mask is an 8-bit
single-channel PNG (gray or palette) whose pixels are class indices, or ``255`` (ignored by the
loss and the metric). Opening a split checks every pair up front (each mask is decoded, each image
only has its header read): an image without a mask, a mask without an image, sizes that differ, a
value that is neither a class nor 255, or an unreadable file are a :class:`DataError` naming the
file. A truncated image body is only found when the image is read, and is a ``DataError`` too.

Joint transforms (:class:`SegTrainTransform`, :class:`SegEvalTransform`) are torchvision's v2
transforms over an ``(Image, Mask)`` pair: one random draw moves both, and masks are always resized
with nearest neighbour (torchvision's rule for ``tv_tensors.Mask``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as nnf
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from vpeft.data.datasets import (
    CLASSES_FILE,
    IMAGE_EXTENSIONS,
    DataError,
    _check_classes,
    _coin,
    read_classes,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMG_DIR, ANN_DIR = "img_dir", "ann_dir"
MASK_MODES = ("L", "P")  # 8-bit gray, or palette (the pixel is the palette index, as in VOC)

JointTransform = Callable[[Image.Image, Image.Image], tuple[Tensor, Tensor]]


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs of one split, decoded lazily.

    Without a ``transform`` an item is a float ``(3, H, W)`` image in ``[0, 1]`` and a long
    ``(H, W)`` mask. ``transform`` maps the PIL pair jointly (see :class:`SegTrainTransform`);
    a transform with an integer ``seed`` attribute runs with torch's CPU generator seeded from
    ``(seed, epoch, index)``, so its random draws do not depend on worker processes or on where
    a run was resumed (:meth:`set_epoch` moves to the next epoch's draws). With ``hflip_seed``
    set, pairs are also mirrored with probability 1/2, decided the same way.
    """

    def __init__(self, root: Path, split: str, layout: str, classes: list[str],
                 images: list[Path], masks: list[Path], origins: list[str]) -> None:
        self.root, self.split, self.layout, self.classes = root, split, layout, classes
        self.images, self.masks, self.origins = images, masks, origins
        self.transform: JointTransform | None = None
        self.hflip_seed: int | None = None
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, i: int) -> tuple[Image.Image, Image.Image]:
        """The RGB image and the mask of pair ``i`` as PIL images."""
        return _read_image(self.images[i], self.origins[i]), _read_mask(self.masks[i])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(i)
        if self.hflip_seed is not None and _coin(self.hflip_seed, self.epoch, i):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.transform is None:
            tensor = v2.functional.to_dtype(v2.functional.to_image(image), scale=True)
            return tensor.as_subclass(Tensor), _as_long(mask)
        seed = getattr(self.transform, "seed", None)
        if seed is None:
            return self.transform(image, mask)
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's stays untouched
            torch.default_generator.manual_seed(_sample_seed(seed, self.epoch, i))
            return self.transform(image, mask)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "layout": self.layout,
                "images": len(self), "num_classes": self.num_classes, "classes": self.classes}

    def __repr__(self) -> str:
        d = self.describe()
        d["classes"] = d["classes"][:5] + (["..."] if self.num_classes > 5 else [])
        return f"SegmentationDataset({', '.join(f'{k}={v!r}' for k, v in d.items())})"


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def _as_long(mask: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def _read_image(path: Path, origin: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} (from {origin}): {e}") from None


def _read_mask(path: Path) -> Image.Image:
    """A mask as an 8-bit PIL image, palette masks kept as indices (mode ``L`` after this)."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if img.mode not in MASK_MODES:
        raise DataError(f"mask {path} has mode {img.mode}; expected a single-channel 8-bit PNG "
                        "(mode L or P) of class indices")
    return Image.fromarray(np.asarray(img)) if img.mode == "P" else img


def _image_size(path: Path, origin: str) -> tuple[int, int]:
    """``(width, height)`` from the header alone (PIL decodes lazily)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} (from {origin}): {e}") from None


def segmentation_splits(root: str | Path) -> list[str]:
    """Every split in ``root``: the sub-folders of ``img_dir`` and the ``<split>.txt`` lists."""
    root = Path(root)
    folders = [p.name for p in (root / IMG_DIR).iterdir() if p.is_dir()] \
        if (root / IMG_DIR).is_dir() else []
    lists = [p.stem for p in root.glob("*.txt") if p.name != CLASSES_FILE]
    return sorted({*folders, *lists})


def open_segmentation_dataset(root: str | Path, split: str, classes: list[str] | None = None,
                              check: bool = True) -> SegmentationDataset:
    """Open ``split`` of the segmentation data set in ``root`` (either layout, see the module).

    ``classes`` (those a model was trained with) must equal the data's ``classes.txt``.
    ``check`` decodes every mask and reads every image header up front (milliseconds a pair),
    so that bad data stops a run before it starts; without it only the file names are matched.
    """
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise DataError(f"data {root} is a file, expected a folder ({IMG_DIR}/, {ANN_DIR}/ "
                            "and classes.txt, or list files)")
        raise FileNotFoundError(f"data folder {root} does not exist")
    own = read_classes(root)
    if own is None and classes is None:
        raise DataError(f"{root / CLASSES_FILE} not found: write the class names there, one a "
                        "line (line i names the pixels of value i; 255 is ignored)")
    classes = _check_classes(root, own, classes)
    list_file = root / f"{split}.txt"
    if (root / IMG_DIR / split).is_dir():
        layout = "folders"
        images, masks, origins = _folder_pairs(root, split, list_file if list_file.is_file()
                                               else None)
    elif list_file.is_file():
        layout = "list"
        images, masks, origins = _list_pairs(root, list_file)
    else:
        raise DataError(f"no split '{split}' in {root}: expected {IMG_DIR}/{split}/ with "
                        f"{ANN_DIR}/{split}/, or a list file {split}.txt; splits found there: "
                        f"{', '.join(segmentation_splits(root)) or 'none'}")
    if not images:
        raise DataError(f"split '{split}' of {root} holds no images")
    if check:  # PIL decodes without the GIL: threads make this scale with the cores
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            # map yields in order, so the error raised is that of the first bad pair
            list(pool.map(_check_pair, images, masks, origins, [len(classes)] * len(images)))
    ds = SegmentationDataset(root, split, layout, classes, images, masks, origins)
    logger.debug("opened %r", ds)
    return ds


def _folder_pairs(root: Path, split: str, names_file: Path | None
                  ) -> tuple[list[Path], list[Path], list[str]]:
    img_dir, ann_dir = root / IMG_DIR / split, root / ANN_DIR / split
    if not ann_dir.is_dir():
        raise DataError(f"{img_dir} has no mask folder {ann_dir}")
    found: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in found:
                raise DataError(f"images {found[p.stem]} and {p} share the name of one mask")
            found[p.stem] = p
    masks = {p.stem: p for p in ann_dir.glob("*.png")}
    if names_file is None:
        names = sorted(found)
        orphans = sorted(set(masks) - set(found))
        if orphans:
            raise DataError(f"mask {masks[orphans[0]]} has no image in {img_dir}"
                            + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
        origins = [f"{img_dir}" for _ in names]
    else:
        lines = [(n, line.strip()) for n, line in
                 enumerate(names_file.read_text().splitlines(), start=1) if line.strip()]
        names = [name for _, name in lines]
        origins = [f"{names_file}:{n}" for n, _ in lines]
        for name, origin in zip(names, origins):
            if name not in found:
                raise DataError(f"{origin}: no image named {name!r} in {img_dir}")
    for name, origin in zip(names, origins):
        if name not in masks:
            raise DataError(f"image {found[name]} has no mask {ann_dir / name}.png"
                            + (f" (from {origin})" if names_file else ""))
    return [found[n] for n in names], [masks[n] for n in names], origins


def _list_pairs(root: Path, list_file: Path) -> tuple[list[Path], list[Path], list[str]]:
    images, masks, origins = [], [], []
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{n}"
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{where}: expected '<image path> <mask path>', got {line!r}")
        image, mask = root / parts[0], root / parts[1]
        for path, what in ((image, "image"), (mask, "mask")):
            if not path.is_file():
                raise DataError(f"{where}: {what} {path} not found")
        images.append(image)
        masks.append(mask)
        origins.append(where)
    return images, masks, origins


def _check_pair(image: Path, mask_path: Path, origin: str, num_classes: int) -> None:
    """Raise a :class:`DataError` naming the file when the pair cannot be trained on."""
    size = _image_size(image, origin)
    mask = _read_mask(mask_path)
    if mask.size != size:
        raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                        f"{image} is {size[0]}x{size[1]} (width x height)")
    values = np.asarray(mask)
    if values.max() < num_classes:
        return
    counts = np.bincount(values.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[num_classes:])
    if len(bad):
        raise DataError(f"mask {mask_path} holds value {num_classes + bad[0]} in "
                        f"{counts[num_classes + bad[0]]} pixels, neither a class index "
                        f"(0..{num_classes - 1}) nor {IGNORE_INDEX} (ignore)")


# ---- joint transforms ---------------------------------------------------------------------------

def _to_pair(image: Image.Image, mask: Image.Image) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return v2.functional.to_image(image), tv_tensors.Mask(torch.from_numpy(np.array(mask)))


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8 image -> normalised float, mask -> long (its values unchanged)."""
    return [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                        "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))]


class SegTrainTransform:
    """Random scale, random crop to ``size x size`` and horizontal flip, applied to image and mask
    together (the usual segmentation recipe, e.g. mmsegmentation's ``RandomResize`` +
    ``RandomCrop`` + ``RandomFlip``).

    ``scale = (lo, hi)``: the short side is resized to a random length in
    ``[lo * size, hi * size]`` (aspect kept; image bilinear, mask nearest), then a random
    ``size x size`` window is cut; where the scaled image is smaller than the window it is padded
    (image 0, mask :data:`IGNORE_INDEX`, so padding never counts). ``seed``: see
    :class:`SegmentationDataset`; ``None`` draws from torch's global generator.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                 seed: int | None = 0) -> None:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < low <= high, got {scale}")
        self.size, self.scale, self.hflip, self.seed = size, tuple(scale), hflip, seed
        low, high = max(1, round(scale[0] * size)), max(1, round(scale[1] * size))
        steps: list[v2.Transform] = [
            v2.RandomResize(low, high + 1, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True,
                          fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.pipeline = v2.Compose(steps + _finish(mean, std))

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        img, m = self.pipeline(*_to_pair(image, mask))
        return img.as_subclass(Tensor), m.as_subclass(Tensor)

    def __repr__(self) -> str:
        return (f"SegTrainTransform(size={self.size}, scale={self.scale}, hflip={self.hflip}, "
                f"seed={self.seed})")


class SegEvalTransform:
    """Evaluation: the image resized (``"resize"``: to ``size x size``; ``"slide"``: short side
    ``size``, aspect kept, for sliding-window inference) and normalised; the mask is returned at
    its full original resolution, untouched, so that predictions are scored there."""

    MODES = ("resize", "slide")

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 mode: str = "resize") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.size, self.mode = size, mode
        resize = v2.Resize((size, size) if mode == "resize" else size, antialias=True)
        self.image = v2.Compose([resize, *_finish(mean, std)])

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        return self.image(v2.functional.to_image(image)).as_subclass(Tensor), _as_long(mask)

    def __repr__(self) -> str:
        return f"SegEvalTransform(size={self.size}, mode={self.mode!r})"


def _pad_stack(tensors: Sequence[Tensor], value: float) -> Tensor:
    """Stack tensors whose last two dims differ, padding right and bottom with ``value``."""
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    return torch.stack([nnf.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)
                        for t in tensors])


def collate_segmentation(batch: Sequence[tuple[Tensor, Tensor]],
                         mask_pad: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(B, C, H, W)`` images and ``(B, Hm, Wm)`` long masks. Images of different sizes (eval
    ``"slide"``) are padded right/bottom with 0 (the normalised mean, not black); masks with
    ``mask_pad`` to the largest mask: :data:`IGNORE_INDEX` by default, so that padding is never
    scored; vpeft's segmentation task pads with -1 instead, which tells each mask's own size
    (and so the part of the padded image that is the image) apart from ignored pixels."""
    images, masks = zip(*batch, strict=True)
    return _pad_stack(images, 0.0), _pad_stack([m.long() for m in masks], mask_pad)
