"""`lmtune ui [RUNS_DIR]`: a local web dashboard to run, inspect, compare and try runs.

Stack: FastAPI (already lmtune's server) with Jinja2 templates rendered on the server, a small
hand-written script and stylesheet shipped in the package (lmtune/ui/static), and SVG charts drawn in
Python (views.py). Nothing is fetched from the internet, there is no build step, and every page works
from the structured results the runs wrote (results.json, metrics.json, history.jsonl).

Safety: binds to 127.0.0.1 unless told otherwise, and then only with a token (LMTUNE_UI_TOKEN or
--token-file; the same rules as `serve`'s keys); POST calls need the X-Lmtune-UI header, which a page
on another site cannot send without a CORS preflight this server never grants (no cross-site requests
against a local dashboard); uploads are size- and type-limited; every file path is confined to the
working directory.
"""
from __future__ import annotations

import asyncio
import functools
import json
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.serve.security import key_ok
from lmtune.ui import views
from lmtune.ui.jobs import Jobs, clean_copy

HERE = Path(__file__).parent
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt", ".conll", ".parquet")
_NAME = re.compile(r"^[\w][\w.-]{0,127}$")
COOKIE = "lmtune_ui_token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class UiSettings:
    runs_dir: str = "runs"
    workdir: str = "."
    token: str | None = None  # required for every call when set (always set when bound beyond localhost)
    max_upload_bytes: int = 20 * 2**20


def confined(workdir: Path, given: str) -> Path:
    """A path the user named, resolved inside the working directory; anything else is refused."""
    root = workdir.resolve()
    path = (root / given).resolve()
    if path != root and root not in path.parents:
        raise HTTPException(403, f"{given}: outside the working directory")
    return path


