"""The idx file format of MNIST and Fashion-MNIST (``train-images-idx3-ubyte.gz`` ...).

A big-endian header ``0 0 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data. Only
unsigned bytes (type ``0x08``) are used by these data sets, and only those are read here.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

UBYTE = 0x08


class IdxError(ValueError):
    """An idx file is truncated or not in the idx format."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 array of the shape its header gives."""
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise IdxError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype != UBYTE:
        raise IdxError(f"{path}: idx element type 0x{dtype:02x} is not supported (only ubyte)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count:
        raise IdxError(
            f"{path}: header says shape {shape} ({count} bytes) but the file holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file, gzipped if ``path`` ends in ``.gz`` (tests, tools)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def find_idx_pair(root: Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` files of ``split`` in ``root`` or None; ``test`` also finds t10k."""
    prefixes = [split] + (["t10k"] if split == "test" else [])
    for prefix in prefixes:
        for ext in (".gz", ""):
            images = root / f"{prefix}-images-idx3-ubyte{ext}"
            labels = root / f"{prefix}-labels-idx1-ubyte{ext}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def idx_splits(root: Path) -> list[str]:
    """Names of the splits that have both an images and a labels idx file in ``root``."""
    names = {p.name.split("-images-idx3-ubyte")[0] for p in root.glob("*-images-idx3-ubyte*")}
    return sorted("test" if n == "t10k" else n for n in names if find_idx_pair(root, n))
