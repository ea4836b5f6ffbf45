"""The monitor's HTTP side: POST /v1/items (API key) ingests items; GET / is the page (per-company
negative-share timelines and the alert list, drawn from the JSON endpoints with the key the user types in); GET /v1/timelines and
/v1/alerts (API key) return the same data as JSON; /health and /healthz; /docs (offline); /readyz (the folder poller's state: 503 when
it stopped or its last poll failed, and the files it quarantined); /metrics (API key). The middleware, keys,
limits and PII-masked access log are lmtune serve's. A background thread polls the watched folder; it
survives any error (logged by type, never with item texts, and counted in
lmtune_monitor_poll_errors_total / lmtune_monitor_files_quarantined_total)."""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel, Field

from lmtune.apps.monitor import Monitor, items_of_rows
from lmtune.errors import InputError
from lmtune.serve.app import ErrorResponse, Metrics, RequestContext, ServeSettings, add_service_routes
from lmtune.serve.security import PiiFilter, load_keys

log = logging.getLogger("lmtune.monitor")
PAGE = Path(__file__).with_name("page.html")
PROTECTED = ("/v1/items", "/v1/timelines", "/v1/alerts", "/metrics")


@dataclass
class PollerState:
    """What /readyz reports about the folder poller (written by its thread, read by the handlers)."""
    watching: bool = False
    thread: threading.Thread | None = None
    polls: int = 0
    last_poll_at: str | None = None
    last_error: str | None = None  # the last poll's failure (None once a poll succeeds)
    quarantined: int = 0
    recent_quarantined: list = field(default_factory=list)  # the last 20: {file, reason, moved_to, at}

    def report(self) -> tuple[int, dict]:
        alive = self.thread is not None and self.thread.is_alive()
        if not self.watching:
            return 200, {"status": "ready", "watch": None}
        status = "not ready" if not alive or self.last_error else "degraded" if self.quarantined else "ready"
        return (503 if status == "not ready" else 200), {
            "status": status, "watch": {"poller_alive": alive, "polls": self.polls, "last_poll_at": self.last_poll_at,
                                        "last_error": self.last_error, "files_quarantined": self.quarantined,
                                        "recent_quarantined": self.recent_quarantined}}


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ItemsRequest(BaseModel):
    items: list[dict] = Field(..., description='News items: {"id"?, "time" (ISO 8601 or epoch seconds), "text", "source"?}')


class FolderPoller:
    """The background thread that polls the watched folder, its counters and the state /readyz reports.
    `lock` lets one writer at a time into the database from this process: the poller or a POST."""

    def __init__(self, monitor: Monitor, metrics: Metrics, watching: bool) -> None:
        self.monitor = monitor
        self.ingested = Counter("lmtune_monitor_items_total", "Items processed", registry=metrics.registry)
        self.quarantined = Counter("lmtune_monitor_files_quarantined_total",
                                   "Watched files that could not be ingested (moved to quarantine/)", registry=metrics.registry)
        self.poll_errors = Counter("lmtune_monitor_poll_errors_total",
                                   "Polls of the watched folder that failed (the poller goes on)", registry=metrics.registry)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.state = PollerState(watching=watching)

    def poll_once(self) -> None:
        """One poll; never raises (an exception would end the poller's thread for good)."""
        state = self.state
        try:
            with self.lock:
                result = self.monitor.process_folder()
        except Exception as e:  # noqa: BLE001 (the database is down, the folder is gone, ...: the next poll retries)
            self.poll_errors.inc()
            reason = str(e) if isinstance(e, InputError) else type(e).__name__  # other messages may quote item texts
            if reason != state.last_error:  # once per distinct failure, not every poll
                log.error("watched folder: poll failed: %s (the poller retries every %ss)", reason, self.monitor.cfg.poll_seconds)
            state.last_error = reason
        else:
            self.ingested.inc(result["processed"])
            self.quarantined.inc(len(result["quarantined"]))
            state.quarantined += len(result["quarantined"])
            state.recent_quarantined = (state.recent_quarantined + [{**q, "at": _stamp()} for q in result["quarantined"]])[-20:]
            state.last_error = None
        state.polls += 1
        state.last_poll_at = _stamp()

    def _loop(self) -> None:
        while not self.stop.wait(self.monitor.cfg.poll_seconds):
            self.poll_once()

    def start(self) -> None:
        if self.state.watching:
            self.state.thread = threading.Thread(target=self._loop, name="monitor-poller", daemon=True)
            self.state.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.state.thread:
            self.state.thread.join(30)


def create_app(monitor: Monitor, settings: ServeSettings, watch: bool = True) -> FastAPI:
    keys = [] if settings.no_auth else load_keys(settings.key_file)
    if not keys and not settings.no_auth:
        raise InputError("monitor: no API key configured. Set LMTUNE_API_KEYS (comma-separated) or --api-key-file; "
                         "--no-auth serves without keys (local experiments only).")
    metrics = Metrics()
    poller = FolderPoller(monitor, metrics, watching=bool(watch and monitor.cfg.watch))
    lock, state, ingested = poller.lock, poller.state, poller.ingested

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for h in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
            h.addFilter(PiiFilter())
        poller.start()
        yield
        poller.close()

    app = FastAPI(title="lmtune monitor", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)  # offline /docs: add_service_routes
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes, keys=keys, protected=PROTECTED,
                       known_paths=(*PROTECTED, "/", "/health", "/healthz", "/readyz"))

    require_key = add_service_routes(app, metrics, keys, None)

    @app.post("/v1/items", dependencies=[Depends(require_key)],
              responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         503: {"model": ErrorResponse}})
    async def post_items(body: ItemsRequest) -> dict:
        if len(body.items) > settings.max_texts:
            raise HTTPException(413, f"{len(body.items)} items in one request; the limit is {settings.max_texts}")
        try:
            items = items_of_rows(list(enumerate(body.items, 1)), "items")
        except InputError as e:
            raise HTTPException(422, str(e).replace("items: line", "item")) from None
        if any(len(it.text) > settings.max_chars for it in items):
            raise HTTPException(413, f"an item's text is over {settings.max_chars} characters")

        def run() -> dict:
            with lock:
                return monitor.ingest(items)
        try:
            result = await asyncio.to_thread(run)
        except sa.exc.OperationalError as e:  # the database is down or locked past its timeout: worth a retry
            log.error("POST /v1/items: database unavailable (%s)", type(e.orig).__name__)
            raise HTTPException(503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"}) from None
        ingested.inc(result["processed"])
        return result

    @app.get("/readyz", responses={503: {"description": "The folder poller stopped or its last poll failed"}})
    async def readyz() -> JSONResponse:
        status, body = state.report()
        return JSONResponse(body, status)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/timelines", dependencies=[Depends(require_key)])
    async def timelines() -> dict:
        return await asyncio.to_thread(monitor.timelines)

    @app.get("/v1/alerts", dependencies=[Depends(require_key)])
    async def alerts() -> list:
        return await asyncio.to_thread(monitor.alerts)

    return app


def serve(monitor: Monitor, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8020) -> None:
    import uvicorn

    from lmtune.serve.app import configure_protocol
    from lmtune.serve.protocol import GuardedHttpProtocol
    configure_protocol(settings)
    uvicorn.run(create_app(monitor, settings), host=host, port=port, log_level="info", access_log=False, http=GuardedHttpProtocol,
                timeout_keep_alive=5, timeout_graceful_shutdown=30)
