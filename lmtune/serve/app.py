"""The HTTP service: `lmtune serve RUN_DIR` (FastAPI + uvicorn).

POST /v1/predict (API key), POST /v1/generate for generation runs (API key; server-sent token events),
POST /v1/chat/completions and /v1/completions for generation runs (OpenAI's API, API key: lmtune.serve.openai_api),
GET /health and /healthz (liveness), GET /readyz, GET /info (the model, its task, labels and limits; API
key), GET /v1/models (OpenAI's list format; API key), GET /metrics (Prometheus, API key), and the
OpenAPI docs at /docs (Swagger UI from the installed package: no CDN). Null fields are left out of
the prediction responses. Requests are coalesced by the dynamic batcher; the model is the run's ONNX
export when there is one (int8 first), else PyTorch. Texts are never logged; log lines are masked
for PII whatever logged them.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.errors import InputError
from lmtune.registry import backends
from lmtune.serve.batcher import Batcher, Closed, QueueFull
from lmtune.serve.checks import error_origin, text_problem
from lmtune.serve.docs import mount_offline_docs
from lmtune.serve.generation_queue import GenerationFailed, GenerationQueue, cancel_on_disconnect, while_connected
from lmtune.serve.openai_api import OPENAI_PATHS, add_openai_routes, openai_error_body
from lmtune.tasks.base import EXPLAIN, GENERATE
from lmtune.serve.protocol import GuardedHttpProtocol
from lmtune.serve.security import STRUCTURED, PiiFilter, key_ok, load_keys, mask_pii

if TYPE_CHECKING:
    from lmtune.serve.streaming import CancellableStream

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
    header_timeout_s: float = 10.0  # the request head must arrive within this (slow clients are cut off)
    body_timeout_s: float = 30.0  # and the body within this after the head
    max_connections: int = 1000  # open connections (also kept below the open-file limit)
    threads: int | None = None
    explain_per_minute: int = 30  # ?explain=true requests per minute and API key (Integrated Gradients is ~50x a prediction)
    max_new_tokens: int = 256  # /v1/generate: a request's max_new_tokens is capped at this
    max_generate_queue: int = 16  # /v1/generate requests waiting for the model (one generates at a time) before 503
    extra: dict = field(default_factory=dict)


class PredictRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, description="Texts to label (at most max_texts, each at most max_chars).")
    pairs: list[str] | None = Field(None, description="For a model trained on sentence pairs: the second text of each pair, "
                                                      "one per text, in the same order.")


class GenerateRequest(BaseModel):
    text: str = Field(..., description="The prompt (at most max_chars characters); the run's instruction and chat "
                                       "template are applied as in training.")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default: the run's; capped by "
                                                               "the server's --max-new-tokens).")
    stream: bool = Field(True, description="Server-sent events, one `token` event per piece of text and a final `done` event "
                                           "with the whole output; false: one JSON response.")


class GenerateResponse(BaseModel):
    request_id: str
    model: str
    output: str = Field(..., description="The generated text.")
    tokens: int = Field(..., description="Tokens generated.")
    finished: bool = Field(..., description="False when generation stopped at max_new_tokens.")


class Explanation(BaseModel):
    label: str = Field(..., description="The label (or 'value') explained.")
    method: str = Field(..., description="ig (Integrated Gradients on the embeddings) or occlusion (word removal).")
    attributions: list[tuple[str, float]] = Field(..., description="[word, attribution] in text order; positive words "
                                                                    "push towards the label.")


def response_models(task) -> tuple[type[BaseModel], type[BaseModel]]:
    """The prediction and response schemas of this run's task, from the fields the task declares. A field a
    prediction has no value for is left out of the response (exclude_none), except a flag, which is false:
    `abstained` is there on every prediction, as clients read it."""
    fields = {name: (bool, Field(False, description=desc)) if ann is bool else (ann | None, Field(None, description=desc))
              for name, (ann, desc) in task.response_fields().items()}
    if task.supports(EXPLAIN):
        fields["explanations"] = (list[Explanation] | None, Field(None, description="With ?explain=true: word attributions."))
    prediction = create_model("Prediction", **fields)
    response = create_model("PredictResponse", request_id=(str, ...), model=(str, ...), backend=(str, ...),
                            predictions=(list[prediction], ...))
    return prediction, response


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


def _pick_backend(run_dir: Path, backend: str) -> str:
    if backend != "auto":
        backends.check(backend)
        return backend
    for name in sorted(backends.names(), key=lambda n: backends.meta(n, "auto")):
        file = backends.meta(name, "file")
        if file is None or (run_dir / "export" / file).is_file():
            return name
    return "torch"


class Metrics:
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
        # drift of live traffic against the reference saved with the model (lmtune.drift.DriftMonitor)
        self.drift_pvalue = Gauge("lmtune_drift_pvalue", "MMD permutation p-value of the recent requests' embeddings vs "
                                  "the training reference (NaN until the window fills)", registry=self.registry)
        self.drift_window = Gauge("lmtune_drift_window_texts", "Requests in the drift window", registry=self.registry)
        self.abstain_rate = Gauge("lmtune_abstain_rate", "Share of the recent predictions that abstained", registry=self.registry)
        self.mean_confidence = Gauge("lmtune_mean_confidence", "Mean top-class probability of the recent predictions",
                                     registry=self.registry)


PROTECTED = ("/v1/predict", "/v1/generate", *OPENAI_PATHS, "/v1/models", "/info", "/metrics")  # paths that need an API key
KNOWN_PATHS = (*PROTECTED, "/health", "/healthz", "/readyz")


def _json_response(status: int, detail: str, rid: str, extra_headers: list | None = None,
                   path: str = "") -> tuple[dict, dict]:
    payload = openai_error_body(status, detail) if path in OPENAI_PATHS else {"detail": detail, "request_id": rid}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    return {"type": "http.response.start", "status": status, "headers": headers}, {"type": "http.response.body", "body": body}


def given_key(headers: dict) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key is not None else None


class RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware costs too much per request), in this order: request
    id; API key (before the body is read, so an unauthenticated client learns nothing about parsing);
    body size, declared or streamed (chunked bodies are read here, up to the limit, so an oversize
    one is a 413 and never reaches the JSON parser); then the app. Any error the app did not turn
    into a response becomes a 500 with the request id. Metrics and one access-log line without any
    text of the request."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, keys: list[str], protected: tuple[str, ...] = PROTECTED,
                 known_paths: tuple[str, ...] = KNOWN_PATHS):
        self.app, self.metrics, self.max_body, self.keys = app, metrics, max_body_bytes, keys
        self.protected, self.known_paths = protected, known_paths  # another app on this middleware names its own

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status, started = time.perf_counter(), 500, False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def answer(code: int, detail: str, extra_headers: list | None = None) -> None:
            # read (and drop) what the client is still sending, within bounds: closing a socket with
            # unread data makes the kernel reset it, and the client would never see this answer
            await self._drain(receive)
            for message in _json_response(code, detail, rid, extra_headers, scope["path"]):
                await send_with_id(message)

        try:
            if self.keys and scope["path"] in self.protected and not key_ok(given_key(headers), self.keys):
                self.metrics.errors.labels("unauthorized").inc()
                return await answer(401, "missing or invalid API key (Authorization: Bearer KEY, or X-API-Key: KEY)",
                                    [(b"www-authenticate", b"Bearer")])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await answer(413, f"request body over {self.max_body} bytes")
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                if body is None:
                    return await answer(413, f"request body over {self.max_body} bytes")
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            log.error("request %s failed: %s", rid, error_origin(e), extra={STRUCTURED: True})
            self.metrics.errors.labels("unhandled").inc()
            if not started:
                await answer(500, "internal error; the request id is in the server log")
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            # answered here (401, 413) before routing: label known paths by name, anything else "other"
            endpoint = route.path if route is not None else scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if status >= 500:
                self.metrics.errors.labels(f"http_{status}").inc()
            if log.isEnabledFor(logging.INFO):  # structured: status, latency and id are never masked; the path is
                log.info("%s %s %d %.1fms id=%s", scope["method"], mask_pii(scope["path"]), status, 1000 * elapsed, rid,
                         extra={STRUCTURED: True})

    async def _read_body(self, receive) -> bytes | None:
        """A body without Content-Length (chunked), read whole; None as soon as it passes the limit."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _drain(self, receive, limit_factor: int = 8) -> None:
        seen = 0
        try:
            while seen <= limit_factor * self.max_body:
                message = await asyncio.wait_for(receive(), 5)
                seen += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
        except (TimeoutError, asyncio.TimeoutError):
            return

    @staticmethod
    def _replay(body: bytes, receive):
        """The body read here, then the connection's own messages: a disconnect is reported when
        the client really goes (a streamed response stops on it), not right after the body."""
        sent = False

        async def replayed():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replayed


