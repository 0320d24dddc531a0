"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
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
