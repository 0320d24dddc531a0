"""Image classification data sets in three on-disk layouts, behind one :class:`ImageDataset`.

* **VTAB-1k list files** (NOAH / V-PETL-Bench): ``<root>/<split>.txt`` with lines
  ``images/<split>/000000.png <label>`` (paths relative to ``root``) and ``<root>/classes.txt``.
* **Image folders**: ``<root>/<split>/<class>/*.png|jpg|...``; classes are the folder names, sorted.
* **idx files** (MNIST, Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs them):
  ``<root>/<split>-images-idx3-ubyte.gz`` + ``-labels-idx1-ubyte.gz``; ``test`` also finds ``t10k``.

The layout is detected from what exists for the split. Problems are found when the data set is
opened (missing files, bad labels), or when an image is read (unreadable file), and reported with
the file and line they come from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vpeft.data.idx import IdxError, find_idx_pair, idx_splits, read_idx

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CLASSES_FILE = "classes.txt"


class DataError(ValueError):
    """A data set is malformed: a bad list line, a missing or unreadable image, a bad label."""


class ImageDataset(Dataset):
    """``(image tensor, label)`` pairs of one split; images are decoded lazily.

    ``sources[i]`` is a file path, or ``None`` when the pixels are in ``arrays`` (idx files);
    ``origins[i]`` says where sample ``i`` was declared (``test.txt:12``) for error messages.
    ``transform`` maps a PIL image to a tensor; with ``hflip_seed`` set, images are mirrored with
    probability 1/2, decided by ``(seed, epoch, index)`` so that the choice does not depend on
    worker processes or on where a run was resumed.
    """

    def __init__(self, root: Path, split: str, layout: str, classes: list[str], labels: list[int],
                 origins: list[str], sources: list[Path] | None = None,
                 arrays: np.ndarray | None = None) -> None:
        self.root, self.split, self.layout = root, split, layout
        self.classes, self.labels, self.origins = classes, labels, origins
        self.sources, self.arrays = sources, arrays
        self.transform: Callable[[Image.Image], Any] | None = None
        self.mode = "RGB"  # gray images become 3 channels
        self.hflip_seed: int | None = None
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, i: int) -> Image.Image:
        """The image of sample ``i`` as a PIL image in ``self.mode``."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert(self.mode)
        path = self.sources[i]
        try:
            with Image.open(path) as img:
                return img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} (from {self.origins[i]}): {e}") from None

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.load(i)
        if self.hflip_seed is not None and _coin(self.hflip_seed, self.epoch, i):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "layout": self.layout,
                "images": len(self), "num_classes": self.num_classes}

    def __repr__(self) -> str:
        d = self.describe()
        return f"ImageDataset({', '.join(f'{k}={v!r}' for k, v in d.items())})"


def _coin(seed: int, epoch: int, index: int) -> bool:
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


def open_dataset(root: str | Path, split: str, classes: list[str] | None = None) -> ImageDataset:
    """Open ``split`` of the data set in folder ``root``, detecting its layout.

    ``classes`` (e.g. those a model was trained with) fixes the class list; otherwise it comes from
    ``classes.txt``, the class folders, or the largest label.
    """
    root = Path(root)
    if root.is_file():
        raise DataError(f"data {root} is a file, expected a folder (of list files, class folders "
                        "or idx files)")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / f"{split}.txt").is_file():
        ds = _open_list(root, split, classes)
    elif (root / split).is_dir():
        ds = _open_folders(root, split, classes)
    elif find_idx_pair(root, split):
        ds = _open_idx(root, split, classes)
    else:
        raise DataError(
            f"no split '{split}' in {root}: expected {split}.txt (VTAB-1k list file), "
            f"{split}/<class>/<image> (image folders) or {split}-images-idx3-ubyte[.gz] (idx "
            f"files); splits found there: {', '.join(available_splits(root)) or 'none'}"
        )
    if len(ds) == 0:
        raise DataError(f"split '{split}' of {root} holds no images")
    logger.debug("opened %r", ds)
    return ds


def available_splits(root: str | Path) -> list[str]:
    """Every split name found in ``root`` in any of the three layouts."""
    root = Path(root)
    lists = [p.stem for p in root.glob("*.txt") if p.name != CLASSES_FILE]
    # with list files, sub-folders hold their images (images/<split>/), not classes
    folders = [] if lists else [p.name for p in root.iterdir() if p.is_dir() and _class_dirs(p)]
    return sorted({*lists, *folders, *idx_splits(root)})