def create_app(settings: ServeSettings) -> FastAPI:
    run_dir = Path(settings.run_dir)
    keys = [] if settings.no_auth else load_keys(settings.key_file)
    if not keys and not settings.no_auth:
        raise InputError("serve: no API key configured. Set LMTUNE_API_KEYS (comma-separated) or --api-key-file; "
                         "--no-auth serves without keys (local experiments only).")
    run, backend = _load_run(run_dir, settings)
    metrics = Metrics()
    from lmtune.drift import DriftMonitor
    monitor = DriftMonitor.for_run(run)

    def predict(texts: list[str]) -> list[dict]:
        rows = run.predict(texts)
        metrics.texts.inc(len(texts))
        if monitor:
            monitor.observe(texts, rows)
        return _public(rows)

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
        if monitor:
            await asyncio.to_thread(monitor.close)

    app = FastAPI(title="lmtune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Predictions of the fine-tuned model in {run_dir.name} ({run.task.name}).")
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes, keys=keys)
    require_key = add_service_routes(app, metrics, keys, lambda: _scrape(metrics, batcher, monitor))
    responses = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                 429: {"model": ErrorResponse, "description": "too many ?explain=true requests (see Retry-After)"},
                 503: {"model": ErrorResponse}}
    _add_predict(app, run, backend, settings, metrics, batcher, responses, require_key)
    _add_model_info(app, run, backend, settings, require_key)
    queue = GenerationQueue(settings.max_generate_queue, metrics.errors, metrics.texts)
    if run.task.supports(GENERATE):
        _add_generate(app, run, settings, metrics, responses, require_key, queue)
    add_openai_routes(app, run, run_dir.name, settings.max_chars, settings.max_new_tokens, require_key, queue)

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        if batcher.closed or batcher._task is None:
            raise HTTPException(503, "not ready")
        return {"status": "ready", "model": run_dir.name, "backend": backend, "queue_texts": batcher.pending}

    return app


