"""Video classification: any image backbone becomes a clip model.

:class:`ClipModel` runs the ``T`` frames of each clip through the backbone as one batch of
images, frame-major, inside :func:`~vpeft.core.temporal.clip_frames` (so temporal methods such
as AIM and ST-Adapter see the time axis), and averages the backbone's per-frame logits over
frames (and evaluation views). The backbone's heads are linear, so this is temporal mean pooling
of the pre-logit features followed by the head. It holds no parameters of its own: the adapted
backbone is what is trained, saved and loaded, exactly as for images, and every image method
runs frame-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpeft.core.temporal import clip_frames
from vpeft.tasks.base import Task


class ClipModel(nn.Module):
    """Clips ``(B, T, C, H, W)`` or views of clips ``(B, K, T, C, H, W)`` -> logits ``(B,
    classes)``, through an image ``backbone`` (timm interface) with temporal mean pooling."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @staticmethod
    def _frames(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(B * K * T, C, H, W)`` frames and ``T``."""
        if x.ndim not in (5, 6):
            raise ValueError(f"a clip batch is (B, T, C, H, W) or (B, views, T, C, H, W); got "
                             f"shape {tuple(x.shape)}")
        return x.reshape(-1, *x.shape[-3:]), x.shape[-4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features of the backbone, ``(B, K * T, ...)``."""
        frames, t = self._frames(x)
        with clip_frames(t):
            f = self.backbone.forward_features(frames)
        return f.view(x.shape[0], -1, *f.shape[1:])

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's head per frame, averaged over frames and views."""
        out = self.backbone.forward_head(feats.flatten(0, 1), pre_logits=pre_logits)
        return out.view(feats.shape[0], -1, out.shape[-1]).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, t = self._frames(x)
        with clip_frames(t):
            logits = self.backbone(frames)
        return logits.view(x.shape[0], -1, logits.shape[-1]).mean(1)

    def get_classifier(self) -> Any:
        return self.backbone.get_classifier()


@dataclass
class VideoTask(Task):
    """Clips of ``frames`` frames (TSN sampling), ``views`` evaluation views averaged."""

    frames: int = 8
    views: int = 1
    name = "video"

    @classmethod
    def from_options(cls, frames: int = 8, views: int = 1, **_: Any) -> VideoTask:
        if frames < 1 or views < 1:
            raise ValueError(f"frames and views must be >= 1, got {frames} and {views}")
        return cls(frames, views)

    def open(self, root: str | Path, split: str, classes: list[str] | None = None,
             train: bool = False, seed: int = 0) -> Any:
        from vpeft.data.video import open_video_dataset

        return open_video_dataset(root, split, self.frames, 1 if train else self.views,
                                  classes=classes, train=train, seed=seed)

    def wrap(self, model: nn.Module) -> nn.Module:
        return ClipModel(model)

    def result_fields(self) -> dict[str, Any]:
        return {"task": self.name, "frames": self.frames, "views": self.views}
