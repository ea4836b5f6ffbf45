"""The monitor's HTTP side: POST /v1/items (API key) ingests items; GET / is the page (per-company
negative-share timelines and the alert list, drawn from the JSON endpoints with the key the user types in); GET /v1/timelines and
/v1/alerts (API key) return the same data as JSON; /healthz; /metrics (API key). The middleware, keys,
limits and PII-masked access log are lmtune serve's. A background thread polls the watched folder."""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from prometheus_client import Counter
from pydantic import BaseModel, Field

from lmtune.apps.monitor import Monitor, items_of_rows
from lmtune.errors import InputError
from lmtune.serve.app import ErrorResponse, Metrics, RequestContext, ServeSettings, add_service_routes
from lmtune.serve.security import PiiFilter, load_keys

log = logging.getLogger("lmtune.monitor")
PAGE = Path(__file__).with_name("page.html")
PROTECTED = ("/v1/items", "/v1/timelines", "/v1/alerts", "/metrics")


class ItemsRequest(BaseModel):
    items: list[dict] = Field(..., description='News items: {"id"?, "time" (ISO 8601 or epoch seconds), "text", "source"?}')


def create_app(monitor: Monitor, settings: ServeSettings, watch: bool = True) -> FastAPI:
    keys = [] if settings.no_auth else load_keys(settings.key_file)
    if not keys and not settings.no_auth:
        raise InputError("monitor: no API key configured. Set LMTUNE_API_KEYS (comma-separated) or --api-key-file; "
                         "--no-auth serves without keys (local experiments only).")
    metrics = Metrics()
    ingested = Counter("lmtune_monitor_items_total", "Items processed", registry=metrics.registry)
    lock, stop = threading.Lock(), threading.Event()  # one writer at a time: the folder poller or a POST

    def poll() -> None:
        while not stop.wait(monitor.cfg.poll_seconds):
            try:
                with lock:
                    ingested.inc(monitor.process_folder()["processed"])
            except InputError as e:
                log.error("watched folder: %s", e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for h in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
            h.addFilter(PiiFilter())
        thread = threading.Thread(target=poll, daemon=True) if watch and monitor.cfg.watch else None
        if thread:
            thread.start()
        yield
        stop.set()
        if thread:
            thread.join(30)

    app = FastAPI(title="lmtune monitor", version="1", lifespan=lifespan)
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes, keys=keys, protected=PROTECTED,
                       known_paths=(*PROTECTED, "/", "/healthz"))

    require_key = add_service_routes(app, metrics, keys, None)

    @app.post("/v1/items", dependencies=[Depends(require_key)], responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
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
        result = await asyncio.to_thread(run)
        ingested.inc(result["processed"])
        return result

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