def _load_run(run_dir: Path, settings: ServeSettings) -> tuple[Any, str]:
    """The run to serve and the backend it runs on (ONNX when exported, unless told otherwise)."""
    from lmtune.api import load
    backend = _pick_backend(run_dir, settings.backend)
    if settings.threads:
        import torch
        torch.set_num_threads(settings.threads)
    run = load(run_dir, backend=backend)
    if backend != "torch":
        from lmtune.backends.onnx import OnnxModel
        run.model = OnnxModel(run.model.path, settings.threads, spin=False)
    run.config.train.progress = "none"
    return run, backend


def _scrape(metrics: Metrics, batcher: Batcher, monitor) -> None:
    """Refresh the gauges before /metrics answers (off the event loop)."""
    metrics.queue.set(batcher.pending)
    if monitor:  # embeds the requests that arrived since the last scrape
        g = monitor.refresh()
        metrics.drift_pvalue.set(g["pvalue"])
        metrics.drift_window.set(g["window"])
        metrics.abstain_rate.set(g["abstain_rate"])
        metrics.mean_confidence.set(g["mean_confidence"])


def _add_predict(app: FastAPI, run, backend: str, settings: ServeSettings, metrics: Metrics, batcher: Batcher,
                 responses: dict, require_key) -> None:
    """POST /v1/predict: texts (or pairs) through the batcher; ?explain=true through a lock of its own."""
    prediction_model, response_model = response_models(run.task)
    explain_lock, explain_calls = threading.Lock(), RateLimiter(settings.explain_per_minute, 60.0)

    def explain_rows(texts: list) -> list[dict]:
        with explain_lock:  # one explanation at a time: each is a batch of its own (n_steps x tokens)
            rows = run.explain(texts)
        metrics.texts.inc(len(texts))
        return _public(rows)

    # exclude_none: a field without a value for this prediction (top_label when the model did not abstain, an
    # interval the run has none of) is left out rather than sent as null; every field with a value is kept
    @app.post("/v1/predict", response_model=response_model, response_model_exclude_none=True, responses=responses,
              dependencies=[Depends(require_key)])
    async def predict_endpoint(body: PredictRequest, request: Request,
                               explain: bool = Query(False, description="add word attributions (rate-limited per API key)")):
        rid = request.state.request_id
        texts = _checked_texts(body, run, settings, metrics)
        if explain:
            if not run.task.supports(EXPLAIN):
                raise HTTPException(422, f"the {run.task.name} task has no explanations")
            wait = explain_calls.take(given_key(dict(request.scope["headers"])) or "")
            if wait:
                metrics.errors.labels("rate_limited").inc()
                raise HTTPException(429, f"explanations are limited to {settings.explain_per_minute} requests a minute",
                                    headers={"Retry-After": str(math.ceil(wait))})
        try:
            metrics.queue.set(batcher.pending)
            rows = await (asyncio.to_thread(explain_rows, texts) if explain else batcher.submit(texts))
        except QueueFull:
            metrics.errors.labels("queue_full").inc()
            raise HTTPException(503, "server busy: the request queue is full, retry shortly", headers={"Retry-After": "1"}) from None
        except Closed:
            raise HTTPException(503, "server shutting down", headers={"Retry-After": "5"}) from None
        except Exception as e:  # the model failed on this request's texts alone (the batcher isolates them)
            log.error("model call failed for request %s: %s", rid, error_origin(e), extra={STRUCTURED: True})
            metrics.errors.labels("model").inc()
            raise HTTPException(500, "the model failed on this request's texts; the request id is in the server log") from None
        return response_model(request_id=rid, model=Path(settings.run_dir).name, backend=backend,
                              predictions=[prediction_model(**r) for r in rows])


