"""Image classification: the data sets of :mod:`vpeft.data`, the backbone with its own head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpeft.data import open_dataset
from vpeft.tasks.base import Task


class ImageTask(Task):
    name = "image"

    @classmethod
    def from_options(cls, **_: Any) -> ImageTask:
        return cls()  # clip options (frames, views) do not apply to images

    def open(self, root: str | Path, split: str, classes: list[str] | None = None,
             train: bool = False, seed: int = 0) -> Any:
        return open_dataset(root, split, classes=classes)
