"""Small generated data sets in every layout vpeft reads, learnable by a tiny model in a few steps.

Class ``c`` images are noise around a colour (or gray level) of their own, so a 2-epoch run on a
tiny ViT separates them well above chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.data import write_idx, write_list_split

TINY_MODEL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


def make_images(n: int, classes: int, size: int = 16, gray: bool = False,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, H, W[, 3]) and labels cycling through ``classes``; the class colours
    are the same for every ``seed`` (split), the noise is not."""
    palette = np.random.default_rng(1234).integers(0, 256, size=(classes, 1 if gray else 3))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    noise = rng.normal(0, 25, size=(n, size, size, palette.shape[1]))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return (images[..., 0] if gray else images), labels


def write_list_dataset(root: Path, sizes: dict[str, int] | None = None, classes: int = 4,
                       gray: bool = False) -> Path:
    """VTAB-1k layout: ``images/<split>/NNNNNN.png``, ``<split>.txt``, ``classes.txt``;
    ``train800val200.txt`` is ``train800.txt`` + ``val200.txt`` as in VTAB-1k."""
    sizes = sizes or {"train800": 48, "val200": 16, "test": 20}
    for i, (split, n) in enumerate(sizes.items()):
        write_list_split(root, split, *make_images(n, classes, gray=gray, seed=i))
    if "train800" in sizes and "val200" in sizes:
        joined = (root / "train800.txt").read_text() + (root / "val200.txt").read_text()
        (root / "train800val200.txt").write_text(joined)
    (root / "classes.txt").write_text("".join(f"class_{c}\n" for c in range(classes)))
    return root


def write_folder_dataset(root: Path, sizes: dict[str, int] | None = None, classes: int = 3,
                         ext: str = ".jpg") -> Path:
    """Image folders: ``<split>/<class name>/<n><ext>``."""
    sizes = sizes or {"train": 24, "test": 12}
    names = ["cat", "dog", "emu", "fox", "gnu"][:classes]
    for i, (split, n) in enumerate(sizes.items()):
        images, labels = make_images(n, classes, seed=10 + i)
        for j, (img, label) in enumerate(zip(images, labels)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{j:04d}{ext}")
    return root


def write_idx_dataset(root: Path, sizes: dict[str, int] | None = None, classes: int = 4,
                      gz: bool = True) -> Path:
    """Fashion-MNIST file names: ``train-images-idx3-ubyte.gz`` ..., the test split as t10k."""
    sizes = sizes or {"train": 32, "t10k": 12}
    ext = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        images, labels = make_images(n, classes, size=28, gray=True, seed=20 + i)
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
    return root
