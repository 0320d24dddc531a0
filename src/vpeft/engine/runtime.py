"""Where a run executes: the Accelerator, seeding, data loaders, progress bars, peak memory."""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def _cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 CFS), if any."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                                     "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1") and float(fields[1]) > 0:
            return float(fields[0]) / float(fields[1])
    return None


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota
    (``os.cpu_count()`` counts the host's, which oversubscribes a container)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def default_workers(cpu: bool | None = None) -> int:
    """Data-loader processes when none are asked for.

    On a GPU: ``min(8, cores - 1)``, the GPU waits on decoding otherwise. On the CPU the model
    is the bottleneck and every worker takes a core from its matrix products: none up to 4 cores
    (decoding and resizing a batch costs about 1% of a CPU training step), then one per 8 cores.
    """
    cores = available_cores()
    if on_cpu() if cpu is None else cpu:
        return 0 if cores <= 4 else min(4, cores // 8)
    return max(0, min(8, cores - 1))


def balance_threads(workers: int) -> int:
    """Give torch's intra-op pool the cores that ``workers`` loader processes leave, and return
    that number; ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``), when set, is kept as it is.

    Threads plus workers beyond the cores oversubscribe them: OpenMP's spinning threads then
    wait on each other and a step can take many times longer (loader workers run 1 thread each).
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    cores = available_cores()
    threads = max(1, cores - workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    key = (cores, threads, workers)
    if key != _last_plan[0]:
        _last_plan[0] = key
        logger.info("%d CPU cores available: %d torch threads, %d data-loader worker(s)",
                    cores, threads, workers)
    return threads


_last_plan: list[tuple[int, int, int] | None] = [None]


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | None = None,
                shuffle_seed: int | None = None, persistent: bool = False) -> DataLoader:
    """A training loader (``shuffle_seed`` given: :class:`EpochShuffle`, last partial batch
    dropped) or an evaluation loader (in order, every sample). A data set's own ``collate_fn``
    (segmentation: masks padded to the batch's largest) makes its batches.

    ``persistent`` keeps worker processes between epochs; only for data sets whose items do not
    depend on the epoch (workers keep their copy of the data set). Torch's threads are set to the
    cores the workers leave (:func:`balance_threads`).
    """
    workers = default_workers() if num_workers is None else num_workers
    balance_threads(workers)
    loader_rng = torch.Generator().manual_seed(0 if shuffle_seed is None else shuffle_seed)
    train = shuffle_seed is not None
    sampler = (EpochShuffle(len(dataset), shuffle_seed, loader_rng) if train
               else SequentialSampler(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      collate_fn=getattr(dataset, "collate_fn", None),  # e.g. masks of any size
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