def read_classes(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_classes(root: Path, own: list[str] | None, given: list[str] | None) -> list[str] | None:
    if own is not None and given is not None and own != given:
        raise DataError(
            f"the classes of {root} ({len(own)}: {own[:5]}...) differ from the expected "
            f"{len(given)} classes ({given[:5]}...)"
        )
    return given if given is not None else own


def read_list(root: Path, split: str, classes: list[str] | None, what: str = "image",
              exists: Callable[[Path], bool] = Path.is_file
              ) -> tuple[list[str], list[Path], list[int], list[str]]:
    """``(classes, paths, labels, origins)`` of list file ``<root>/<split>.txt`` (lines
    ``<path relative to root> <label>``): every path exists (``exists``), every label is in
    range; otherwise a :class:`DataError` names the line."""
    list_file = root / f"{split}.txt"
    classes = _check_classes(root, read_classes(root), classes)
    labels: list[int] = []
    origins: list[str] = []
    sources: list[Path] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{lineno}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}: expected '<{what} path> <integer label>', got {line!r}")
        sources.append(root / parts[0])
        labels.append(int(parts[1]))
        origins.append(where)
    missing = [i for i, p in enumerate(sources) if not exists(p)]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{origins[missing[0]]}: {what} {sources[missing[0]]} not found{more}")
    if classes is None:  # no classes.txt: as many classes as the largest label in any list says
        top = max((_max_label(p) for p in root.glob("*.txt")), default=-1)
        classes = [str(i) for i in range(max(top, max(labels, default=-1)) + 1)]
    for i, label in enumerate(labels):
        if not 0 <= label < len(classes):
            raise DataError(f"{origins[i]}: label {label} is out of range for "
                            f"{len(classes)} classes ({root / CLASSES_FILE})")
    return classes, sources, labels, origins


def write_list_split(root: str | Path, split: str, images: Any, labels: Any) -> Path:
    """Write ``images`` (uint8 arrays) as ``images/<split>/NNNNNN.png`` and their ``labels`` as
    the list file ``<split>.txt``: the VTAB-1k layout :func:`open_dataset` reads (generators,
    tests and tools)."""
    root = Path(root)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for j, (img, label) in enumerate(zip(images, labels)):
        rel = f"images/{split}/{j:06d}.png"
        Image.fromarray(img).save(root / rel)
        lines.append(f"{rel} {int(label)}\n")
    (root / f"{split}.txt").write_text("".join(lines))
    return root / f"{split}.txt"


def _open_list(root: Path, split: str, classes: list[str] | None) -> ImageDataset:
    classes, sources, labels, origins = read_list(root, split, classes)
    return ImageDataset(root, split, "vtab-list", classes, labels, origins, sources=sources)


def _max_label(list_file: Path) -> int:
    top = -1
    for line in list_file.read_text().splitlines():
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].isdigit():
            top = max(top, int(parts[1]))
    return top


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _open_folders(root: Path, split: str, classes: list[str] | None) -> ImageDataset:
    folder = root / split
    found = _class_dirs(folder)
    classes = _check_classes(root, read_classes(root), classes) or found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"class folder {folder / unknown[0]} is not one of the "
                        f"{len(classes)} classes ({', '.join(classes[:10])}...)")
    labels: list[int] = []
    sources: list[Path] = []
    for name in found:
        files = sorted(p for p in (folder / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        sources += files
        labels += [index[name]] * len(files)
    origins = [f"class folder {p.parent}" for p in sources]
    return ImageDataset(root, split, "image-folders", classes, labels, origins, sources=sources)


def _open_idx(root: Path, split: str, classes: list[str] | None) -> ImageDataset:
    images_path, labels_path = find_idx_pair(root, split)
    try:
        images, labels = read_idx(images_path), read_idx(labels_path)
    except IdxError as e:
        raise DataError(str(e)) from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) "
                        "are not N gray images and N labels")
    classes = _check_classes(root, read_classes(root), classes)
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    bad = np.flatnonzero(labels >= len(classes))
    if len(bad):
        raise DataError(f"{labels_path}: label {labels[bad[0]]} of item {bad[0]} is out of range "
                        f"for {len(classes)} classes")
    origins = [f"{images_path}[{i}]" for i in range(len(labels))]
    return ImageDataset(root, split, "idx", classes, labels.tolist(), origins, arrays=images)
