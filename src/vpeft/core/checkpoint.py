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

from vpeft.core.config import MethodConfig
from vpeft.core.state import (
    Rollback,
    adapt,
    adapter_state_dict,
    base_identity,
    check_module,
    get_state,
)
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
    from vpeft.interop.card import write_card

    write_card(out, meta=meta)
    return out


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of ``directory/adapter_config.json``; :class:`CheckpointError` naming
    the file and the problem when it is missing, not JSON, or lacks what a checkpoint holds."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no vpeft adapter at {directory}: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}, "
            f"this vpeft reads {FORMAT_VERSION}"
        )
    problems = [f"'{key}' must be {what}" for key, kind, what in _META_FIELDS
                if not isinstance(meta.get(key), kind)]
    base = meta.get("base")
    if isinstance(base, dict):
        problems += [f"'base' lacks '{k}'" for k in _BASE_FIELDS if k not in base]
    if problems:
        raise CheckpointError(f"{path} is not a vpeft adapter config: " + "; ".join(problems))
    return meta


_META_FIELDS = (("method", str, "a method name"), ("config", dict, "a mapping of options"),
                ("base", dict, "a mapping that describes the base model"))
_BASE_FIELDS = ("architecture", "class", "num_classes", "shape_hash")


def config_from_meta(meta: dict[str, Any], directory: str | os.PathLike) -> MethodConfig:
    """The method config that ``meta`` (from :func:`read_config`) describes, checked."""
    try:
        return make_config(meta["method"], **meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        message = e.args[0] if e.args else e
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME} holds a method config this vpeft cannot use: "
            f"{message}"
        ) from None


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory/adapter.safetensors``, read in full (so a cut file fails)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


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
    """Load an adapter saved by :func:`save` (or a Hugging Face PEFT adapter folder, as
    ``hf:<tuner>``) into ``model`` and return it.

    ``model`` is either a plain base model (it is adapted with the saved config first) or one
    already adapted with the same config. A mismatch in architecture, class count or config raises
    :class:`CheckpointError` saying what differs. Everything is read and checked before the model
    changes; if the saved tensors do not fit the adapted model, the adaptation is undone.
    """
    check_module(model)
    from vpeft.interop.peft_format import is_peft_folder, load_peft

    if is_peft_folder(directory):  # a Hugging Face PEFT adapter (adapter_model.safetensors)
        return load_peft(model, directory)
    meta = read_config(directory)
    config = config_from_meta(meta, directory)
    tensors = read_tensors(directory)
    state = get_state(model, required=False)
    if state is None:
        check_base(meta, model, directory, strict_base)
        rollback = Rollback(model)  # the state attribute is not there yet: restore drops it
        adapt(model, config)
        try:
            check_tensors(model, tensors, directory)
        except BaseException:
            rollback.restore()
            raise
    elif state.config != config:
        raise CheckpointError(
            f"model is adapted with {state.config.method} {state.config.to_dict()} but the "
            f"checkpoint at {directory} holds {config.method} {config.to_dict()}"
        )
    else:
        check_tensors(model, tensors, directory)
    with torch.no_grad():
        current = model.state_dict(keep_vars=True)
        for k, v in tensors.items():
            current[k].copy_(v)
    return model


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                  directory: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` are exactly the adapted ``model``'s
    trained and added tensors, with the same shapes."""
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
