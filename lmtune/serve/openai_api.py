"""OpenAI-compatible routes of `lmtune serve` for a generation run: POST /v1/chat/completions and POST
/v1/completions, so the `openai` package, LangChain or LiteLLM can call a fine-tuned model by pointing their
base URL at the server (GET /v1/models, in app.py, gives the id they pass as `model`).

What they share with POST /v1/generate: the API keys (PROTECTED paths), the body-size and max_chars limits,
the one-at-a-time GenerationQueue with its 503, and a streamed generation that stops within a step when the
client goes away. What is OpenAI's: the request fields (max_tokens capped by --max-new-tokens, temperature,
top_p, stop, n=1, seed, stream, stream_options.include_usage, response_format), the response and chunk
objects with usage counts, SSE `data:` lines ending with `data: [DONE]`, and errors as {"error": {message,
type, param, code}}. Fields this server does not implement (logprobs, tools, penalties) are ignored.

Prompts: chat messages go through the tokenizer's own chat template (add_generation_prompt), as in
training; a tokenizer without one is a 400. A completion's prompt is the raw text the model continues
(OpenAI's semantics), without the run's instruction or template. Unset temperature and top_p mean the
decoding lmtune chose on dev (not OpenAI's default temperature 1): the fine-tuned model's tested setting.
`response_format` (json_object, json_schema) is enforced by constrained decoding (lmtune.structured).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.serve.checks import error_origin, text_problem
from lmtune.serve.generation_queue import GenerationFailed, GenerationQueue, cancel_on_disconnect, while_connected
from lmtune.serve.security import STRUCTURED
from lmtune.tasks.base import GENERATE

log = logging.getLogger("lmtune.serve")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")  # API key; errors in OpenAI's format (also the middleware's)
MAX_STOPS = 4  # OpenAI's limit on stop sequences


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An error as OpenAI's API writes it, so OpenAI clients raise the right exception with our message
    (the request id is in the X-Request-ID header, where OpenAI puts its own)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"  # OpenAI's two types (a bad key is the latter)
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or ("invalid_api_key" if status == 401 else None)}}


# ---- request and response bodies -------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(..., description="developer is read as system.")
    content: str | list[TextPart] = Field(..., description="Text, or text parts (joined).")
    name: str | None = Field(None, description="Ignored.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the output follows "
                                                                             "(absent: any JSON object).")
    strict: bool | None = Field(None, description="Outputs always follow the schema here (constrained decoding), "
                                                  "strict or not.")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema.")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="A last chunk with the usage counts and no choices.")


class _SamplingRequest(BaseModel):
    model: str | None = Field(None, description="The served model's id (GET /v1/models); another id is a 404.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (capped by the server's "
                                                           "--max-new-tokens; default: the run's).")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy. Unset: the decoding chosen on dev.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (with a temperature above 0).")
    n: int | None = Field(None, ge=1, description="Choices per request: only 1.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} sequences: generation stops at the first, "
                                                          "which is left out of the text.")
    stream: bool = Field(False, description="Server-sent events, OpenAI's chunks, then `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1, description="Makes sampling repeatable.")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the output is "
                                                                     "constrained to it while it is generated.")
    user: str | None = Field(None, description="Ignored.")

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:  # here, not in the union, for a message that says so
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stop)}")
        return stop


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens (wins).")


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        ..., description="The text to continue as it is (no template), or a list of one.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class OpenAIError(HTTPException):
    """An HTTPException that names the offending request field (`param`) and a machine-readable `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(status, message, headers)
        self.param, self.code = param, code


# ---- stop sequences -------------------------------------------------------------------------------------
class StopTrimmer:
    """Text in (whole or in streamed pieces), text out without the first stop sequence and what follows it.
    A streamed tail that could still grow into a stop sequence is held back until it cannot, so no chunk
    ever carries part of one; pieces joined equal the whole text trimmed."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [text.index(s) for s in self.stops if s in text]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def whole(self, text: str) -> str:
        return self.feed(text) + self.flush()


# ---- one generation -------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request, checked and ready to generate."""
    prompt: list[int]  # token ids
    sampling: dict  # lmtune's decoding settings (temperature, top_p, repetition controls)
    max_new_tokens: int
    stops: list[str]
    seed: int | None
    constraint: Any  # a fresh LogitsProcessor for response_format, or None


@dataclass
class Generated:
    text: str  # stop sequence and what follows it left out
    completion_tokens: int
    finish_reason: str  # stop (end of text or a stop sequence) or length


def generate_job(run, job: Job, stream=None) -> Generated:
    """The job's single generation, in the calling (worker) thread; streamed pieces go to `stream`, whose
    stopping criterion ends the generation when its client has gone."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from lmtune import runtime
    from lmtune.generate_control import ResponsePenalties, generation_config
    model, tok, device = run.model, run.tokenizer, runtime.device()
    model.to(device).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # the request's response_format, else the run's own generate.schema / regex / choices / label_set
    constraint = job.constraint if job.constraint is not None else (
        run.task.constraint.processor(tok) if run.task.constraint is not None else None)
    # the grammar first, as generate_control does: the penalties then never lift its -inf, and an n-gram block
    # that would leave a row nothing the grammar allows is skipped (ResponsePenalties reads the masked row)
    processors = [p for p in (constraint, ResponsePenalties.from_settings(job.sampling, len(job.prompt))) if p is not None]
    extra: dict = {}
    config = generation_config(job.sampling, job.max_new_tokens, pad, eos)
    if job.stops:  # transformers' StopStringCriteria: stops at the token that completes one (the text is trimmed below)
        config.stop_strings = job.stops
        extra["tokenizer"] = tok
    if stream is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([stream.stopping_criteria])
    # a request's seed makes its sampling repeatable; without one, a fresh seed, so no client's sampling follows
    # from the previous client's seed
    torch.manual_seed(job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little"))
    ids = torch.tensor([job.prompt], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=stream, generation_config=config,
                             logits_processor=LogitsProcessorList(processors), **extra)
    new = out[0, len(job.prompt):].tolist()
    ended = eos in new
    if ended:
        new = new[:new.index(eos)]
    trim = StopTrimmer(job.stops)
    text = trim.whole(tok.decode(new, skip_special_tokens=True))
    return Generated(text, len(new), "stop" if ended or trim.stopped else "length")


# ---- building a job from a request ------------------------------------------------------------------------
def checked_prompt_text(texts: list[str], max_chars: int, param: str) -> None:
    """The request's texts together within max_chars, valid Unicode and not empty; else OpenAI's error."""
    problem = text_problem("\n".join(texts), max_chars)
    if problem:
        status = 413 if problem[0] == 413 else 400
        raise OpenAIError(status, f"{param} {problem[1]}", param, "prompt_too_long" if status == 413 else None)


def message_text(message: ChatMessage) -> str:
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)


def chat_prompt(run, messages: list[ChatMessage], max_chars: int) -> list[int]:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
    from jinja2 import TemplateError
    if not getattr(run.tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model's tokenizer has no chat template, so chat messages cannot be formatted "
                               "for it; send the prompt text to /v1/completions (or /v1/generate, which applies the "
                               "run's own prompt format)", "messages", "no_chat_template")
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)} for m in messages]
    checked_prompt_text([t["content"] for t in turns], max_chars, "messages")
    try:
        return run.task.prompt_ids(run.task.from_messages(turns), run.tokenizer)
    except TemplateError as e:  # the template's own check (say, roles that must alternate): the client's to fix
        raise OpenAIError(400, f"the model's chat template refused these messages: {e}", "messages") from None


def completion_prompt(run, prompt: str | list[str], max_chars: int) -> list[int]:
    text = prompt if isinstance(prompt, str) else prompt[0]
    checked_prompt_text([text], max_chars, "prompt")
    ids = run.tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise OpenAIError(400, "prompt has no tokens", "prompt")
    return ids


MIN_TEMPERATURE = 1e-3  # a request's temperature below it decodes greedily
MAX_SCHEMA_CHARS = 20_000  # a response_format schema, as JSON
MAX_STOP_CHARS = 64  # per stop sequence: transformers' StopStringCriteria costs vocabulary x length memory


def checked_stops(run, stop: str | list[str] | None, max_chars: int) -> list[str]:
    """The request's stop sequences after the run's own (generate.stop), each non-empty valid text of at
    most MAX_STOP_CHARS characters that the tokenizer can produce (transformers' StopStringCriteria is
    built here, so a stop it cannot take is the client's 400, not a model failure)."""
    from transformers import StopStringCriteria
    asked = [stop] if isinstance(stop, str) else list(stop or [])
    limit = min(MAX_STOP_CHARS, max_chars)
    for i, s in enumerate(asked):  # whitespace ("\n") is a fine stop sequence: not text_problem's rules
        if not s or len(s) > limit or _invalid_unicode(s):
            raise OpenAIError(400, f"stop[{i}] must be non-empty valid Unicode of at most {limit} characters", "stop")
    stops = list(dict.fromkeys([*run.task.stop, *asked]))
    if asked:
        try:
            StopStringCriteria(run.tokenizer, stops)
        except ValueError as e:
            raise OpenAIError(400, f"stop: this model's tokenizer cannot produce it ({e})", "stop") from None
    return stops


def _invalid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def response_constraint(run, fmt: ResponseFormat | None):
    """A fresh logits processor for json_object / json_schema (None for text or no format)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise OpenAIError(400, "response_format of type json_schema needs a json_schema object {name, schema}",
                          "response_format.json_schema")
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema.schema_ is not None else {"type": "object"}
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:  # compiled before the queue admits the request: keep it bounded
        raise OpenAIError(400, f"response_format: the JSON schema is longer than {MAX_SCHEMA_CHARS} characters",
                          "response_format.json_schema.schema")
    from lmtune.errors import InputError
    from lmtune.structured import logits_processor
    try:
        return logits_processor(run.tokenizer, schema=schema, json_layout=run.task.json_layout)  # the layout it was trained on
    except (InputError, ValueError, RuntimeError) as e:
        raise OpenAIError(400, f"response_format: this JSON schema cannot be enforced: {e}",
                          "response_format.json_schema.schema") from None


def sampling_settings(run, body: _SamplingRequest) -> dict:
    """The run's decoding chosen on dev, with the request's temperature and top_p over it."""
    settings = {k: v for k, v in run.task.decoding.items() if k != "max_new_tokens"}
    if body.temperature is not None:
        # below 1e-3 the scaled logits overflow (5e-324 makes them inf, then NaN probabilities): greedy, which is
        # what such a temperature means
        settings["temperature"] = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    if body.top_p is not None:
        settings["top_p"] = body.top_p
    return settings


def max_new_tokens(run, asked: int | None, cap: int) -> int:
    """The request's max_tokens, else the run's (the length cap chosen on dev, else generate.max_new_tokens),
    within the server's cap."""
    default = run.task.decoding.get("max_new_tokens") or run.task.max_new_tokens
    return min(asked or default, cap)


def check_request(body: _SamplingRequest, served: str) -> None:
    if body.n is not None and body.n > 1:
        raise OpenAIError(400, f"n={body.n}: this server generates one choice per request (n=1); send n requests",
                          "n", "unsupported_value")
    if body.model is not None and body.model != served:
        raise OpenAIError(404, f"the model '{body.model}' is not served here; this server serves '{served}' "
                               "(GET /v1/models)", "model", "model_not_found")


# ---- responses --------------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def openai_events(stream, job: asyncio.Future, request: Request, chunk, prompt_tokens: int, stops: list[str],
                        include_usage: bool, rid: str) -> AsyncIterator[str]:
    """OpenAI's server-sent events for one streamed generation: `chunk(text, finish_reason)` shapes each
    (a chat delta or a completion's text); the stop sequence and what follows are never sent. However the
    response ends (done, failed, the client gone), the generation is cancelled, as /v1/generate's is."""
    watcher = asyncio.ensure_future(cancel_on_disconnect(request, stream))
    trim = StopTrimmer(stops)
    try:
        first = chunk(None, None)
        if first is not None:  # a chat stream opens with the assistant's role
            yield _data(first)
        async for piece in stream:
            text = trim.feed(piece)
            if text:
                yield _data(chunk(text, None))
        rest = trim.flush()
        if rest:
            yield _data(chunk(rest, None))
        out = await job
        if out is None:  # the client left while the request waited: nobody reads this
            return
        yield _data(chunk("", out.finish_reason))
        if include_usage:
            yield _data({**chunk("", None), "choices": [], "usage": _usage(prompt_tokens, out.completion_tokens)})
        yield "data: [DONE]\n\n"
    except GenerationFailed:
        yield _data(openai_error_body(500, f"generation failed; request id {rid} is in the server log"))
        yield "data: [DONE]\n\n"
    except Exception as e:  # the stream itself broke (its backstop timeout): the client gets an error event
        log.error("streaming failed for request %s: %s", rid, error_origin(e), extra={STRUCTURED: True})
        yield _data(openai_error_body(500, f"generation failed; request id {rid} is in the server log"))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()
        watcher.cancel()
        job.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure was logged; don't warn again


def chat_chunk(base: dict):
    def chunk(text: str | None, finish_reason: str | None) -> dict:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return chunk


def completion_chunk(base: dict):
    def chunk(text: str | None, finish_reason: str | None) -> dict | None:
        if text is None:
            return None  # a completion stream has no opening chunk
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    return chunk


# ---- routes -----------------------------------------------------------------------------------------------
def add_openai_routes(app: FastAPI, run, served: str, max_chars: int, max_new_tokens_cap: int, require_key,
                      queue: GenerationQueue) -> None:
    """POST /v1/chat/completions and /v1/completions on a generation run's server (`served`: the model id of
    GET /v1/models); on any other run a 404 that says why (left out of its OpenAPI document). Errors on
    these paths are OpenAI's error objects."""
    from lmtune.serve.streaming import CancellableStream
    _openai_errors_on_openai_paths(app)
    errors = {status: {"model": OpenAIErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
    auth = [Depends(require_key)]
    if not run.task.supports(GENERATE):
        async def not_generative() -> None:
            raise OpenAIError(404, f"the served model '{served}' is a {run.task.name} run, which does not generate text: "
                                   "the OpenAI routes need a generation run (use /v1/predict)", None, "model_not_generative")
        for path in OPENAI_PATHS:
            app.add_api_route(path, not_generative, methods=["POST"], dependencies=auth, include_in_schema=False)
        return

    async def answer(job: Job, request: Request, stream: bool, include_usage: bool, kind: str):
        rid = request.state.request_id
        base = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{rid}", "created": int(time.time()), "model": served}
        queue.admit()
        if not stream:
            quiet = CancellableStream(run.tokenizer)  # its stopping criterion only: a client that leaves stops the model
            try:
                out = await while_connected(request, quiet, asyncio.to_thread(
                    queue.run, lambda: generate_job(run, job, quiet), quiet, rid))
            except GenerationFailed:
                raise OpenAIError(500, f"generation failed; request id {rid} is in the server log") from None
            if out is None:  # the client left while the request waited: nobody reads this
                return Response(status_code=499)
            usage = _usage(len(job.prompt), out.completion_tokens)
            if kind == "chat":
                return ChatCompletion(**base, usage=usage, choices=[ChatChoice(
                    message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)])
            return Completion(**base, usage=usage, choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])
        pieces = CancellableStream(run.tokenizer)
        future = asyncio.ensure_future(asyncio.to_thread(queue.run, lambda: generate_job(run, job, pieces), pieces, rid))
        chunk = chat_chunk(base) if kind == "chat" else completion_chunk(base)
        return StreamingResponse(openai_events(pieces, future, request, chunk, len(job.prompt), job.stops, include_usage, rid),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def job_for(body: _SamplingRequest, prompt: list[int], asked_tokens: int | None) -> Job:
        return Job(prompt, sampling_settings(run, body), max_new_tokens(run, asked_tokens, max_new_tokens_cap),
                   checked_stops(run, body.stop, max_chars), body.seed, response_constraint(run, body.response_format))

    streamed = {200: {"content": {"text/event-stream": {}}, "description": "the completion (JSON), or with stream=true "
                      "server-sent events: OpenAI's chunks, then `data: [DONE]`"}}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth, responses={**errors, **streamed})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI's chat completion: the messages through the tokenizer's chat template."""
        check_request(body, served)
        prompt = chat_prompt(run, body.messages, max_chars)
        job = await asyncio.to_thread(job_for, body, prompt, body.max_completion_tokens or body.max_tokens)
        return await answer(job, request, body.stream, bool(body.stream_options and body.stream_options.include_usage), "chat")

    @app.post("/v1/completions", response_model=Completion, dependencies=auth, responses={**errors, **streamed})
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI's (legacy) completion: the prompt text continued as it is."""
        check_request(body, served)
        prompt = completion_prompt(run, body.prompt, max_chars)
        job = await asyncio.to_thread(job_for, body, prompt, body.max_tokens)
        return await answer(job, request, body.stream, bool(body.stream_options and body.stream_options.include_usage), "text")


def _openai_errors_on_openai_paths(app: FastAPI) -> None:
    """HTTP and validation errors on the OpenAI paths as OpenAI's error objects (a bad field is a 400 that
    names it, as OpenAI answers); every other path keeps the app's own error bodies."""
    http_default = app.exception_handlers.get(StarletteHTTPException)

    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path not in OPENAI_PATHS:
            return await http_default(request, exc)
        body = openai_error_body(exc.status_code, str(exc.detail), getattr(exc, "param", None), getattr(exc, "code", None))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError):
        if request.url.path not in OPENAI_PATHS:
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
        loc = [str(x) for x in first.get("loc", ())][1:]  # after "body"; a union's member names it too (stop.str)
        param = loc[0] if loc else None
        # the message only: pydantic's error also holds the input, which may be the user's text
        return JSONResponse(openai_error_body(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}", param), 400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
