"""The HTTP service: `lmtune serve RUN_DIR` (FastAPI + uvicorn).

POST /v1/predict (API key), GET /healthz, GET /readyz, GET /metrics (Prometheus, API key), and the
OpenAPI docs at /docs. Requests are coalesced by the dynamic batcher; the model is the run's ONNX
export when there is one (int8 first), else PyTorch. Texts are never logged; log lines are masked
for PII whatever logged them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.errors import InputError
from lmtune.serve.batcher import Batcher, Closed, QueueFull
from lmtune.serve.security import PiiFilter, key_ok, load_keys

log = logging.getLogger("lmtune.serve")
SETTINGS_ENV = "LMTUNE_SERVE_SETTINGS"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class ServeSettings:
    run_dir: str
    backend: str = "auto"  # auto: onnx-int8, else onnx, else torch
    key_file: str | None = None
    no_auth: bool = False  # only for local experiments; refused unless asked for explicitly
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 2048  # texts waiting or in the model
    max_texts: int = 64  # per request
    max_chars: int = 2000  # per text
    max_body_bytes: int = 1_000_000
    threads: int | None = None
    extra: dict = field(default_factory=dict)


class PredictRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, description="Texts to label (at most max_texts, each at most max_chars).")


class Entity(BaseModel):
    text: str
    label: str
    score: float
    start: int | None = None
    end: int | None = None
    token_start: int | None = None
    token_end: int | None = None


class Prediction(BaseModel):
    label: str | None = Field(None, description="Predicted label; the abstain / out-of-scope label when the model abstains.")
    score: float | None = None
    probabilities: dict[str, float] | None = Field(None, description="Calibrated class probabilities.")
    abstained: bool = False
    top_label: str | None = Field(None, description="The best class when the model abstained.")
    entities: list[Entity] | None = Field(None, description="NER: entity spans with character offsets.")
    abstained_entities: list[Entity] | None = Field(None, description="NER with a threshold: entities scored below it.")
    tags: list[str] | None = None


class PredictResponse(BaseModel):
    request_id: str
    model: str
    backend: str
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


def _pick_backend(run_dir: Path, backend: str) -> str:
    if backend != "auto":
        return backend
    for name, file in (("onnx-int8", "model.int8.onnx"), ("onnx", "model.onnx")):
        if (run_dir / "export" / file).is_file():
            return name
    return "torch"


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lmtune_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("lmtune_request_seconds", "Request latency", ["endpoint"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("lmtune_batch_size", "Texts per model call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.texts = Counter("lmtune_texts_total", "Texts predicted", registry=self.registry)
        self.errors = Counter("lmtune_errors_total", "Errors by kind", ["kind"], registry=self.registry)
        self.queue = Gauge("lmtune_queue_texts", "Texts waiting or in the model", registry=self.registry)


class _TooLarge(Exception):
    pass


class _RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware costs too much per request): request id, body
    size limit (declared and streamed), metrics, an access log line without any text."""

    def __init__(self, app, metrics: _Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status, started, seen = time.perf_counter(), 500, False, 0

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge()
            return message

        length = headers.get(b"content-length", b"0")
        try:
            if not length.isdigit() or int(length) > self.max_body:
                raise _TooLarge()
            await self.app(scope, counted_receive, send_with_id)
        except _TooLarge:
            if not started:
                body = json.dumps({"detail": f"request body over {self.max_body} bytes", "request_id": rid}).encode()
                await send_with_id({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if status >= 500:
                self.metrics.errors.labels(f"http_{status}").inc()
            if log.isEnabledFor(logging.INFO):
                log.info("%s %s %d %.1fms id=%s", scope["method"], scope["path"], status, 1000 * elapsed, rid)


def create_app(settings: ServeSettings) -> FastAPI:
    from lmtune.api import load
    run_dir = Path(settings.run_dir)
    keys = [] if settings.no_auth else load_keys(settings.key_file)
    if not keys and not settings.no_auth:
        raise InputError("serve: no API key configured. Set LMTUNE_API_KEYS (comma-separated) or --api-key-file; "
                         "--no-auth serves without keys (local experiments only).")
    backend = _pick_backend(run_dir, settings.backend)
    if settings.threads:
        import torch
        torch.set_num_threads(settings.threads)
    run = load(run_dir, backend=backend)
    if backend != "torch":
        from lmtune.export.onnx import OnnxModel
        run.model = OnnxModel(run.model.path, settings.threads, spin=False)
    run.config.train.progress = "none"
    metrics = _Metrics()

    def predict(texts: list[str]) -> list[dict]:
        rows = run.predict(texts)
        metrics.texts.inc(len(texts))
        return [{k: v for k, v in r.items() if k not in ("text", "source")} for r in rows]

    batcher = Batcher(predict, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics.batch.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for h in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
            h.addFilter(PiiFilter())
        batcher.start()
        log.info("serving %s (%s backend, %d labels) with %s", run_dir, backend, len(run.labels),
                 "API-key auth" if keys else "NO AUTH")
        yield
        await batcher.close()  # uvicorn has stopped accepting; finish what is queued

    app = FastAPI(title="lmtune", version="1", lifespan=lifespan,
                  description=f"Predictions of the fine-tuned model in {run_dir.name} ({run.task.name}).")

    app.add_middleware(_RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)

    def require_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if not key_ok(given, keys):
            metrics.errors.labels("unauthorized").inc()
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY, or X-API-Key: KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    responses = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                 503: {"model": ErrorResponse}}

    @app.post("/v1/predict", response_model=PredictResponse, responses=responses, dependencies=[Depends(require_key)])
    async def predict_endpoint(body: PredictRequest, request: Request) -> PredictResponse:
        rid = request.state.request_id
        if len(body.texts) > settings.max_texts:
            raise HTTPException(413, f"{len(body.texts)} texts in one request; the limit is {settings.max_texts}")
        for i, t in enumerate(body.texts):
            if len(t) > settings.max_chars:
                raise HTTPException(413, f"texts[{i}] has {len(t)} characters; the limit is {settings.max_chars}")
            if not t.strip():
                raise HTTPException(422, f"texts[{i}] is empty")
        try:
            metrics.queue.set(batcher.pending)
            rows = await batcher.submit(body.texts)
        except QueueFull:
            metrics.errors.labels("queue_full").inc()
            raise HTTPException(503, "server busy: the request queue is full, retry shortly", headers={"Retry-After": "1"}) from None
        except Closed:
            raise HTTPException(503, "server shutting down", headers={"Retry-After": "5"}) from None
        return PredictResponse(request_id=rid, model=run_dir.name, backend=backend, predictions=[Prediction(**r) for r in rows])

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        if batcher.closed or batcher._task is None:
            raise HTTPException(503, "not ready")
        return {"status": "ready", "model": run_dir.name, "backend": backend, "queue_texts": batcher.pending}

    @app.get("/metrics", dependencies=[Depends(require_key)], responses={401: {"model": ErrorResponse}})
    async def metrics_endpoint() -> Response:
        metrics.queue.set(batcher.pending)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "request_id": getattr(request.state, "request_id", None)},
                            exc.status_code, headers=exc.headers)

    return app


def from_env() -> FastAPI:
    """uvicorn factory for --workers > 1 (each worker process builds its own app)."""
    return create_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn
    # access_log off: the request middleware already logs one line per request (with its id, PII-masked)
    kwargs = {"host": host, "port": port, "timeout_graceful_shutdown": 30, "log_level": "info", "access_log": False}
    if workers > 1:
        if not settings.threads:
            settings.threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
        uvicorn.run("lmtune.serve.app:from_env", factory=True, workers=workers, **kwargs)
    else:
        uvicorn.run(create_app(settings), **kwargs)
