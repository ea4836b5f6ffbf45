"""The generations of one server, whichever route asked for them (/v1/generate, the OpenAI routes): one at a
time through one queue, a failure logged without the prompt, and a streamed one cancelled when its client
goes away."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from fastapi import HTTPException, Request
from prometheus_client import Counter

from lmtune.serve.checks import error_origin
from lmtune.serve.security import STRUCTURED

if TYPE_CHECKING:
    from lmtune.serve.streaming import CancellableStream

log = logging.getLogger("lmtune.serve")
T = TypeVar("T")


class GenerationFailed(Exception):
    """The model raised while generating (already logged, without the prompt)."""


class GenerationQueue:
    """The generations of one server, whichever route asked (/v1/generate, the OpenAI routes): one runs at a
    time (each takes the cores), up to `limit` wait, and a request over that gets 503 at once."""

    def __init__(self, limit: int, errors: Counter, texts: Counter) -> None:
        self.limit, self.errors, self.texts = limit, errors, texts  # the server's Prometheus counters
        self.gate, self.count_lock, self.waiting = threading.Lock(), threading.Lock(), 0

    def admit(self) -> None:
        """Count a request in (before its response starts), or answer 503 when the queue is full."""
        with self.count_lock:
            if self.waiting >= self.limit:
                self.errors.labels("queue_full").inc()
                raise HTTPException(503, "server busy: too many generations waiting, retry shortly", headers={"Retry-After": "2"})
            self.waiting += 1

    def run(self, work: Callable[[], T], stream: CancellableStream | None, rid: str) -> T | None:
        """`work()` in its turn (in a worker thread), counted out however it ends; None when the client left
        while the request waited. A model failure is logged without the prompt and raised as GenerationFailed."""
        try:
            with self.gate:
                if stream is not None and stream.cancelled.is_set():
                    return None  # the client left while this request waited for the model
                out = work()
        except Exception as e:  # the type and place only: a model's message can quote the prompt
            log.error("generation failed for request %s: %s", rid, error_origin(e), extra={STRUCTURED: True})
            self.errors.labels("model").inc()
            raise GenerationFailed() from None
        finally:
            with self.count_lock:
                self.waiting -= 1
            if stream is not None:
                stream.end()  # after a failure (or no start) too, so the response is never left waiting
        self.texts.inc()
        return out


async def while_connected(request: Request, stream: CancellableStream, work: Awaitable[T]) -> T:
    """A non-streamed generation awaited while a watcher cancels it (through `stream`'s stopping criterion,
    nobody reads its pieces) once the client has gone, so a dropped request frees the queue within a step."""
    watcher = asyncio.ensure_future(cancel_on_disconnect(request, stream))
    try:
        return await work
    finally:
        watcher.cancel()


async def cancel_on_disconnect(request: Request, stream: CancellableStream, every_s: float = 0.25) -> None:
    """Cancels `stream` once its client has gone, even while nothing is being sent to it (a request waiting
    in the queue, a slow first token)."""
    while not stream.cancelled.is_set():
        if await request.is_disconnected():
            stream.cancel()
            return
        await asyncio.sleep(every_s)