def _checked_texts(body: PredictRequest, run, settings: ServeSettings, metrics: Metrics) -> list:
    """The request's texts (or (text, pair) tuples) once every one passes the limits; else the 4xx."""
    if len(body.texts) > settings.max_texts:
        raise HTTPException(413, f"{len(body.texts)} texts in one request; the limit is {settings.max_texts}")
    wants_pairs = run.task.reads_pairs(run.config)
    if wants_pairs != (body.pairs is not None) or (body.pairs is not None and len(body.pairs) != len(body.texts)):
        metrics.errors.labels("bad_text").inc()
        raise HTTPException(422, "this model reads sentence pairs: give pairs, one per text" if wants_pairs
                            else "this model reads single texts: leave out pairs")
    for field_name, items in (("texts", body.texts), ("pairs", body.pairs or [])):
        for i, t in enumerate(items):
            problem = text_problem(t, settings.max_chars)
            if problem:
                metrics.errors.labels("bad_text").inc()
                raise HTTPException(problem[0], f"{field_name}[{i}] {problem[1]}")
    return list(zip(body.texts, body.pairs)) if body.pairs is not None else body.texts


class InfoResponse(BaseModel):
    model_id: str = Field(..., description="The served run's name (the `model` of every response).")
    task: str = Field(..., description="classification, ner, multilabel, regression, relation, qa, generation or retrieval.")
    labels: list[str] | None = Field(None, description="The labels the model predicts, in its output order.")
    max_length: int = Field(..., description="Tokens per input the model reads (data.max_length); longer inputs are "
                                             "truncated or windowed as in training.")
    base_model: str = Field(..., description="The pretrained model it was fine-tuned from (a local folder by its name).")
    backend: str = Field(..., description="What runs the model: torch, onnx or onnx-int8.")
    max_texts: int = Field(..., description="Texts per request at most.")
    max_chars: int = Field(..., description="Characters per text at most.")
    max_batch_size: int = Field(..., description="Texts per model call (requests are batched together).")
    lmtune_version: str


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(..., description="When the model was saved (Unix seconds).")
    owned_by: str = "lmtune"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def _base_model(name: str) -> str:
    """A hub id as it is; a local folder by its own name only (the server's paths are not the client's business)."""
    return Path(name).name if Path(name).exists() else name


