"""Profile methods on one backbone: parameters, FLOPs, inference latency, step time and memory.

Timings are taken in one process, in rounds after warm-up rounds; in each round every candidate
runs right after a run of its reference, and a ratio is the median over rounds of the candidate's
time over that reference run's, so that load drifting on a shared machine cancels. Ratios are to
the base model (latency) and to the *floor* (step time): the frozen backbone's forward plus the
backward that carries gradients to the tokens entering the first block, without any weight
gradient. Every method that trains something inside the first block pays at least that.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.backbones.base import MissingPartError
from vpeft.bench.flops import flops_per_image, step_flops
from vpeft.engine.model import build_backbone
from vpeft.tasks import Task, make_task

PRECISIONS = ("fp32", "bf16")


@dataclass
class ProfileSpec:
    """What to profile; also the argument of the memory probe subprocess (as JSON)."""

    model: str = "deit_tiny_patch16_224"
    weights: str | None = None
    batch_size: int = 32
    img_size: int = 224
    num_classes: int = 10
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None
    device: str = "auto"
    memory: bool = True  # peak training memory (a fresh subprocess per method on CPU)
    train: bool = True  # time training steps (against the floor)
    model_args: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # or "bf16": forward passes under bf16 autocast (weights stay fp32)
    task: str = "image"  # or "segmentation": a decoder in the head's place, masks as labels
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"decoder": "linear"}

    def make_task(self) -> Task:
        return make_task(self.task, **self.task_options)

    def autocast(self) -> torch.autocast:
        """The autocast context every forward pass runs in (disabled for fp32)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        return torch.autocast(self.resolved_device().type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def build(spec: ProfileSpec, method: str | None = None, **options: Any) -> nn.Module:
    # the engine's builder: CNNs that take no img_size, hf:/open_clip: specs, clear errors
    model = build_backbone(spec.model, spec.num_classes, spec.weights,
                           pretrained=spec.weights is not None, img_size=spec.img_size,
                           model_args=spec.model_args)
    spec.make_task().build(model)
    if method is not None:
        vpeft.adapt(model, method, **options)
    return model.to(spec.resolved_device())


def batch(spec: ProfileSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=g)
    shape = spec.make_task().label_shape(spec.batch_size, spec.img_size)
    y = torch.randint(0, spec.num_classes, shape, generator=g)
    dev = spec.resolved_device()
    return x.to(dev), y.to(dev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per run of each candidate, and its ratio to the reference run just before it."""

    times: dict[str, list[float]]
    ratios: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str) -> float:
        return statistics.median(self.ratios[name])


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    ref: str,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> Timings:
    """Time every callable ``repeats`` times after ``warmup`` untimed rounds, each run right
    after a run of ``fns[ref]``: a candidate's ratio is the median over rounds of its time over
    the reference's time a moment before, which cancels load that drifts on a shared machine
    (a ratio of two medians taken minutes apart does not)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != ref}

    def timed(fn: Callable[[], Any]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    for r in range(warmup + repeats):
        for name in ratios:
            t_ref, t = timed(fns[ref]), timed(fns[name])
            if r >= warmup:
                times[ref].append(t_ref)
                times[name].append(t)
                ratios[name].append(t / t_ref)
    return Timings(times, ratios)


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               autocast: Callable[[], Any] = contextlib.nullcontext,
               loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> Callable[[], None]:
    """One AdamW step of ``model`` on a fixed batch (the optimiser lives in the closure); the
    forward runs in ``autocast()``; ``loss_fn(logits, labels)`` is the task's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               autocast: Callable[[], Any] = contextlib.nullcontext,
               loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> Callable[[], None]:
    """Forward of the frozen ``model`` plus backward to the tokens entering the first block."""
    view = vpeft.get_view(model)
    view.require("blocks", method="floor")
    model.requires_grad_(False).train()
    model.get_submodule(view.blocks[0]).register_forward_pre_hook(
        lambda m, args: (args[0].detach().requires_grad_(True), *args[1:])
    )

    def step() -> None:
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()

    return step


def static_profile(spec: ProfileSpec, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Parameter counts and FLOPs of one method (no timing)."""
    model = build(spec, method, **options)
    s = vpeft.summary(model)
    row: dict[str, Any] = {
        "method": method,
        "options": options,
        "trainable_params": s.trainable,
        "trainable_params_no_head": s.trainable_no_head,
        "added_params": s.added,
        "total_params": s.total,
        "gflops_per_image": flops_per_image(model, spec.img_size) / 1e9,
    }
    return row


def peak_memory_mb(spec: ProfileSpec, method: str | None, options: dict[str, Any]) -> dict:
    """Peak training memory of ``method`` (``None``: the floor) in a fresh subprocess.

    ``train_memory_mb`` is the peak during two training steps minus the memory right before them
    (model, optimiser and batch built): activations kept for backward, gradients, optimiser state
    and temporaries. On CUDA it is ``max_memory_allocated``; on CPU the resident set, whose peak
    (``VmHWM``) is reset through ``/proc/self/clear_refs`` before the steps, with glibc told to
    give large blocks back at once (``MALLOC_MMAP_THRESHOLD_``) so that the peak follows live
    memory. ``peak_memory_mb`` is the whole process's peak.
    """
    job = {"spec": asdict(spec), "method": method, "options": options}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", "vpeft.bench.memory_probe", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def step_memory(step: Callable[[], None], dev: torch.device) -> dict[str, Any]:
    """Peak memory of two calls of ``step`` (the second has AdamW state) above the memory before
    them: CUDA ``max_memory_allocated``, or on the CPU the resident set's peak (``VmHWM``, reset
    first; meaningful in a fresh process, see :func:`peak_memory_mb`)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base, how = torch.cuda.memory_allocated(dev), "cuda max_memory_allocated"
    else:
        base = _rss_kib("VmRSS") * 1024
        how = "cpu VmHWM after reset" if _reset_peak_rss() else "cpu whole-process peak"
    step()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        process = peak
    else:
        process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = _rss_kib("VmHWM") * 1024 if how.endswith("reset") else process
    mib = 2**20
    return {
        "train_memory_mb": (peak - base) / mib,
        "peak_memory_mb": process / mib,
        "memory_measure": how,
    }


def _probe(job: dict) -> dict:
    """In the subprocess: build, then measure two training steps (the second has AdamW state)."""
    spec = ProfileSpec(**job["spec"])
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = build(spec, job["method"], **job["options"]) if job["method"] else build(spec)
    x, y = batch(spec)
    make = train_step if job["method"] else floor_step
    return step_memory(make(model, x, y, spec.autocast, spec.make_task().loss),
                       spec.resolved_device())


def profile(
    spec: ProfileSpec,
    methods: list[tuple[str, dict[str, Any]]],
    progress: Callable[[str], None] | None = None,
    skip_inapplicable: bool = False,
) -> dict[str, Any]:
    """Profile ``methods`` (name, options) against the base model and the floor.

    With ``skip_inapplicable`` a method that cannot apply to the backbone (it lacks a part the
    method needs, e.g. a ViT for a CNN-only method) is left out and listed under ``skipped``.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    dev = spec.resolved_device()
    say = progress or (lambda msg: None)
    x, y = batch(spec)
    base = build(spec).eval()
    rows = []

    def run(m: nn.Module) -> Any:
        with spec.autocast():
            return m(x)

    # on a GPU memory is measured here, right after each build (the optimiser's state included);
    # on the CPU in a fresh subprocess per method, as the resident set cannot be attributed
    in_process = spec.memory and dev.type == "cuda"
    infer: dict[str, Callable[[], Any]] = {"base": lambda: run(base)}
    loss = spec.make_task().loss
    steps: dict[str, Callable[[], None]] = {
        "floor": floor_step(build(spec), x, y, spec.autocast, loss)}
    # counted on the first (warm-up) call of each step; the ratio to the floor's is the step
    # ratio a compute-bound device would show: a bound that kernels cannot beat
    train_flops = {"floor": step_flops(steps["floor"])} if spec.train else {}
    floor_memory = step_memory(steps["floor"], dev) if in_process else {}
    skipped: dict[str, str] = {}
    for name, options in methods:
        say(f"building {name}")
        try:
            row = static_profile(spec, name, options)
        except MissingPartError as e:
            if not skip_inapplicable:
                raise
            say(f"skipping {name}: {e}")
            skipped[name] = str(e)
            continue
        model = build(spec, name, **options)
        impl = vpeft.get_state(model).method
        adapted = copy.deepcopy(model).eval()
        infer[f"{name}/adapted"] = lambda m=adapted: run(m)
        if impl.mergeable:
            merged = vpeft.merge(adapted).eval()
            infer[f"{name}/merged"] = lambda m=merged: run(m)
        steps[name] = train_step(model, x, y, spec.autocast, loss)
        if spec.train:
            train_flops[name] = step_flops(steps[name])
        if in_process:
            row.update(step_memory(steps[name], dev))
        deployed = merged if impl.mergeable else adapted
        row.update(
            mergeable=impl.mergeable,
            memory_saving=impl.memory_saving,
            structure_preserved=module_types(deployed) == module_types(base),
        )
        rows.append(row)
    say("timing inference")
    with torch.no_grad():
        lat = interleaved_times(infer, "base", spec.warmup, spec.repeats, dev)
    step = None
    if spec.train:
        say("timing training steps")
        step = interleaved_times(steps, "floor", spec.warmup, spec.repeats, dev)
    for row in rows:
        n = row["method"]
        row["latency_ms"] = 1e3 * lat.median(f"{n}/adapted")
        row["latency_ratio_adapted"] = lat.ratio(f"{n}/adapted")
        row["latency_ratio_merged"] = lat.ratio(f"{n}/merged") if f"{n}/merged" in infer else None
        row["step_ms"] = 1e3 * step.median(n) if step else None
        row["step_ratio_floor"] = step.ratio(n) if step else None
        row["train_flops_ratio_floor"] = (train_flops[n] / train_flops["floor"]
                                          if step else None)
        row["images_per_second"] = spec.batch_size / step.median(n) if step else None
        if spec.memory and not in_process:
            say(f"memory of {n}")
            row.update(peak_memory_mb(spec, n, row["options"]))
    floor = {
        "step_ms": 1e3 * step.median("floor") if step else None,
        "base_latency_ms": 1e3 * lat.median("base"),
        "base_gflops_per_image": flops_per_image(base, spec.img_size) / 1e9,
        "train_gflops_per_image": (train_flops["floor"] / spec.batch_size / 1e9
                                   if step else None),
    }
    if spec.memory:
        floor.update(floor_memory or peak_memory_mb(spec, None, {}))
    return {
        "spec": asdict(spec),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "floor": floor,
        "methods": rows,
        "skipped": skipped,
    }
