"""Where a run executes: the Accelerator, seeding, data loaders, progress bars, peak memory."""

from __future__ import annotations

import logging
import os
import random
import resource
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def on_cpu(cpu: bool = False) -> bool:
    """Whether a run executes on the CPU: asked to, told so by accelerate, or no GPU there."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return cpu or forced or not torch.cuda.is_available()


def resolve_precision(precision: str, cpu: bool = False) -> str:
    """The precision a run really uses, which is what its config and results record.

    ``auto`` -> ``bf16`` on a GPU that supports it, ``fp16`` on another GPU, ``no`` on a CPU.
    ``fp16`` on a CPU falls back to ``no`` with a warning: accelerate has no CPU fp16 autocast
    and would otherwise run in fp32 while the run said fp16. (CPU ``bf16`` autocast exists.)
    """
    if on_cpu(cpu):
        if precision == "fp16":
            logger.warning("precision fp16 needs a GPU; this run is on the CPU and uses fp32 "
                           "(precision 'no'), which is what its config and results record")
            return "no"
        return "no" if precision == "auto" else precision
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(precision: str, cpu: bool = False) -> Accelerator:
    """One Accelerator for CPU, one GPU or many (``accelerate launch``).

    Batches are *split* over processes: ``batch_size`` is the global batch, so the number of steps,
    the schedule and what one step sees do not depend on how many processes run. Without a GPU the
    processes of ``accelerate launch --multi_gpu`` / ``torchrun`` talk over gloo on the CPU.
    """
    return Accelerator(cpu=on_cpu(cpu), mixed_precision=precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy's and random's from it
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EpochShuffle(Sampler[int]):
    """A new permutation every epoch, computed from ``(seed, epoch)`` alone.

    Every process draws the same order, and a resumed run the same order as an uninterrupted one,
    without saving any sampler state. ``set_epoch`` also re-seeds the loader's own generator (the
    source of worker seeds) from ``(seed, epoch)``.
    """

    def __init__(self, size: int, seed: int, loader_rng: torch.Generator) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.loader_rng = loader_rng  # not named `generator`: accelerate would try to sync it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader_rng.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[int]:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=rng).tolist())

    def __len__(self) -> int:
        return self.size


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | None = None,
                shuffle_seed: int | None = None, persistent: bool = False) -> DataLoader:
    """A training loader (``shuffle_seed`` given: :class:`EpochShuffle`, last partial batch
    dropped) or an evaluation loader (in order, every sample).

    ``persistent`` keeps worker processes between epochs; only for data sets whose items do not
    depend on the epoch (workers keep their copy of the data set).
    """
    workers = default_workers() if num_workers is None else num_workers
    loader_rng = torch.Generator().manual_seed(0 if shuffle_seed is None else shuffle_seed)
    train = shuffle_seed is not None
    sampler = (EpochShuffle(len(dataset), shuffle_seed, loader_rng) if train
               else SequentialSampler(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=workers, worker_init_fn=_seed_worker, generator=loader_rng,
                      pin_memory=torch.cuda.is_available(),
                      persistent_workers=persistent and workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler and data set which epoch starts (order, flips, worker seeds)."""
    if hasattr(loader, "set_epoch"):  # accelerate's prepared loaders pass it on to both
        loader.set_epoch(epoch)
        return
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def progress(items: Iterable, accelerator: Accelerator, enabled: bool, **kwargs) -> Iterable:
    """A tqdm bar over ``items``, shown only on a terminal and by the main process."""
    show = enabled and accelerator.is_main_process and sys.stderr.isatty()
    return tqdm(items, disable=not show, leave=False, dynamic_ncols=True, **kwargs)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what it measures: CUDA allocations on a GPU, else the process's
    peak resident set size (which includes the Python and torch runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb / 1024, "cpu_peak_rss"