def _saved_at(run_dir: Path) -> int:
    """When the served model was written: its lmtune.json's time (model/, else export/), else the run folder's."""
    from lmtune.artifacts import RunDir
    rd = RunDir(run_dir)
    for path in (rd.model_meta, rd.export_meta, run_dir):
        if path.exists():
            return int(path.stat().st_mtime)
    return 0


def _add_model_info(app: FastAPI, run, backend: str, settings: ServeSettings, require_key) -> None:
    """GET /info (TEI's name) and GET /v1/models (OpenAI's list, so OpenAI-style clients find the model id).
    Both behind the API key like the predictions; neither names a path, a key or a setting that is not the
    client's to know."""
    from lmtune import __version__
    name = Path(settings.run_dir).name
    info = InfoResponse(model_id=name, task=run.task.name, labels=list(run.labels) if run.labels else None,
                        max_length=run.config.data.max_length, base_model=_base_model(run.config.model.name),
                        backend=backend, max_texts=settings.max_texts, max_chars=settings.max_chars,
                        max_batch_size=settings.max_batch_size, lmtune_version=__version__)
    models = ModelList(data=[ModelCard(id=name, created=_saved_at(Path(settings.run_dir)))])
    auth = {"dependencies": [Depends(require_key)], "responses": {401: {"model": ErrorResponse}}}

    @app.get("/info", response_model=InfoResponse, response_model_exclude_none=True, **auth)
    async def model_info() -> InfoResponse:
        return info

    @app.get("/v1/models", response_model=ModelList, **auth)
    async def list_models() -> ModelList:
        return models


def add_service_routes(app: FastAPI, metrics: Metrics, keys: list[str], on_scrape=None):
    """What every lmtune service shares (serve, and the apps' servers): /healthz, /metrics (API key;
    `on_scrape` refreshes gauges first, off the event loop) and JSON errors that carry the request id.
    Returns the API-key dependency for the service's own routes: the middleware checks the key before
    the body is read; this declares it in the OpenAPI docs (and checks again, so a route added outside
    the protected paths is still guarded)."""

    # Declared as an HTTP bearer scheme so the OpenAPI document says which routes need the key and /docs
    # gets an Authorize button; auto_error=False: the check below answers (401 with the JSON error body).
    bearer = HTTPBearer(auto_error=False, description="an API key from LMTUNE_API_KEYS or --api-key-file "
                                                      "(X-API-Key: KEY is accepted too)")

    def require_key(request: Request, _declared: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if keys and not key_ok(given_key(dict(request.scope["headers"])), keys):
            metrics.errors.labels("unauthorized").inc()
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY, or X-API-Key: KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> dict:
        """Liveness under the name TEI, vLLM and most load balancers probe (the same answer as /healthz)."""
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(require_key)], responses={401: {"model": ErrorResponse}})
    async def metrics_endpoint() -> Response:
        if on_scrape is not None:
            await asyncio.to_thread(on_scrape)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "request_id": getattr(request.state, "request_id", None)},
                            exc.status_code, headers=exc.headers)

    mount_offline_docs(app)
    return require_key


def _public(rows: list[dict]) -> list[dict]:
    """Prediction rows without the request's own texts (the response does not echo them)."""
    return [{k: v for k, v in r.items() if k not in ("text", "text_pair", "source", "prompt")} for r in rows]


