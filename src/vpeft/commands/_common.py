"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import ast
from typing import Any


def parse_key_values(items: list[str] | None, what: str = "--method-args") -> dict[str, Any]:
    """``["rank=8", "targets=qkv,fc1"]`` -> ``{"rank": 8, "targets": "qkv,fc1"}``.

    Values that read as Python literals (numbers, booleans, lists) are converted; everything else
    stays a string, which the typed config converts further.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        for part in item.split() if " " in item.strip() else [item]:
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ValueError(f"{what} expects KEY=VALUE pairs, got {part!r}")
            try:
                out[key.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key.strip()] = value
    return out


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
