"""Benchmark suites: tasks (with their VTAB-1k groups), methods with options, schedule, seeds.

Built in: ``vtab1k`` (the 19 standard tasks under their usual folder names) and ``quick`` (every
task found under the data root, small images and few epochs, for a CPU). A suite is also a YAML
file with the same fields as :class:`Suite`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

VTAB_GROUPS: dict[str, list[str]] = {
    "natural": [
        "cifar",
        "caltech101",
        "dtd",
        "oxford_flowers102",
        "oxford_iiit_pet",
        "svhn",
        "sun397",
    ],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": [
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ],
}
TASK_GROUP = {t: g for g, ts in VTAB_GROUPS.items() for t in ts}
SURVEY_METHODS = ["linear", "bitfit", "lora", "adaptformer", "vpt-deep", "ssf", "full", "hf:lora"]


@dataclass
class MethodEntry:
    """A method in a suite: its options, and an optional grid searched on ``val200``."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)  # method options, or run options (lr)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # e.g. {"lr": [1e-3, 1e-4]}

    @property
    def label(self) -> str:
        return self.name + "".join(f"_{k}{v}" for k, v in sorted(self.args.items()))


@dataclass
class Suite:
    name: str
    tasks: list[str] = field(default_factory=list)  # empty: every task under the data root
    methods: list[MethodEntry] = field(default_factory=list)
    model: str = "deit_tiny_patch16_224"
    epochs: int = 100
    img_size: int = 224
    batch_size: int = 64
    lr: float = 1e-3
    seeds: list[int] = field(default_factory=lambda: [0])
    train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields
    # per task folder, TrainConfig fields of its runs: a suite may mix image and video tasks,
    # e.g. {"motion": {"task": "video", "frames": 8}}
    task_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=lambda: dict(TASK_GROUP))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suite:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown suite field(s) {unknown}; fields are {sorted(known)}")
        d = dict(d)
        d["methods"] = [
            m
            if isinstance(m, MethodEntry)
            else MethodEntry(m)
            if isinstance(m, str)
            else MethodEntry(**m)
            for m in d.get("methods", [])
        ]
        return cls(**d)

    def resolve_tasks(self, data_root: Path) -> tuple[list[str], list[str]]:
        """(tasks present, tasks missing) under ``data_root``. Found by themselves: the VTAB-1k
        folders; listed ones: any folder (a segmentation or video task names its splits in
        ``task_train``)."""
        if self.tasks:
            present = [t for t in self.tasks if (data_root / t / "train800val200.txt").is_file()
                       or (t in self.task_train and (data_root / t).is_dir())]
            return present, [t for t in self.tasks if t not in present]
        found = sorted(p.parent.name for p in data_root.glob("*/train800val200.txt"))
        return found, []


def builtin_suites() -> dict[str, Suite]:
    grid = {"lr": [1e-2, 1e-3, 1e-4]}
    return {
        "vtab1k": Suite(
            name="vtab1k",
            tasks=[t for ts in VTAB_GROUPS.values() for t in ts],
            methods=[MethodEntry(m, grid=dict(grid)) for m in SURVEY_METHODS],
            epochs=100,
            img_size=224,
            batch_size=64,
            seeds=[0, 1, 2],
        ),
        "quick": Suite(
            name="quick",
            # one fixed recipe, no search; full fine-tuning gets its usual 10x smaller lr
            methods=[MethodEntry(m, {"lr": 1e-4} if m == "full" else {}) for m in SURVEY_METHODS],
            epochs=3,
            img_size=112,
            batch_size=32,
            seeds=[0],
        ),
    }


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a YAML file."""
    builtins = builtin_suites()
    if name_or_path in builtins:
        return builtins[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown suite '{name_or_path}': not one of {sorted(builtins)} and no such YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    return Suite.from_dict(data)
