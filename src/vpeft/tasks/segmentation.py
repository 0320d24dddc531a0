"""Semantic segmentation: a decoder over several depths of the adapted backbone, per-pixel loss
and mean IoU.

The decoder (:mod:`vpeft.tasks.decoders`) takes the classifier head's place, so adapting, saving,
loading, merging and profiling treat it as the head and need nothing of their own. The task adds
what differs from classification: joint image and mask transforms, logits brought to the mask's
full resolution (from a resized image, or by sliding windows), cross-entropy that ignores label
255, and a confusion matrix over the whole split for mean IoU and pixel accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.data.segmentation import IGNORE_INDEX as IGNORE
from vpeft.data.segmentation import (
    SegEvalTransform,
    SegTrainTransform,
    collate_segmentation,
    open_segmentation_dataset,
)
from vpeft.tasks.base import Task
from vpeft.tasks.decoders import DECODERS, install_decoder

PAD = -1  # label of the pixels that evaluation batches add to masks of smaller images
EVAL_MODES = ("resize", "slide")


def collate_masks(batch: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images padded with 0 and masks with :data:`PAD` (right and bottom) to the largest of the
    batch, so each mask's true size is still known (:func:`mask_size`)."""
    return collate_segmentation(batch, mask_pad=PAD)


def mask_size(mask: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of a mask inside its :data:`PAD` padding."""
    real = mask != PAD
    rows, cols = real.any(1).nonzero(), real.any(0).nonzero()
    return (int(rows[-1]) + 1 if len(rows) else 0), (int(cols[-1]) + 1 if len(cols) else 0)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Decoder logits ``(B, K, h, w)`` at ``size`` (bilinear)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the pixels of ``masks`` (logits upsampled to them), 255 and padding
    ignored; zero (with a gradient) for a batch without a labelled pixel."""
    masks = masks.masked_fill(masks == PAD, IGNORE)
    logits = upsample(logits, tuple(masks.shape[-2:]))
    if not (masks != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, masks, ignore_index=IGNORE, label_smoothing=label_smoothing)


@dataclass
class ConfusionMatrix:
    """Counts of (true class, predicted class) over every labelled pixel of a split, and the
    scores read from it: IoU per class, mean IoU (over the classes present in the labels or the
    predictions: a class neither has is left out), pixel accuracy, in percent."""

    classes: list[str]
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(len(self.classes), len(self.classes), dtype=torch.long)

    def update(self, pred: torch.Tensor, mask: torch.Tensor) -> None:
        k = len(self.classes)
        keep = (mask >= 0) & (mask < k)  # not ignored, not padding
        idx = mask[keep].long().cpu() * k + pred[keep].long().cpu()
        self.counts += torch.bincount(idx, minlength=k * k).view(k, k)

    def scores(self) -> dict[str, Any]:
        c = self.counts.double()
        tp, true, predicted = c.diag(), c.sum(1), c.sum(0)
        union = true + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        present = ~iou.isnan()
        return {
            "miou": 100.0 * float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": 100.0 * float(tp.sum() / c.sum()) if c.sum() > 0 else 0.0,
            "per_class_iou": {name: (round(100.0 * float(v), 4) if p else None)
                              for name, v, p in zip(self.classes, iou, present, strict=True)},
        }


class SegmentationMetric:
    """Evaluation of a segmentation split: the confusion matrix and the mean per-image loss."""

    def __init__(self, classes: list[str]) -> None:
        self.matrix = ConfusionMatrix(list(classes))
        self.loss_sum, self.images = 0.0, 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """``logits`` at the masks' resolution (see :meth:`SegmentationTask.infer`)."""
        for lg, mask in zip(logits, masks, strict=True):
            h, w = mask_size(mask)
            lg, mask = lg[:, :h, :w].unsqueeze(0), mask[:h, :w].unsqueeze(0)
            self.loss_sum += float(segmentation_loss(lg.float(), mask))
            self.matrix.update(lg.argmax(1), mask)
            self.images += 1

    def compute(self) -> dict[str, Any]:
        return {**self.matrix.scores(), "loss": self.loss_sum / max(self.images, 1),
                "images": self.images}


@dataclass
class SegmentationTask(Task):
    """Pixel classes from a ``decoder`` (linear | fpn) of ``decoder_width`` channels; evaluation
    on the image resized to the training size (``eval_mode='resize'``) or by windows of that
    size sliding over the image with its short side at that size (``'slide'``)."""

    decoder: str = "fpn"
    decoder_width: int = 128
    eval_mode: str = "resize"
    name = "segmentation"
    caches_features = False  # the decoder reads block outputs, not the pooled features
    predicts = "masks"
    score = "miou"

    @classmethod
    def from_options(cls, decoder: str = "fpn", decoder_width: int = 128,
                     eval_mode: str = "resize", **_: Any) -> SegmentationTask:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{decoder}'; decoders are {', '.join(DECODERS)}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval mode must be one of {', '.join(EVAL_MODES)}, got {eval_mode!r}")
        if decoder_width < 1:
            raise ValueError(f"decoder width must be >= 1, got {decoder_width}")
        return cls(decoder, decoder_width, eval_mode)

    def open(self, root: str | Path, split: str, classes: list[str] | None = None,
             train: bool = False, seed: int = 0) -> Any:
        dataset = open_segmentation_dataset(root, split, classes=classes)
        dataset.collate_fn = collate_masks
        return dataset

    def build(self, model: nn.Module) -> None:
        install_decoder(model, self.decoder, self.decoder_width)

    def transforms(self, data_cfg: dict[str, Any], seed: int = 0) -> tuple[Any, Any]:
        size, mean, std = data_cfg["input_size"][-1], data_cfg["mean"], data_cfg["std"]
        return (SegTrainTransform(size, mean, std, seed=seed),
                SegEvalTransform(size, mean, std, mode=self.eval_mode))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        return segmentation_loss(logits, labels, label_smoothing)

    def label_shape(self, batch: int, size: int) -> tuple[int, ...]:
        return (batch, size, size)

    def correct(self, logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = upsample(logits.detach(), tuple(labels.shape[-2:])).argmax(1)
        keep = (labels != IGNORE) & (labels != PAD)
        return ((pred == labels) & keep).sum(), keep.sum()

    def metric(self, classes: list[str]) -> SegmentationMetric:
        return SegmentationMetric(classes)

    def infer(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              size: int) -> torch.Tensor:
        """Logits at each mask's full resolution, ``(B, K, Hm, Wm)`` (padding included)."""
        slides = self.eval_mode == "slide"
        logits = slide(model, images, size) if slides else model(images)
        out = logits.new_zeros(*logits.shape[:2], *labels.shape[-2:])
        for i, mask in enumerate(labels):
            h, w = mask_size(mask)
            if slides:  # the part of the padded batch this image covers
                scale = size / max(1, min(h, w))
                ih, iw = round(h * scale), round(w * scale)
                fh = round(ih * logits.shape[-2] / images.shape[-2])
                fw = round(iw * logits.shape[-1] / images.shape[-1])
                part = logits[i:i + 1, :, :max(fh, 1), :max(fw, 1)]
            else:
                part = logits[i:i + 1]
            out[i, :, :h, :w] = upsample(part, (h, w))[0]
        return out

    def result_fields(self) -> dict[str, Any]:
        return {"task": self.name, "decoder": self.decoder, "decoder_width": self.decoder_width,
                "eval_mode": self.eval_mode}


def slide(model: nn.Module, images: torch.Tensor, size: int,
          overlap: float = 1 / 3) -> torch.Tensor:
    """Logits of ``images`` from ``size`` x ``size`` windows that overlap by ``overlap``,
    averaged where they overlap, at the image's resolution."""
    _, _, h, w = images.shape
    stride = max(1, round(size * (1 - overlap)))

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        return sorted({*range(0, n - size, stride), n - size})

    total = count = None
    for y in starts(h):
        for x in starts(w):
            crop = images[..., y:y + size, x:x + size]
            ch, cw = crop.shape[-2:]
            if (ch, cw) != (size, size):  # an image smaller than a window: pad it
                crop = F.pad(crop, (0, size - cw, 0, size - ch))
            out = upsample(model(crop), (size, size))[..., :ch, :cw]
            if total is None:
                total = out.new_zeros(*out.shape[:2], h, w)
                count = out.new_zeros(1, 1, h, w)
            total[..., y:y + ch, x:x + cw] += out
            count[..., y:y + ch, x:x + cw] += 1
    return total / count
