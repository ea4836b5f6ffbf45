"""Dynamic batching: concurrent requests are coalesced into one model call.

Requests wait at most `max_wait_ms` for company, up to `max_batch_size` texts per model call; the
model runs in one worker thread (the event loop keeps accepting), and predict_outputs sorts each
batch by length, so padding stays small. The queue is bounded in texts: when it is full, submit
raises QueueFull (the service answers 503 with Retry-After) instead of growing memory.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("lmtune.serve")


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future


class Batcher:
    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Callable[[int], None] | None = None):
        self.predict, self.max_batch_size, self.max_wait = predict, max_batch_size, max_wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self.pending = 0  # texts queued or in the model
        self.closed = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmtune-model")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the worker on the running event loop (again if the loop changed: test clients that
        run each request in its own loop)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = self._loop.create_task(self._run())

    async def submit(self, texts: list[str]) -> list[dict]:
        if self.closed:
            raise Closed()
        if self._loop is not asyncio.get_running_loop():
            self.start()
        if self.pending + len(texts) > self.max_queue:
            raise QueueFull()
        self.pending += len(texts)
        item = _Item(texts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        return await item.future

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        self.closed = True
        while self.pending:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0].texts)
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                batch.append(item)
                n += len(item.texts)
            texts = [t for item in batch for t in item.texts]
            try:
                await self._answer(loop, batch, texts)
            finally:
                self.pending -= n
                if self.on_batch:
                    self.on_batch(len(texts))

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], texts: list[str]) -> None:
        """One model call for the batch; if it fails, each request is retried alone, so a request the
        model cannot handle fails by itself and never takes its batch-mates down with it."""
        try:
            rows = await loop.run_in_executor(self._executor, self.predict, texts)
        except Exception as e:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            log.warning("a batch of %d requests failed; retrying each alone", len(batch))
            for item in batch:
                await self._answer(loop, [item], item.texts)
            return
        k = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(rows[k:k + len(item.texts)])
            k += len(item.texts)
