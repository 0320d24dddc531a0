"""Adapter-only checkpoints: ``adapter.safetensors`` + ``adapter_config.json`` in a folder.

Writes are atomic (temporary file, then rename) and never replace an existing checkpoint unless
asked; loading checks that the checkpoint was made for this architecture and method config.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vpeft.core.state import adapt, adapter_state_dict, base_identity, get_state
from vpeft.registry import make_config

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or made for another model or method config."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp made the file 0600; give it the mode any new file gets
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save(model: nn.Module, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter (trained and added tensors, the head) and its config to ``directory``."""
    state = get_state(model)
    if state.merged is not None:
        raise ValueError("save the adapted model, not the merged one (vpeft.unmerge it first)")
    out = Path(directory)
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out / WEIGHTS_NAME} exists; pass overwrite=True to replace it")
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "method": state.config.method,
        "config": state.config.to_dict(),
        "base": state.base,
        "tensors": len(tensors),
        "params": sum(t.numel() for t in tensors.values()),
    }
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return out


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no vpeft adapter at {directory}: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}, "
            f"this vpeft reads {FORMAT_VERSION}"
        )
    return meta


def check_base(
    meta: dict[str, Any], model: nn.Module, directory: str | os.PathLike, strict_base: bool = True
) -> None:
    """Raise :class:`CheckpointError` unless the (plain) ``model`` is the base the adapter described
    by ``meta`` (from :func:`read_config`) was made for: architecture, layer shapes, classes."""
    saved, here = meta["base"], base_identity(model)
    if (saved["architecture"], saved["class"]) != (here["architecture"], here["class"]):
        raise CheckpointError(
            f"adapter at {directory} was made for {saved['architecture']} "
            f"({saved['class']}), not {here['architecture']} ({here['class']})"
        )
    if strict_base and saved["shape_hash"] != here["shape_hash"]:
        raise CheckpointError(
            f"adapter at {directory} was made for a {saved['architecture']} with other layer "
            "shapes (width, depth, patch or image size differ)"
        )
    if saved["num_classes"] != here["num_classes"]:
        raise CheckpointError(
            f"adapter at {directory} has a {saved['num_classes']}-class head but the model has "
            f"{here['num_classes']} classes; create it with num_classes={saved['num_classes']}"
        )


def load(model: nn.Module, directory: str | os.PathLike, strict_base: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save` into ``model`` and return it.

    ``model`` is either a plain base model (it is adapted with the saved config first) or one
    already adapted with the same config. A mismatch in architecture, class count or config raises
    :class:`CheckpointError` saying what differs.
    """
    meta = read_config(directory)
    config = make_config(meta["method"], **meta["config"])
    state = get_state(model, required=False)
    if state is None:
        check_base(meta, model, directory, strict_base)
        adapt(model, config)
    elif state.config != config:
        raise CheckpointError(
            f"model is adapted with {state.config.method} {state.config.to_dict()} but the "
            f"checkpoint at {directory} holds {config.method} {config.to_dict()}"
        )
    try:
        tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(directory) / WEIGHTS_NAME}: {e}") from None
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter at {directory} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"tensor {k} has shape {tuple(v.shape)} in {directory} but "
                f"{tuple(expected[k].shape)} in the model"
            )
    with torch.no_grad():
        current = model.state_dict(keep_vars=True)
        for k, v in tensors.items():
            current[k].copy_(v)
    return model
