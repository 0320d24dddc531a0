"""A small asynchronous batching queue: requests that arrive together run as one batch.

Each request awaits :meth:`BatchQueue.submit`; one worker coroutine takes the first waiting
request, gathers whatever else arrives within ``max_wait_ms`` (up to ``max_batch`` requests) and
hands the batch to ``run`` in a worker thread, so the event loop keeps accepting and decoding
uploads while the model computes. A lone request waits at most ``max_wait_ms``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches

    def add(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        mean = self.requests / self.batches if self.batches else 0.0
        return {"batches": self.batches, "requests": self.requests, "mean_batch": mean,
                "largest_batch": self.largest}


class BatchQueue:
    """Collects ``(key, item)`` requests into batches for ``run(keys, items) -> results``.

    ``run`` is called in a thread with the requests of one batch, in arrival order, and returns
    one result per request; if it raises, every request of that batch gets the error.
    """

    def __init__(self, run: Callable[[Sequence[str], Sequence[Any]], Sequence[Any]],
                 max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, "
                             f"{max_wait_ms}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def submit(self, key: str, item: Any) -> Any:
        """Queue one request and wait for its result."""
        if self._queue is None:
            raise RuntimeError("the batch queue is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((key, item, future))
        return await future

    async def _collect(self) -> list[tuple[str, Any, asyncio.Future]]:
        queue = self._queue
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return [b for b in batch if not b[2].done()]  # a client that left is not computed

    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.stats.add(len(batch))
            try:
                results = await asyncio.to_thread(
                    self.run, [b[0] for b in batch], [b[1] for b in batch])
            except Exception as e:  # the server keeps serving; these requests get the error
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
