"""Offline /docs for every lmtune FastAPI app (serve, the apps' servers, the dashboard).

FastAPI's own /docs page loads Swagger UI's script and stylesheet from a CDN, so it is blank without
internet. Here the page loads them from the swagger-ui-bundle package, served under /docs/assets, with
FastAPI's get_swagger_ui_html (FastAPI's "custom docs UI static assets" recipe). Each app is built with
docs_url=None and redoc_url=None (ReDoc has no offline bundle), then calls mount_offline_docs(app).

The bundled Swagger UI is 4.x, which refuses OpenAPI 3.1 documents ("Unable to render this definition"),
and FastAPI writes 3.1. So when the bundle is older than 5, the page reads /docs/openapi-3.0.json: the
app's own document written in OpenAPI 3.0 terms (openapi_3_0 below). /openapi.json itself is unchanged:
clients and schemathesis read the real 3.1 document. With a Swagger UI 5 bundle the page reads
/openapi.json directly.

The routes take no authentication of their own: they pass the app's middleware like any route, so /docs is
exactly as open as /openapi.json (public on serve and the apps; behind the Host check and token on the
dashboard).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
OPENAPI_30_URL = "/docs/openapi-3.0.json"


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's built files (swagger-ui-bundle.js, swagger-ui.css, favicons)."""
    from swagger_ui_bundle import swagger_ui_path
    return Path(str(swagger_ui_path))


def swagger_ui_major(folder: Path) -> int:
    """Swagger UI's major version, from the bundle's folder name (vendor/swagger-ui-4.15.5); 0 if unknown."""
    match = re.search(r"(\d+)\.\d+\.\d+$", folder.name)
    return int(match.group(1)) if match else 0


def mount_offline_docs(app: FastAPI, title: str | None = None) -> None:
    """/docs (Swagger UI from the installed package, no CDN) and the assets it loads, on an app built with
    docs_url=None. The routes are left out of the OpenAPI document."""
    if app.docs_url is not None:  # FastAPI's own (CDN) page was registered first and would answer /docs
        raise ValueError(f"{app.title}: build the FastAPI app with docs_url=None and redoc_url=None to serve offline docs")
    folder = swagger_ui_dir()
    reads_31 = swagger_ui_major(folder) >= 5
    app.mount(ASSETS_URL, StaticFiles(directory=folder), name="swagger-ui")
    page_title = f"{title or app.title} - API docs"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that mounts the app under a prefix
        return get_swagger_ui_html(openapi_url=root + (app.openapi_url if reads_31 else OPENAPI_30_URL), title=page_title,
                                   swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_URL}/favicon-32x32.png")

    if not reads_31:
        converted: dict[str, Any] = {}

        @app.get(OPENAPI_30_URL, include_in_schema=False)
        async def openapi_for_swagger_ui() -> JSONResponse:
            if not converted:  # the document is fixed once the app is built (FastAPI caches it too)
                converted.update(openapi_3_0(app.openapi()))
            return JSONResponse(converted)


def openapi_3_0(doc: dict) -> dict:
    """An OpenAPI 3.1 document (FastAPI's, with pydantic's JSON Schemas) rewritten in OpenAPI 3.0 terms, for
    Swagger UI 4: nullable instead of a null type, enum for const, example for examples, the boolean
    exclusive bounds, items for tuple items. For showing only; /openapi.json stays the real document."""
    out = copy.deepcopy(doc)
    out["openapi"] = "3.0.3"
    out.pop("jsonSchemaDialect", None)
    out.pop("webhooks", None)
    out.get("info", {}).pop("summary", None)
    _rewrite(out)
    return out


def _rewrite(node: Any) -> None:
    """Rewrites every schema object inside node, in place (a walk over the whole document: schemas sit in
    components, parameters, request bodies and responses alike)."""
    if isinstance(node, list):
        for item in node:
            _rewrite(item)
        return
    if not isinstance(node, dict):
        return
    for value in node.values():
        _rewrite(value)
    _schema_3_0(node)


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null" and len(schema) <= 2  # {type: null[, title]}


def _schema_3_0(s: dict) -> None:
    """One JSON Schema 2020-12 object as an OpenAPI 3.0 schema object (in place); other dicts pass unchanged."""
    if isinstance(s.get("type"), list):  # type: [string, "null"]
        types = [t for t in s["type"] if t != "null"]
        if len(types) < len(s["type"]):
            s["nullable"] = True
        s["type"] = types[0] if len(types) == 1 else s["type"]
        if isinstance(s["type"], list):
            s["anyOf"] = [{"type": t} for t in s.pop("type")]
    for key in ("anyOf", "oneOf"):
        options = s.get(key)
        if isinstance(options, list) and any(_is_null(o) for o in options):
            rest = [o for o in options if not _is_null(o)]
            s["nullable"] = True
            if len(rest) == 1:  # X | None: X itself, nullable (a $ref's siblings are ignored in 3.0: wrap it)
                s.pop(key)
                only = rest[0]
                if "$ref" in only:
                    s["allOf"] = [only]
                else:
                    for k, v in only.items():
                        s.setdefault(k, v)
            else:
                s[key] = rest
    if "const" in s and "enum" not in s and isinstance(s.get("const"), (str, int, float, bool)):
        s["enum"] = [s.pop("const")]
    if isinstance(s.get("examples"), list) and "example" not in s and _looks_like_schema(s):
        examples = s.pop("examples")
        if examples:
            s["example"] = examples[0]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(s.get(bound), (int, float)) and not isinstance(s.get(bound), bool):
            s[plain] = s.pop(bound)
            s[bound] = True
    if isinstance(s.get("prefixItems"), list):  # a tuple: 3.0 has one items schema for every position
        parts = s.pop("prefixItems")
        s.setdefault("items", parts[0] if len(parts) == 1 else {"anyOf": parts})


def _looks_like_schema(s: dict) -> bool:
    """A schema object, not a media type object (whose `examples` is a map, and which 3.0 keeps)."""
    return any(k in s for k in ("type", "anyOf", "oneOf", "allOf", "$ref", "enum", "properties", "items", "title"))
