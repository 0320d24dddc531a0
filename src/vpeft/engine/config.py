"""The typed configuration of a training run: one dataclass field per ``vpeft train`` option.

``TrainConfig`` is what the library takes (``vpeft.engine.train(TrainConfig(...))``) and what the
CLI builds, from defaults < ``--config run.yaml`` < command-line flags. Each run folder keeps the
resolved config as ``config.yaml``, which loads back as a ``TrainConfig``.

Defaults follow the common VTAB-1k recipe (NOAH, V-PETL-Bench): AdamW, lr 1e-3, weight decay 1e-4,
batch 64, 100 epochs, 10% linear warm-up then cosine decay, no augmentation. They are meant as a
sound start for every method and task, not tuned to any; full fine-tuning usually wants a smaller
lr (e.g. 1e-4). On a CPU pass fewer epochs.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vpeft.core.config import coerce as coerce_value

PRECISIONS = ("auto", "no", "bf16", "fp16")
HEAD_SOLVERS = ("lbfgs", "sgd")
# vpeft.tasks.TASKS (not imported here: this module is light)
TASK_NAMES = ("image", "segmentation", "video")
HEAD_INITS = ("random", "probe")
DECODERS = ("linear", "fpn")  # vpeft.tasks.decoders.DECODERS
EVAL_MODES = ("resize", "slide")


def opt(default: Any = MISSING, help: str = "", *, saved: bool = True, compared: bool = True,
        choices: tuple[str, ...] | None = None) -> Any:
    """A config field with help text. ``saved=False``: not written to ``config.yaml`` (flags of
    one invocation). ``compared=False``: may differ when a run is resumed (no effect on results)."""
    meta = {"help": help, "saved": saved, "compared": compared and saved, "choices": choices}
    return field(default=default, metadata=meta)


def kv_meta(help: str) -> dict[str, Any]:
    """Metadata of a ``dict`` field (KEY=VALUE options)."""
    return {"help": help, "saved": True, "compared": True, "choices": None}


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field ``batch_size`` is CLI option ``--batch-size``."""

    # -- what to train ----------------------------------------------------------------------------
    model: str = opt(help="timm architecture, e.g. deit_tiny_patch16_224")
    data: str = opt(help="data set folder: VTAB-1k list files, image folders or idx files")
    method: str = opt(help="PEFT method, e.g. linear, lora, full (see `vpeft methods`)")
    out: str = opt(help="run folder to create: adapter, config.yaml, metrics.jsonl, results.json",
                   compared=False)
    method_args: dict[str, Any] = field(default_factory=dict, metadata=kv_meta(
        "method options as KEY=VALUE, e.g. rank=8 (see `vpeft methods --options`)"))
    weights: str | None = opt(
        None, "local weights: .safetensors or a torch state dict (read with weights_only=True); "
        "default: timm's pretrained source")
    pretrained: bool = opt(True, "start from pretrained weights (--no-pretrained: random init)")
    model_args: dict[str, Any] = field(default_factory=dict, metadata=kv_meta(
        "extra timm.create_model arguments as KEY=VALUE, e.g. drop_path_rate=0.1"))
    img_size: int | None = opt(
        None, "input side in pixels (default: the model's); ViT position embeddings are resampled")
    # -- data -------------------------------------------------------------------------------------
    task: str = opt("image", "what the data is: image (classification), video (clips of "
                             "--frames frames, temporal mean pooling) or segmentation (a mask "
                             "per image, a --decoder over several depths)", choices=TASK_NAMES)
    frames: int = opt(8, "video: frames per clip, one per equal segment (TSN sampling)")
    views: int = opt(1, "video: evaluation views per clip, their logits averaged")
    decoder: str = opt("fpn", "segmentation: linear (1x1 classifier on the last block) or fpn "
                              "(a feature pyramid over 4 depths)", choices=DECODERS)
    decoder_width: int = opt(128, "segmentation: channels of the fpn decoder")
    eval_mode: str = opt("resize", "segmentation: evaluate on the image resized to --img-size, or "
                                   "by sliding windows of that size (short side at that size); "
                                   "predictions are scored at the mask's full resolution",
                         choices=EVAL_MODES)
    train_split: str = opt("train800val200", "split to train on (VTAB-1k: train800val200)")
    eval_split: str = opt("test", "split to evaluate on once, after training")
    val: bool = opt(False, "hyper-parameter search: train on train800, evaluate on val200")
    hflip: bool = opt(False, "random horizontal flips (off: no augmentation, as in VTAB-1k)")
    # -- optimisation -----------------------------------------------------------------------------
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(64, "global batch size, split over processes; the last partial batch of "
                              "each epoch is dropped")
    lr: float = opt(1e-3, "peak learning rate of AdamW")
    weight_decay: float = opt(1e-4, "AdamW weight decay; none on biases, norms, position and class "
                                    "tokens, and the method's prompts")
    warmup_ratio: float = opt(0.1, "fraction of the steps spent on linear warm-up; cosine decay to "
                                   "zero after it (per step)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    seed: int = opt(0, "seed of everything random: init, data order, dropout")
    # -- execution --------------------------------------------------------------------------------
    precision: str = opt("auto", "mixed precision; auto: bf16 on a GPU that has it, else fp32",
                         choices=PRECISIONS)
    cpu: bool = opt(False, "run on the CPU even when a GPU is there", compared=False)
    num_workers: int | None = opt(None, "data loader processes (default: 0 on a CPU with up to "
                                  "4 cores, min(8, cores - 1) on a GPU); torch threads take "
                                  "the other cores", compared=False)
    cache_features: bool = opt(True, "when only the head trains, run the frozen backbone once over "
                                     "the data and train on its cached features")
    head_solver: str = opt(
        "lbfgs", "how a head on cached features trains: lbfgs (logistic regression solved to "
        "convergence, its L2 chosen by 5-fold CV on the training data; epochs, lr and weight decay "
        "unused) or sgd (the epochs above)", choices=HEAD_SOLVERS)
    head_init: str = opt(
        "random", "how the head starts when more than the head trains: random (the model's own "
        "init) or probe (LP-FT, Kumar et al. 2022: fit the linear probe first, as --head-solver "
        "lbfgs does, on the starting model's features; then train everything from it)",
        choices=HEAD_INITS)
    eval_batch_size: int | None = opt(None, "evaluation batch size (default: --batch-size)",
                                      compared=False)
    # -- run folder -------------------------------------------------------------------------------
    overwrite: bool = opt(False, "replace the run in --out if there is one", saved=False)
    resume: bool = opt(False, "continue the interrupted run in --out", saved=False)
    progress: bool = opt(True, "progress bars (shown only on a terminal, by the main process)",
                         saved=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            # None is "same as batch_size"; 0 is a mistake, not a way to say "unset"
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1 (or unset), got {self.eval_batch_size}"),
            (self.num_workers is None or self.num_workers >= 0,
             f"num_workers must be >= 0 (or unset), got {self.num_workers}"),
            (self.img_size is None or self.img_size >= 1,
             f"img_size must be >= 1 (or unset), got {self.img_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1,
             f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (not (self.overwrite and self.resume), "choose one of overwrite and resume"),
            (self.task in TASK_NAMES,
             f"task must be one of {', '.join(TASK_NAMES)}, got {self.task!r}"),
            (self.frames >= 1, f"frames must be >= 1, got {self.frames}"),
            (self.decoder in DECODERS,
             f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}"),
            (self.decoder_width >= 1, f"decoder_width must be >= 1, got {self.decoder_width}"),
            (self.eval_mode in EVAL_MODES,
             f"eval_mode must be one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}"),
            (self.views >= 1, f"views must be >= 1, got {self.views}"),
            (self.head_solver in HEAD_SOLVERS,
             f"head_solver must be one of {', '.join(HEAD_SOLVERS)}, got {self.head_solver!r}"),
            (self.head_init in HEAD_INITS,
             f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.val and (self.train_split, self.eval_split) not in (
            ("train800val200", "test"), ("train800", "val200")
        ):
            got = f"{self.train_split} -> {self.eval_split}"
            raise ValueError("val sets the splits to train800 -> val200; do not also set "
                             f"train_split / eval_split (got {got})")

    @property
    def splits(self) -> tuple[str, str]:
        """``(train split, evaluation split)``, with ``val`` applied."""
        return ("train800", "val200") if self.val else (self.train_split, self.eval_split)

    def task_options(self) -> dict[str, Any]:
        """What :func:`vpeft.tasks.make_task` takes (each task uses its own)."""
        return {"frames": self.frames, "views": self.views, "decoder": self.decoder,
                "decoder_width": self.decoder_width, "eval_mode": self.eval_mode}

    # -- dict / YAML ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from YAML / CLI values, with types coerced; unknown or missing keys raise."""
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown option '{key}'{hint}")
        missing = [n for n, f in known.items() if f.default is MISSING
                   and f.default_factory is MISSING and values.get(n) in (None, "")]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ValueError(f"missing required option(s): {flags}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce(v, hints[k], k) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        return cls.from_dict({**read_yaml(path), **overrides})

    def to_dict(self, saved_only: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if saved_only:
            out = {f.name: out[f.name] for f in fields(self) if f.metadata.get("saved", True)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(saved_only=True), sort_keys=False)

    def differences(self, other: TrainConfig) -> list[str]:
        """Compared options whose values differ, as ``name: mine != other`` lines."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if f.metadata.get("compared", True)
                and getattr(self, f.name) != getattr(other, f.name)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in values.items()}


def parse_kv(items: list[str] | str) -> dict[str, Any]:
    """``["rank=8", "alpha=16"]`` or ``"rank=8,alpha=16"`` -> ``{"rank": 8, "alpha": 16}``.

    Values are read as YAML scalars: ``8`` is an int, ``true`` a bool, ``[1, 2]`` a list.
    """
    if isinstance(items, str):
        items = [items]
    out: dict[str, Any] = {}
    for item in items:
        for part in _split_top_level(item):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {part!r}")
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else ""
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``targets=[qkv,fc1],rank=4`` has two parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML / CLI value to the field's annotated type, with a clear error.

    ``KEY=VALUE`` dicts are read here; everything else follows the one set of rules that method
    options follow too (:func:`vpeft.core.config.coerce`).
    """
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    dict_hint = inner[0] if type(None) in typing.get_args(hint) and len(inner) == 1 else hint
    if typing.get_origin(dict_hint) is dict or dict_hint is dict:
        if value is None and dict_hint is not hint:
            return None
        if isinstance(value, (str, list)):
            return parse_kv(value)
        if not isinstance(value, dict):
            raise ValueError(f"option '{name}' expects KEY=VALUE pairs, got {value!r}")
        return dict(value)
    return coerce_value(value, hint, name)
