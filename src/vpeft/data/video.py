"""Video classification data: list files of clips, each a video file or a folder of frames.

A task folder holds ``classes.txt`` and list files ``<split>.txt`` with one clip a line,
``<path relative to the folder> <label>``. A path is a video file (``.mp4``, ``.avi``, ``.webm``,
``.mkv``, ``.mov``; decoded with PyAV, ``pip install vpeft[video]``) or a folder of frame images
(sorted by name: ``000001.jpg`` ...).

Sampling is TSN's (Wang et al., 2016): a clip of ``n`` frames is cut into ``T`` equal segments
and one frame is taken from each, at a random place in training and at the centre in evaluation;
with ``views = K`` evaluation takes ``K`` evenly spaced places per segment (the model averages
the ``K`` views). A clip shorter than ``T`` repeats frames. Every clip is checked when the split
is opened (path, label, frame count from the container, without decoding), so a bad clip is a
:class:`~vpeft.data.DataError` naming its list line before training starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vpeft.data.datasets import IMAGE_EXTENSIONS, DataError, ImageDataset, _coin, read_list

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def tsn_indices(n: int, frames: int, offsets: Sequence[float]) -> list[int]:
    """Frame ``i`` of ``frames`` from segment ``i`` of a clip of ``n`` frames, at fraction
    ``offsets[i]`` (in ``[0, 1)``) of the segment; a short clip repeats frames."""
    return [min(n - 1, int((i + u) * n / frames)) for i, u in enumerate(offsets)]


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'vpeft[video]' (or pip "
                          "install av), or give folders of frame images") from None
    return av


def count_video_frames(path: Path) -> int:
    """Frames of the first video stream of ``path`` (from its packets: nothing is decoded)."""
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_video(path: Path, wanted: set[int]) -> dict[int, Image.Image]:
    """The frames of ``path`` whose indices are in ``wanted``, as RGB PIL images, decoding from
    the start up to the last one wanted."""
    av = _av()
    out: dict[int, Image.Image] = {}
    last = max(wanted)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                out[k] = frame.to_image().convert("RGB")
            if k >= last:
                break
    return out


class VideoDataset(ImageDataset):
    """``(clip, label)`` pairs of one split: a clip is ``(T, C, H, W)``, or ``(K, T, C, H, W)``
    with ``views = K > 1`` in evaluation. ``transform`` maps each frame (a PIL image) to a
    tensor, as for images; ``hflip_seed`` mirrors whole clips."""

    def __init__(self, root: Path, split: str, classes: list[str], labels: list[int],
                 origins: list[str], sources: list[Path], lengths: list[int], frames: int,
                 views: int = 1, train: bool = False, seed: int = 0) -> None:
        super().__init__(root, split, "video-list", classes, labels, origins, sources=sources)
        self.lengths, self.frames, self.views = lengths, frames, views
        self.train, self.seed = train, seed
        # set: every clip's sampled frames are put in a random order drawn from (this, index),
        # the same for all its views (a test of whether a model uses time)
        self.shuffle_seed: int | None = None

    def offsets(self, i: int) -> list[list[float]]:
        """Where in each segment the frames of sample ``i`` are taken, per view."""
        if self.train:  # random, from (seed, epoch, index): independent of workers and resumes
            rng = np.random.default_rng([self.seed, self.epoch, i, 1])
            return [rng.random(self.frames).tolist()]
        return [[(k + 0.5) / self.views] * self.frames for k in range(self.views)]

    def indices(self, i: int) -> list[list[int]]:
        """The frame indices of sample ``i``, one list of ``frames`` per view."""
        views = [tsn_indices(self.lengths[i], self.frames, u) for u in self.offsets(i)]
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, i, 2]).permutation(self.frames)
            views = [[v[k] for k in order] for v in views]
        return views

    def read_frames(self, i: int, wanted: set[int]) -> dict[int, Image.Image]:
        path = self.sources[i]
        try:
            if path.is_dir():
                files = frame_files(path)
                return {k: _read_image(files[k]) for k in wanted}
            got = decode_video(path, wanted)
        except (OSError, ValueError, IndexError) as e:
            raise DataError(f"cannot read clip {path} (from {self.origins[i]}): {e}") from None
        except Exception as e:  # PyAV's FFmpegError family
            if type(e).__module__.startswith("av"):
                raise DataError(f"cannot decode video {path} (from {self.origins[i]}): "
                                f"{e}") from None
            raise
        if not got:
            raise DataError(f"video {path} (from {self.origins[i]}) decoded to no frames")
        for k in sorted(wanted - got.keys()):  # the container said more frames than it held
            got[k] = got[max(j for j in got if j <= k) if any(j <= k for j in got) else min(got)]
        return got

    def __getitem__(self, i: int) -> tuple[Any, int]:
        views = self.indices(i)
        images = self.read_frames(i, {k for v in views for k in v})
        flip = self.hflip_seed is not None and _coin(self.hflip_seed, self.epoch, i)
        clips = []
        for view in views:
            frames = []
            for k in view:
                img = images[k]
                if flip:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                frames.append(self.transform(img) if self.transform is not None else img)
            clips.append(torch.stack(frames) if self.transform is not None else frames)
        clip = clips[0] if len(clips) == 1 else (
            torch.stack(clips) if self.transform is not None else clips)
        return clip, self.labels[i]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "clips": len(self), "frames": self.frames,
                "views": self.views, "train": self.train}


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _clip_length(path: Path, origin: str) -> int:
    if path.is_dir():
        n = len(frame_files(path))
        if n == 0:
            raise DataError(f"{origin}: frame folder {path} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        return n
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise DataError(f"{origin}: {path} is neither a folder of frames nor a video file "
                        f"({', '.join(VIDEO_EXTENSIONS)})")
    try:
        n = count_video_frames(path)
    except ImportError:
        raise
    except Exception as e:  # PyAV raises its own FFmpegError family, or ValueError
        raise DataError(f"{origin}: cannot read video {path}: {e}") from None
    if n == 0:
        raise DataError(f"{origin}: video {path} has no frames (zero length)")
    return n


def open_video_dataset(root: str | Path, split: str, frames: int, views: int = 1,
                       classes: list[str] | None = None, train: bool = False,
                       seed: int = 0) -> VideoDataset:
    """Open split ``split`` of the video task in folder ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not (root / f"{split}.txt").is_file():
        found = sorted(p.stem for p in root.glob("*.txt") if p.name != "classes.txt")
        raise DataError(f"no split '{split}' in {root}: expected {split}.txt (one '<video or "
                        f"frame folder> <label>' per line); splits found: "
                        f"{', '.join(found) or 'none'}")
    classes, sources, labels, origins = read_list(root, split, classes, what="clip",
                                                  exists=Path.exists)
    if not labels:
        raise DataError(f"split '{split}' of {root} holds no clips")
    lengths = [_clip_length(p, o) for p, o in zip(sources, origins, strict=True)]
    ds = VideoDataset(root, split, classes, labels, origins, sources, lengths, frames, views,
                      train, seed)
    logger.debug("opened %r", ds)
    return ds