def _add_generate(app: FastAPI, run, settings: ServeSettings, metrics: Metrics, responses: dict, require_key,
                  queue: GenerationQueue) -> None:
    """POST /v1/generate: one prompt, tokens streamed as server-sent events while the model generates
    (the generation in a worker thread, its text handed to the event loop by a CancellableStream).
    One generation runs at a time (the server's GenerationQueue); up to max_generate_queue wait, more
    get 503. A client that goes away stops its generation (or takes it out of the queue); a model that
    fails ends the stream with an `error` event at once."""
    from lmtune.serve.streaming import CancellableStream

    def generate(text: str, max_new: int, stream: CancellableStream | None, rid: str) -> dict | None:
        out = queue.run(lambda: run.generate_examples(run.task.from_texts([text]), max_new_tokens=max_new,
                                                      streamer=stream)[0], stream, rid)
        return None if out is None else {"output": out["text"], "tokens": out["tokens"], "finished": out["finished"]}

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)],
              responses={**responses, 200: {"content": {"text/event-stream": {}}, "description": "the output (JSON), or "
                                                 "server-sent events: `token` {text}, then `done` {output, tokens, finished}, "
                                                 "or `error` {request_id, detail} when the model failed"}})
    async def generate_endpoint(body: GenerateRequest, request: Request):
        rid = request.state.request_id
        problem = text_problem(body.text, settings.max_chars)
        if problem:
            metrics.errors.labels("bad_text").inc()
            raise HTTPException(problem[0], f"text {problem[1]}")
        max_new = min(body.max_new_tokens or run.task.max_new_tokens, settings.max_new_tokens)
        queue.admit()
        if not body.stream:
            quiet = CancellableStream(run.tokenizer)  # its stopping criterion only: a client that leaves stops the model
            try:
                out = await while_connected(request, quiet, asyncio.to_thread(generate, body.text, max_new, quiet, rid))
            except GenerationFailed:
                raise HTTPException(500, "generation failed; the request id is in the server log") from None
            if out is None:  # the client left while the request waited: nobody reads this
                return Response(status_code=499)
            return GenerateResponse(request_id=rid, model=Path(settings.run_dir).name, **out)
        stream = CancellableStream(run.tokenizer)
        job = asyncio.ensure_future(asyncio.to_thread(generate, body.text, max_new, stream, rid))
        return StreamingResponse(_sse_events(stream, job, request, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


async def _sse_events(stream: CancellableStream, job: asyncio.Future, request: Request, rid: str) -> AsyncIterator[str]:
    """The server-sent events of one streamed generation. However the response ends (done, failed,
    or the client gone: the server cancels this generator, or sending raises), the generation is
    cancelled; a watcher also notices a client that leaves while no text is being sent."""
    watcher = asyncio.ensure_future(cancel_on_disconnect(request, stream))
    try:
        async for piece in stream:
            if piece:
                yield f"event: token\ndata: {json.dumps({'text': piece})}\n\n"
        out = await job
        yield f"event: done\ndata: {json.dumps({'request_id': rid, **out})}\n\n"
    except GenerationFailed:
        yield f"event: error\ndata: {json.dumps({'request_id': rid, 'detail': 'generation failed'})}\n\n"
    except Exception as e:  # the stream itself broke (its backstop timeout): the client gets an error event
        log.error("streaming failed for request %s: %s", rid, error_origin(e), extra={STRUCTURED: True})
        yield f"event: error\ndata: {json.dumps({'request_id': rid, 'detail': 'generation failed'})}\n\n"
    finally:
        stream.cancel()
        watcher.cancel()
        job.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure was logged; don't warn again


class RateLimiter:
    """At most `limit` calls per `period` seconds for each key (a sliding window); take() says how long
    to wait, 0 when the call may go ahead. A limit of 0 refuses every call."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit, self.period = limit, period
        self.calls: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        now = time.monotonic()
        with self.lock:
            q = self.calls[key]
            while q and q[0] <= now - self.period:
                q.popleft()
            if len(q) >= self.limit:
                return self.period - (now - q[0]) if q else self.period
            q.append(now)
            return 0.0


def configure_protocol(settings: ServeSettings) -> None:
    GuardedHttpProtocol.configure(settings.header_timeout_s, settings.body_timeout_s, settings.max_connections)


def from_env() -> FastAPI:
    """uvicorn factory for --workers > 1 (each worker process builds its own app)."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    configure_protocol(settings)
    return create_app(settings)


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn
    configure_protocol(settings)
    # access_log off: the request middleware already logs one line per request (with its id, PII-masked);
    # the guarded protocol bounds header and body read time and the number of connections
    kwargs = {"host": host, "port": port, "timeout_graceful_shutdown": 30, "log_level": "info", "access_log": False,
              "http": GuardedHttpProtocol, "timeout_keep_alive": 5, "h11_max_incomplete_event_size": 16 * 1024}
    if workers > 1:
        if not settings.threads:
            settings.threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
        uvicorn.run("lmtune.serve.app:from_env", factory=True, workers=workers, **kwargs)
    else:
        uvicorn.run(create_app(settings), **kwargs)
