"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import re
import struct
import typing
import zipfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from vpeft.engine.config import parse_kv

logger = logging.getLogger(__name__)


def at_least(low: int):
    """An argparse ``type``: an integer ``>= low``, refused with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its error
    return parse


def check_weights_file(path: str | Path | None) -> None:
    """Refuse a weights file that cannot be what it claims, before anything is built.

    A ``.safetensors`` file must have a readable header whose tensors end where the file ends
    (a cut download fails here); any other file must be a complete torch zip archive (what
    ``torch.save`` writes). Reads only the header / the zip directory, so it costs nothing.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"weights {path} is a folder, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        problem = _safetensors_problem(path, size)
        if problem:
            raise ValueError(f"weights {path} is not a valid safetensors file: {problem}")
    elif not zipfile.is_zipfile(path):
        raise ValueError(f"weights {path} is neither a safetensors file nor a complete torch "
                         "checkpoint (a zip archive); is it truncated?")


def _safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON, data)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"the header claims {n} bytes but the file has {size} (truncated?)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"its tensors need {expected} bytes but the file has {size} (truncated?)"
    return None


def warn_if_training_data(train_split: str, split: str) -> None:
    """Warn when the split being evaluated is, or is part of, the split a run trained on
    (VTAB-1k's ``train800val200`` is ``train800`` + ``val200``)."""
    if split == train_split or split in re.findall(r"[a-z]+\d+", train_split):
        logger.warning("split %s is training data of this run (trained on %s): its accuracy "
                       "says nothing about generalisation", split, train_split)


def parse_key_values(items: list[str] | None, what: str = "--method-args") -> dict[str, Any]:
    """``["rank=8", "targets=[qkv,fc1]"]`` -> ``{"rank": 8, "targets": ["qkv", "fc1"]}``."""
    try:
        return parse_kv(items or [])
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that pick a backbone: ``--model``, ``--weights``, ``--img-size`` ..."""
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name")
    g.add_argument(
        "--weights",
        default=None,
        help="local weights (safetensors or torch state dict); default: timm's source",
    )
    g.add_argument("--img-size", type=int, default=224, help="input side in pixels")
    g.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    g.add_argument(
        "--model-args",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments, e.g. depth=2",
    )


METAVARS = {"model": "NAME", "method": "NAME", "data": "DIR", "out": "DIR", "weights": "FILE"}
COUNTS = ("budget", "population", "select", "mutation", "crossover", "min_params")


def base_type(hint: Any) -> type:
    """``int | None`` -> int, ``dict[str, Any]`` -> dict."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is dict:
        return dict
    if args and typing.get_origin(hint) is not None:
        return base_type(args[0])
    return hint


def add_dataclass_options(group: argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (),
                          required_note: str = " (required)") -> None:
    """One flag per field of the dataclass ``cls`` (``batch_size`` -> ``--batch-size``), with
    the field's help text; flags not given stay absent (``argparse.SUPPRESS``), so that YAML and
    saved configs below them keep their values."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = base_type(hints[f.name])
        required = f.default is MISSING and f.default_factory is MISSING
        plain = required or kind is dict or f.default is None
        help_text = (f.metadata.get("help", "") + (required_note if required else "")
                     + ("" if plain else f" (default: {f.default})"))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        else:
            metavar = "N" if f.name in COUNTS else f.name.upper().split("_")[-1]
            kwargs.update(type=kind, metavar=METAVARS.get(f.name, metavar))
            if f.metadata.get("choices"):
                kwargs.update(choices=f.metadata["choices"], metavar=None)
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
