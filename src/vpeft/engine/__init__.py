"""Training and evaluation on HF Accelerate: ``train(TrainConfig(...))``, ``evaluate_run(run)``.

>>> from vpeft.engine import TrainConfig, train
>>> results = train(TrainConfig(model="deit_tiny_patch16_224", data="data/cifar10",
...                             method="lora", method_args={"rank": 8}, out="runs/c10-lora"))
>>> results["top1"]

Names are imported on first use, so that the light ``vpeft.engine.config`` (what the command line
builds its flags from) can be imported without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainConfig": "vpeft.engine.config",
    "EvalResult": "vpeft.engine.evaluate",
    "evaluate": "vpeft.engine.evaluate",
    "evaluate_run": "vpeft.engine.evaluate",
    "SearchConfig": "vpeft.engine.search_config",
    "search": "vpeft.engine.search",
    "train": "vpeft.engine.train",
}

__all__ = ["EvalResult", "SearchConfig", "TrainConfig", "evaluate", "evaluate_run", "search",
           "train"]

if TYPE_CHECKING:
    from vpeft.engine.config import TrainConfig
    from vpeft.engine.evaluate import EvalResult, evaluate, evaluate_run
    from vpeft.engine.search import search
    from vpeft.engine.search_config import SearchConfig
    from vpeft.engine.train import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vpeft.engine' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps the functions ``train``, ``evaluate`` and ``search`` ahead of their same-named modules.

    Importing the sub-module ``vpeft.engine.train`` sets the package attribute ``train`` to the
    module; an eager ``from vpeft.engine.train import train`` used to rebind it to the function.
    Lazily, that rebinding happens here, whenever the import system sets the attribute.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
