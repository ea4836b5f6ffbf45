"""`lmtune ui [RUNS_DIR]`: a local web dashboard to run, inspect, compare and try runs.

Stack: FastAPI (already lmtune's server) with Jinja2 templates rendered on the server, a small
hand-written script and stylesheet shipped in the package (lmtune/ui/static), and SVG charts drawn in
Python (views.py). Nothing is fetched from the internet, there is no build step, and every page works
from the structured results the runs wrote (results.json, metrics.json, history.jsonl).
Live charts of a run in progress (train.js, live.js) draw its events.jsonl, streamed as server-sent
events (live.py), with uPlot, a small MIT chart library vendored in static/vendor (no CDN either).

Safety (guard.py, confine.py): binds to 127.0.0.1 unless told otherwise, and then only with a token
(LMTUNE_UI_TOKEN or --token-file; the same rules as `serve`'s keys); only requests whose Host names the
dashboard are answered (DNS rebinding); POST calls need the X-Lmtune-UI header, which a page on another
site cannot send without a CORS preflight this server never grants; uploads are size- and type-limited;
every file path, job configs' included, is confined to the working directory and the --allow-path folders.

The routes live in pages.py and api.py; they reach the dashboard's state (UiState) through app.state.
"""
from __future__ import annotations

import asyncio
import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.errors import InputError
from lmtune.serve.docs import mount_offline_docs
from lmtune.ui.guard import COOKIE, guard  # noqa: F401  (COOKIE: the token cookie's name, for callers)
from lmtune.ui.state import HERE, UiSettings, UiState, state  # noqa: F401  (re-exported: callers import them from here)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, exc.status_code)


async def _body_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not the JSON object a route takes: 422 with one readable line (the page shows it)."""
    where = lambda e: ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"  # noqa: E731
    return JSONResponse({"detail": "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5])}, 422)


def create_ui(settings: UiSettings) -> FastAPI:
    from lmtune.ui import api, pages
    from lmtune.ui import label, train_api
    ui = UiState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(ui.jobs.close)  # no training child outlives the UI

    # /openapi.json describes the API (schemathesis tests it); /docs is Swagger UI from the installed package (no CDN)
    app = FastAPI(title="lmtune ui", docs_url=None, redoc_url=None, lifespan=lifespan)
    mount_offline_docs(app)
    app.state.ui = ui
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.middleware("http")(guard)
    # the routers' routes go straight into the app's table (not include_router, which this FastAPI keeps as one
    # nested entry): app.routes lists every route, and the tests walk it to check the Host guard on each
    app.router.routes.extend(pages.router.routes + api.router.routes)
    app.router.routes.extend(train_api.router.routes)
    app.router.routes.extend(label.router.routes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _body_error)
    return app


def ui_token(token_file: str | None = None) -> str | None:
    """LMTUNE_UI_TOKEN, else the first line of the token file; at least 16 characters, like serve's keys."""
    import os
    token = os.environ.get("LMTUNE_UI_TOKEN", "").strip()
    if not token and token_file:
        p = Path(token_file)
        if not p.is_file():
            raise InputError(f"{p}: token file not found.")
        token = next((x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip() and not x.startswith("#")), "")
    if token and len(token) < 16:
        raise InputError("ui token shorter than 16 characters; use a long random one "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return token or None


def check_binding(host: str, token: str | None) -> None:
    if host not in LOCAL_HOSTS and not token:
        raise InputError(f"ui: binding to {host} exposes your runs and data; set LMTUNE_UI_TOKEN or --token-file "
                         "(or bind to 127.0.0.1).")


def serve_ui(settings: UiSettings, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn
    check_binding(host, settings.token)
    # the Host check answers the name it is bound to
    uvicorn.run(create_ui(dataclasses.replace(settings, host=host)), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)  # a live-chart stream (SSE) open in a browser must not hold Ctrl-C until training ends
