"""Serving: predictions of saved runs, and an HTTP server over a MultiTaskModel.

>>> from vpeft.serve import create_app, load_server
>>> server = load_server({"cifar10": "runs/cifar10-lora", "mnist": "runs/mnist-lora"})
>>> uvicorn.run(create_app(server), host="127.0.0.1", port=8000)

The server needs the ``serve`` extra (``pip install "vpeft[serve]"``: FastAPI, uvicorn,
python-multipart); :mod:`vpeft.serve.predict` (what ``vpeft predict`` uses) does not, so names
are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TaskServer": "vpeft.serve.app", "create_app": "vpeft.serve.app",
            "load_server": "vpeft.serve.app", "BatchQueue": "vpeft.serve.batching"}
__all__ = ["BatchQueue", "TaskServer", "create_app", "load_server"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vpeft.serve' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
