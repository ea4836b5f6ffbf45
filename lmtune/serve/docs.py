"""Offline /docs and /redoc for every lmtune FastAPI app (serve, the apps' servers, the dashboard).

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank without internet. Here they
load the same files from the fastapi-offline package (Swagger UI 5, which reads FastAPI's OpenAPI 3.1
document as it is, and ReDoc's standalone bundle), served under /docs/assets, through FastAPI's
get_swagger_ui_html / get_redoc_html (FastAPI's "custom docs UI static assets" recipe). We take only
the package's files, not its FastAPIOffline class, so every app keeps its own FastAPI construction and
middleware. Each app is built with docs_url=None and redoc_url=None, then calls mount_offline_docs(app).

The routes take no authentication of their own: they pass the app's middleware like any route, so /docs is
exactly as open as /openapi.json (public on serve and the apps; behind the Host check and token on the
dashboard).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"


def docs_assets_dir() -> Path:
    """The folder of the bundled files: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def mount_offline_docs(app: FastAPI, title: str | None = None) -> None:
    """/docs (Swagger UI) and /redoc from the installed package, no CDN, on an app built with docs_url=None
    and redoc_url=None, and the assets they load. The routes are left out of the OpenAPI document."""
    if app.docs_url is not None or app.redoc_url is not None:  # FastAPI's own (CDN) pages would answer first
        raise ValueError(f"{app.title}: build the FastAPI app with docs_url=None and redoc_url=None to serve offline docs")
    app.mount(ASSETS_URL, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    page_title = f"{title or app.title} - API docs"

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")  # behind a proxy that mounts the app under a prefix

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        r = root(request)
        return get_swagger_ui_html(openapi_url=r + app.openapi_url, title=page_title,
                                   swagger_js_url=f"{r}{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{r}{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{r}{ASSETS_URL}/favicon.png")

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        r = root(request)
        # with_google_fonts=False: the fonts would come from Google's CDN; ReDoc falls back to system fonts
        return get_redoc_html(openapi_url=r + app.openapi_url, title=page_title, with_google_fonts=False,
                              redoc_js_url=f"{r}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{r}{ASSETS_URL}/favicon.png")
