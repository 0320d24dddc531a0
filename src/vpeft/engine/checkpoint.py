"""Training-state checkpoints, so that ``--resume`` ends where an uninterrupted run would.

After every epoch the main process writes ``train_state.pt`` (atomically): the trainable and
added tensors, the optimizer, the LR schedule, the gradient scaler, every RNG state, the epoch and
the metrics so far. The data order needs no state (it is a function of seed and epoch). The file is
read back with ``torch.load(weights_only=True)``, so it holds only tensors and plain containers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpeft.core.checkpoint import CheckpointError, atomic_write
from vpeft.core.state import adapter_state_dict

STATE_NAME = "train_state.pt"
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples it gave, which a round trip may turn to lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: Any, epoch: int, extra: dict[str, Any]) -> None:
    """Write the state after ``epoch`` epochs (a count) to ``path``, atomically."""
    state = {
        "version": STATE_VERSION,
        "epoch": epoch,
        "model": {k: v.cpu() for k, v in adapter_state_dict(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "extra": extra,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a vpeft training state (version {STATE_VERSION})")
    return state


def restore_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable / added tensors into ``model``; the names must match exactly."""
    current = model.state_dict(keep_vars=True)
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"training state does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            current[k].copy_(v)
