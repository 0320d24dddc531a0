"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from vpeft.engine.config import parse_kv


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
