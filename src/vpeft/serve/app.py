"""The HTTP server over a :class:`~vpeft.MultiTaskModel`: one backbone, many task adapters.

Endpoints (FastAPI; every error is a JSON ``{"detail": message}`` with a 4xx status, and the
server keeps serving):

* ``POST /predict/<task>?top_k=5``: an image (a multipart form field ``file``, or the raw bytes
  as the body) -> ``{"task", "predictions": [{"label", "index", "probability"}, ...]}``;
* ``GET /tasks``: each task's method, classes and parameter count, and the shared backbone's;
* ``GET /health``: ``{"status": "ok"}``, the tasks and the batching so far.

Uploads are decoded and preprocessed in worker threads; requests that arrive within a few
milliseconds of each other run as one mixed-task batch (:class:`~vpeft.serve.batching.BatchQueue`
and :meth:`~vpeft.MultiTaskModel.forward_mixed`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from starlette.formparsers import MultiPartException, MultiPartParser

from vpeft.core.multitask import MultiTaskModel
from vpeft.core.state import get_state
from vpeft.serve.batching import BatchQueue
from vpeft.serve.predict import Transform, class_names, decode_image, run_transform, top_k

logger = logging.getLogger(__name__)

MAX_UPLOAD = 10 * 2**20  # bytes


@dataclass
class TaskServer:
    """What the server holds: the tasks, each task's class names, the shared preprocessing."""

    tasks: MultiTaskModel
    classes: dict[str, list[str]]
    transform: Transform
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def predict(self, names: Sequence[str], images: Sequence[tuple[torch.Tensor, int]]
                ) -> list[list[dict[str, Any]]]:
        """Top-k predictions of a batch of ``(preprocessed image, k)``, image ``i`` by task
        ``names[i]``, in one mixed-task forward."""
        x = torch.stack([img for img, _ in images]).to(self.device)
        with torch.inference_mode():
            logits = self.tasks.forward_mixed(x, names)
        return [top_k(row.cpu(), self.classes[n], k)
                for row, n, (_, k) in zip(logits, names, images)]

    def describe(self) -> dict[str, Any]:
        counts = self.tasks.parameter_counts()
        return {
            "backbone": {"class": type(self.tasks.backbone).__name__,
                         "params": counts["backbone"]},
            "tasks": [{"name": n, "method": get_state(m).config.method,
                       "num_classes": len(self.classes[n]), "params": counts[n]}
                      for n, m in self.tasks.tasks.items()],
        }


def load_server(adapters: dict[str, str | os.PathLike], weights: str | None = None,
                backbone: str | None = None, device: str | torch.device = "cpu") -> TaskServer:
    """A :class:`TaskServer` with the adapter of each run folder (``{task: run}``) on one
    backbone: the first run's (its model, weights, image size), or ``backbone``/``weights``.

    Every run must have been trained on that backbone at the same image size, so that one
    preprocessing is each run's own evaluation preprocessing.
    """
    import vpeft
    from vpeft.engine.model import build_backbone
    from vpeft.engine.rundir import RunDir
    from vpeft.engine.runtime import seed_everything

    if not adapters:
        raise ValueError("give at least one adapter (--adapter NAME=RUN)")
    configs = {}
    for name, run in adapters.items():
        folder = RunDir(run)
        if not folder.file("config.yaml").is_file():
            raise FileNotFoundError(f"adapter {name}: {run} is not a vpeft run folder "
                                    "(no config.yaml)")
        configs[name] = folder.read_config()
    first = next(iter(configs.values()))
    heads = {n: vpeft.read_config(run)["base"]["num_classes"] for n, run in adapters.items()}
    model_name = backbone or first.model
    for name, c in configs.items():
        if c.model != model_name or c.img_size != first.img_size:
            raise ValueError(f"adapter {name} was trained on {c.model} at {c.img_size} px, not "
                             f"{model_name} at {first.img_size} px; serve it separately")
        if not first.pretrained and (c.pretrained or c.seed != first.seed
                                     or heads[name] != heads[next(iter(heads))]):
            # a random init draws the head first: another class count is another backbone
            raise ValueError(f"adapter {name} was not trained on the first one's random-init "
                             "backbone (pretrained off: same seed and class count needed)")
    seed_everything(first.seed)  # a random-init backbone comes back as the runs saw it
    base = build_backbone(model_name, next(iter(heads.values())), weights or first.weights,
                          first.pretrained, first.img_size, first.model_args)
    tasks = MultiTaskModel(base.eval())
    classes = {}
    for name, run in adapters.items():
        model = tasks.load(name, run)
        classes[name] = class_names(RunDir(run).read_classes(), model.num_classes)
    device = torch.device(device)
    return TaskServer(tasks.to(device).eval(), classes, run_transform(base, first), device)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared)} bytes is larger than the limit of "
                                 f"{limit} bytes")
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise HTTPException(413, f"upload is larger than the limit of {limit} bytes")
        yield chunk


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded file: form field ``file`` of a multipart body, or the raw body."""
    body = _limited(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return b"".join([chunk async for chunk in body])
    try:
        form = await MultiPartParser(request.headers, body, max_files=1, max_fields=10,
                                     max_part_size=limit).parse()
    except MultiPartException as e:
        raise HTTPException(400, f"bad multipart upload: {e.message}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "the multipart form has no file field named 'file'")
    return await upload.read()


def create_app(server: TaskServer, max_upload: int = MAX_UPLOAD, max_batch: int = 32,
               max_wait_ms: float = 5.0) -> FastAPI:
    """The FastAPI application serving ``server``'s tasks."""
    queue = BatchQueue(server.predict, max_batch=max_batch, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        yield
        await queue.stop()

    app = FastAPI(title="vpeft", summary="one backbone, many task adapters", lifespan=lifespan)
    app.state.server, app.state.queue = server, queue

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": server.tasks.names, "batching": queue.stats.as_dict()}

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        return server.describe()

    @app.post("/predict/{task}")
    async def predict(task: str, request: Request,
                      top_k: int = Query(5, ge=1, le=1000)) -> dict[str, Any]:
        if task not in server.classes:
            raise HTTPException(404, f"no task {task!r}; tasks: {', '.join(server.tasks.names)}")
        data = await read_image_bytes(request, max_upload)
        try:
            image = await asyncio.to_thread(lambda: server.transform(decode_image(data)))
        except ValueError as e:
            raise HTTPException(415, str(e)) from None
        predictions = await queue.submit(task, (image, top_k))
        return {"task": task, "predictions": predictions}

    return app