def create_ui(settings: UiSettings) -> FastAPI:
    runs_dir, workdir = Path(settings.runs_dir).resolve(), Path(settings.workdir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["num"] = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    jobs = Jobs(runs_dir, workdir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(jobs.close)  # no training child outlives the UI

    app = FastAPI(title="lmtune ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.token:
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.cookies.get(COOKIE) or request.query_params.get("token"))
            if not key_ok(given, [settings.token]):
                return JSONResponse({"detail": "missing or invalid token (open the UI with ?token=...)"}, 401)
        if request.method == "POST" and request.headers.get("x-lmtune-ui") != "1":
            return JSONResponse({"detail": "POST calls need the X-Lmtune-UI: 1 header"}, 403)
        response = await call_next(request)
        if settings.token and request.query_params.get("token"):  # remember it for the page's own calls
            response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    def page(template: str, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(runs_dir=str(runs_dir), **ctx))

    def run_path(name: str) -> Path:
        if not _NAME.match(name) or not (runs_dir / name / "config.yaml").is_file():
            raise HTTPException(404, f"no run {name!r} under {runs_dir}")
        return runs_dir / name

    @functools.lru_cache(maxsize=2)
    def loaded(path: str, stamp: float):
        from lmtune.api import load
        run = load(path)
        run.config.train.progress = "none"
        return run

    # ---- pages ----
    @app.get("/", response_class=HTMLResponse)
    async def runs_page():
        return page("runs.html", runs=views.runs_table(runs_dir))

    @app.get("/run/{name}", response_class=HTMLResponse)
    async def run_page(name: str):
        run_path(name)
        d = views.run_details(runs_dir, name)
        split = "test" if "test" in d["metrics"] else "dev"
        m = d["metrics"].get(split, {})
        curves = views.curves(d["history"])
        charts = [views.line_chart({k: v for k, v in curves.items() if k in ("train_loss", "dev_loss")}, "loss"),
                  views.line_chart({k: v for k, v in curves.items() if k.startswith("dev_") and k != "dev_loss"
                                    and not k.startswith("dev_ece")}, "dev metrics")]
        entities = [views.entity_html(r["text"], r["entities"]) if isinstance(r.get("text"), str)
                    else views.tagged_html(r["tokens"], r.get("tags", []), r.get("gold"))
                    for r in d["test_rows"] if "entities" in r][:20]
        data_cfg = (yaml.safe_load(d["config"]) or {}).get("data", {}) if d["config"] else {}
        explained = [{"name": kind, "html": views.attribution_html(e["attributions"]), "label": e.get("label"), "gold": e.get("gold")}
                     for kind, exs in (d["results"].get("explain") or {}).get("examples", {}).items() for e in exs]
        return page("run.html", d=d, split=split, m=m, charts=charts, explained=explained,
                    confusion=views.confusion_table(m.get("confusion_matrix", []), d["labels"]), entities=entities,
                    pairs=bool(data_cfg.get("text_pair_column")), data_cfg=data_cfg)

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request):
        names = request.query_params.getlist("run")
        if len(names) < 2:
            raise HTTPException(422, "compare needs two or more runs: /compare?run=A&run=B")
        for n in names:
            run_path(n)
        c = views.compare_runs(runs_dir, names)
        overlay = {}
        for n in names:
            for k, pts in c["curves"][n].items():
                if k in ("dev_loss", "train_loss") or not k.startswith("dev_ece"):
                    overlay.setdefault(k, {})[n] = pts
        charts = [views.line_chart(series, k) for k, series in overlay.items() if k in ("train_loss", "dev_loss", "dev_accuracy",
                                                                                       "dev_macro_f1", "dev_f1")]
        return page("compare.html", c=c, charts=charts)

    @app.get("/train", response_class=HTMLResponse)
    async def train_page():
        return page("train.html", max_mb=settings.max_upload_bytes / 2**20)

    # ---- data for the pages' scripts ----
    @app.get("/api/runs")
    async def api_runs():
        return views.runs_table(runs_dir)

    @app.post("/api/run/{name}/predict")
    async def api_predict(name: str, request: Request):
        path = run_path(name)
        body = await request.json()
        text, pair = str(body.get("text", "")), body.get("pair")
        if not text.strip() or len(text) > 5000:
            raise HTTPException(422, "give a text of 1 to 5000 characters")
        meta = RunDir(path).model_meta
        stamp = meta.stat().st_mtime if meta.is_file() else 0.0
        if not stamp:
            raise HTTPException(409, "this run has no final model yet")

        def predict():
            run = loaded(str(path), stamp)
            return run.predict([(text, str(pair))] if pair else [text])[0]
        try:
            return await asyncio.to_thread(predict)
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/api/files")
    async def api_files():
        """Data files under the working directory (not under the runs or the UI's own folders)."""
        out = []
        for p in sorted(workdir.rglob("*")):
            rel = p.relative_to(workdir)
            if (p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not any(part.startswith(".") for part in rel.parts)
                    and runs_dir not in p.parents):
                out.append(str(rel))
            if len(out) >= 500:
                break
        return out

    @app.post("/api/upload")
    async def api_upload(request: Request, name: str):
        base = Path(name).name
        if not _NAME.match(base) or Path(base).suffix.lower() not in DATA_SUFFIXES:
            raise HTTPException(415, f"{name}: upload a data file ({', '.join(DATA_SUFFIXES)})")
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {settings.max_upload_bytes} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, f"upload larger than {settings.max_upload_bytes} bytes")
        target = confined(workdir, f"uploads/{base}")
        target.parent.mkdir(parents=True, exist_ok=True)
        from lmtune.io import atomic_path
        with atomic_path(target) as tmp:
            tmp.write_bytes(bytes(data))
        return {"path": str(target.relative_to(workdir)), "bytes": len(data)}

    def existing_file(body: dict) -> Path:
        path = confined(workdir, str(body.get("path", "")))
        if not path.is_file():
            raise HTTPException(404, f"{body.get('path')}: no such file")
        return path

    @app.post("/api/init")
    async def api_init(request: Request):
        from lmtune.scaffold import inspect, render
        body = await request.json()
        path = existing_file(body)
        try:
            return {"config": render(inspect(path), body.get("task") or None)}
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    @app.post("/api/jobs")
    async def api_start(request: Request):
        body = await request.json()
        try:
            job = jobs.start(str(body.get("config", "")))
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        return job.state()

    def job_of(job_id: str):
        try:
            return jobs.get(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.get("/api/jobs/{job_id}")
    async def api_job(job_id: str):
        return job_of(job_id).state()

    @app.post("/api/jobs/{job_id}/stop")
    async def api_stop(job_id: str):
        job_of(job_id)
        return await asyncio.to_thread(jobs.stop, job_id)

    @app.get("/api/jobs/{job_id}/events")
    async def api_events(job_id: str):
        """Server-sent events: each new output line, then the final state."""
        job = job_of(job_id)

        async def stream():
            pos = 0
            while True:
                done = job.proc.poll() is not None
                text = job.log.read_bytes()[pos:] if job.log.is_file() else b""
                if text:
                    cut = len(text) if done else text.rfind(b"\n") + 1
                    for line in text[:cut].decode("utf-8", "replace").splitlines():
                        yield f"data: {json.dumps({'line': line})}\n\n"
                    pos += cut
                if done:
                    yield f"event: done\ndata: {json.dumps(job.state())}\n\n"
                    return
                await asyncio.sleep(0.3)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/clean")
    async def api_clean(request: Request):
        body = await request.json()
        path = existing_file(body)
        try:
            return clean_copy(path, list(body.get("actions", [])), workdir / "cleaned", str(body.get("label_column") or "label"))
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/favicon.ico")
    async def favicon():
        return RedirectResponse("/static/favicon.svg")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, exc.status_code)

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
    uvicorn.run(create_ui(settings), host=host, port=port, log_level="warning")
