"""Dynamic batching: concurrent requests share one forward pass of the one model copy.

Each request puts its items on an asyncio queue and awaits a future. One worker task takes the first waiting
request, then keeps taking requests until the batch holds ``max_batch`` items or ``max_wait_ms`` has passed since
the first was taken (whichever comes first; a request is never split), runs ``run_batch`` on all their items in
the model thread, and hands each request its slice of the results. Under light load a request waits at most
``max_wait_ms``; under heavy load batches fill up and the wait is shorter. ``max_batch=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than ``queue_limit``: the caller answers 503 with Retry-After."""


@dataclass
class _Pending:
    items: list[Any]
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """``await batcher.submit(items)`` -> ``run_batch(items)``'s results for those items, batched with others.

    ``run_batch(items) -> list`` (one result per item) runs in ``executor`` (one thread: the model's), so the
    event loop keeps accepting requests while the model computes. If a batch fails, each request in it is retried
    alone so that one bad request cannot fail the others. ``on_batch(n_items)`` observes every batch size.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], executor: Executor, *, max_batch: int,
                 max_wait_ms: float, queue_limit: int = 1024,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise TransferkitError(f"invalid batching (max batch {max_batch}, max wait {max_wait_ms} ms)",
                                   "use --max-batch >= 1 and --max-wait-ms >= 0")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._held: _Pending | None = None  # taken from the queue but too large for the current batch

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._worker = None

    async def submit(self, items: list[Any]) -> list[Any]:
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if self._queue.qsize() >= self.queue_limit:
            raise QueueFull
        pending = _Pending(list(items), asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._held is not None:
            pending, self._held = self._held, None
            return pending
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first.items)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            pending = await self._next(deadline - loop.time())
            if pending is None:
                break
            if pending.future.done():  # its client went away (cancelled): skip it
                continue
            if size + len(pending.items) > self.max_batch:
                self._held = pending  # first of the next batch
                break
            batch.append(pending)
            size += len(pending.items)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]
            if not batch:
                continue
            items = [item for p in batch for item in p.items]
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, items)
                if self.on_batch is not None:
                    self.on_batch(len(items))
            except Exception as exc:  # isolate the request that caused it
                if len(batch) == 1:
                    _settle(batch[0], exception=exc)
                    continue
                for pending in batch:
                    try:
                        result = await loop.run_in_executor(self.executor, self.run_batch, pending.items)
                        if self.on_batch is not None:
                            self.on_batch(len(pending.items))
                        _settle(pending, result=list(result))
                    except Exception as single:
                        _settle(pending, exception=single)
                continue
            start = 0
            for pending in batch:
                _settle(pending, result=list(results[start:start + len(pending.items)]))
                start += len(pending.items)


def _settle(pending: _Pending, *, result: list[Any] | None = None, exception: BaseException | None = None) -> None:
    if pending.future.done():
        return
    if exception is not None:
        pending.future.set_exception(exception)
    else:
        pending.future.set_result(result)
