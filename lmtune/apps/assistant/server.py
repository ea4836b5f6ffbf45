"""`lmtune assistant serve CONFIG`: POST /v1/chat {message, session_id?} -> {session_id, route, answer,
handoff, intent, scores, turn, slots, missing_slots}; GET / (a small chat page), /health and /healthz, /metrics (API key), /docs (offline).

The middleware, API keys, body limit, request ids, Prometheus metrics and PII-masked access log are
lmtune serve's own (lmtune.serve.app); concurrent messages are coalesced by its dynamic batcher.
Every answer is logged with its route and scores, never with the message or the answer text.
"""
from __future__ import annotations

import collections
import logging
import re
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from prometheus_client import Counter
from pydantic import BaseModel, Field

from lmtune.apps.assistant import Assistant, AssistantConfig
from lmtune.errors import InputError
from lmtune.serve.app import ErrorResponse, Metrics, RequestContext, ServeSettings, add_service_routes, text_problem
from lmtune.serve.batcher import Batcher, Closed, QueueFull
from lmtune.serve.security import STRUCTURED, PiiFilter, load_keys

log = logging.getLogger("lmtune.assistant")
PAGE = Path(__file__).with_name("chat.html")
PROTECTED = ("/v1/chat", "/metrics")
_SESSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_SESSIONS = 10_000  # the oldest sessions are forgotten beyond this (memory stays bounded)


class ChatRequest(BaseModel):
    message: str = Field(..., description="The user's message.")
    session_id: str | None = Field(None, description="Continue a session (letters, digits, . _ -; at most 64); a new one is made when absent.")


class Slot(BaseModel):
    type: str = Field(..., description="The slot type (the intent run's slot label)")
    text: str = Field(..., description="The slot's words in the message")
    start: int | None = Field(None, description="Character offset of the slot in the message")
    end: int | None = Field(None, description="Character offset just past the slot")
    score: float = Field(..., description="The slot's probability (mean over its words)")


class ChatResponse(BaseModel):
    request_id: str
    session_id: str
    turn: int
    route: str = Field(..., description="intent (the intent run answered), faq (FAQ retrieval answered), clarify (the answer "
                                        "needs slots the message lacks: a question naming them) or handoff")
    answer: str
    handoff: bool = Field(..., description="True when a person should take over")
    intent: str | None
    scores: dict
    slots: list[Slot] = Field(default_factory=list, description="The message's slots, when the intent run predicts slots "
                                                                "(a joint intent + slot run); empty otherwise")
    missing_slots: list[str] = Field(default_factory=list, description="route clarify: the slot types the answer needs")


class Sessions:
    """Turn counts per session id, least recently used forgotten first."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._turns: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.limit, self._lock = limit, threading.Lock()

    def next_turn(self, session: str) -> int:
        with self._lock:
            turn = self._turns.pop(session, 0) + 1
            self._turns[session] = turn
            while len(self._turns) > self.limit:
                self._turns.popitem(last=False)
            return turn


def create_app(cfg: AssistantConfig, settings: ServeSettings) -> FastAPI:
    keys = [] if settings.no_auth else load_keys(settings.key_file)
    if not keys and not settings.no_auth:
        raise InputError("assistant serve: no API key configured. Set LMTUNE_API_KEYS (comma-separated) or --api-key-file; "
                         "--no-auth serves without keys (local experiments only).")
    assistant = Assistant(cfg)
    metrics = Metrics()
    routes = Counter("lmtune_assistant_routes_total", "Answers by route", ["route"], registry=metrics.registry)
    sessions = Sessions()

    def route(messages: list[str]) -> list[dict]:
        out = assistant.route(messages)
        metrics.texts.inc(len(messages))
        return out

    batcher = Batcher(route, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics.batch.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for h in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
            h.addFilter(PiiFilter())
        batcher.start()
        log.info("assistant: intents %s, %d FAQ answers, retriever %s, threshold %s, %s", Path(cfg.intents).name, len(assistant.faq),
                 Path(cfg.retriever).name if cfg.retriever else "none", assistant.threshold, "API-key auth" if keys else "NO AUTH")
        yield
        await batcher.close()

    app = FastAPI(title="lmtune assistant", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)  # offline /docs: add_service_routes
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes, keys=keys, protected=PROTECTED,
                       known_paths=(*PROTECTED, "/", "/health", "/healthz"))

    require_key = add_service_routes(app, metrics, keys, lambda: metrics.queue.set(batcher.pending))

    responses = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                 503: {"model": ErrorResponse}}

    @app.post("/v1/chat", response_model=ChatResponse, responses=responses, dependencies=[Depends(require_key)])
    async def chat(body: ChatRequest, request: Request) -> ChatResponse:
        rid = request.state.request_id
        problem = text_problem(body.message, settings.max_chars)
        if problem:
            metrics.errors.labels("bad_text").inc()
            raise HTTPException(problem[0], f"message {problem[1]}")
        if body.session_id is not None and not _SESSION.match(body.session_id):
            raise HTTPException(422, "session_id: letters, digits, '.', '_' and '-' only, at most 64")
        session = body.session_id or uuid.uuid4().hex
        try:
            out = (await batcher.submit([body.message]))[0]
        except QueueFull:
            metrics.errors.labels("queue_full").inc()
            raise HTTPException(503, "server busy: the request queue is full, retry shortly", headers={"Retry-After": "1"}) from None
        except Closed:
            raise HTTPException(503, "server shutting down", headers={"Retry-After": "5"}) from None
        turn = sessions.next_turn(session)
        routes.labels(out["route"]).inc()
        log.info("chat id=%s session=%s turn=%d route=%s intent=%s scores=%s", rid, session, turn, out["route"], out["intent"],
                 out["scores"], extra={STRUCTURED: True})
        return ChatResponse(request_id=rid, session_id=session, turn=turn, **out)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    return app


def serve(cfg: AssistantConfig, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8010) -> None:
    import uvicorn

    from lmtune.serve.app import configure_protocol
    from lmtune.serve.protocol import GuardedHttpProtocol
    configure_protocol(settings)
    uvicorn.run(create_app(cfg, settings), host=host, port=port, log_level="info", access_log=False, http=GuardedHttpProtocol,
                timeout_keep_alive=5, timeout_graceful_shutdown=30)
