"""Slow-client guard for uvicorn's HTTP protocol.

uvicorn times out only idle keep-alive connections: a client that sends its request head or body
one byte a second holds a socket (and a file descriptor) for as long as it likes, and a thousand
of them exhaust the process's open-file limit, so even /healthz fails. This protocol bounds
  - the time from the first byte of a request (or from connecting) to the end of its head,
  - the time from the end of the head to the end of the body,
  - the number of open connections: over the cap, a new connection evicts the oldest one that is
    still sending its request head or idle between requests, and is refused only if there is none.
Hand-written because uvicorn has no such options; it subclasses uvicorn's httptools protocol and
changes nothing else. Production deployments should still sit behind a reverse proxy (nginx,
Envoy, a cloud load balancer) that buffers requests; this keeps a directly exposed port alive.
"""
from __future__ import annotations

import asyncio
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FD_RESERVE = 64  # descriptors kept free for the model, logs and the listening socket


def connection_cap(wanted: int) -> int:
    """At most `wanted`, and safely below the process's open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - FD_RESERVE))


class GuardedHttpProtocol(HttpToolsProtocol):
    # set once per process by configure() (class attributes, so uvicorn's worker processes that
    # import this class by name get them from their own configure call)
    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 1000

    @classmethod
    def configure(cls, header_timeout: float, body_timeout: float, max_connections: int) -> None:
        cls.header_timeout, cls.body_timeout = header_timeout, body_timeout
        cls.max_connections = connection_cap(max_connections)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase, self._since = "head", 0.0
        super().connection_made(transport)
        self._since = self.loop.time()
        self._arm(self.header_timeout)
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        waiting = [c for c in self.connections if isinstance(c, GuardedHttpProtocol) and c is not self and c._phase in ("head", "idle")]
        victim = min(waiting, key=lambda c: c._since) if waiting else self
        victim.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._since = "head", self.loop.time()
        self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "app"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._phase, self._since = "idle", self.loop.time()  # uvicorn's keep-alive timeout takes over
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
