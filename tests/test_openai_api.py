"""The OpenAI-compatible routes (lmtune.serve.openai_api) called by the official `openai` client, pointed at a
served tiny generation run (a random Llama whose tokenizer has a chat template, fine-tuned on toy
summaries): completions, chat completions streamed and not, stop sequences, response_format by
constrained decoding, OpenAI's error objects, the shared limits and queue, and a dropped stream."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

import lmtune
from lmtune.serve.app import ServeSettings, create_app
from lmtune.serve.openai_api import StopTrimmer
from tests.fuzz import fuzz_openapi
from tests.test_decoders import save_tiny_decoder
from tests.test_generation import _CountedForward, _rows, _served, _write

KEY = "k-openai-long-enough-key"
PROMPT = "the food was great"  # the trained model answers it with "the food was great"
MESSAGES = [{"role": "user", "content": PROMPT}]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LABEL_SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}}, "required": ["label"],
                "additionalProperties": False}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> str:
    """A generation run trained through the tokenizer's chat template (lmtune uses it when there is one)."""
    tmp = tmp_path_factory.mktemp("openai-run")
    base = save_tiny_decoder(tmp / "base", "llama", positions=256)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    data = {k: _write(tmp / f"{k}.jsonl", _rows(n, s)) for k, n, s in (("train", 160, 1), ("dev", 16, 2), ("test", 16, 3))}
    return str(lmtune.train({
        "task": "generation", "output_dir": str(tmp / "runs"), "run_name": "gen-chat", "model": {"name": base},
        "data": {**data, "label_column": "summary", "max_length": 128},
        "generate": {"instruction": "", "max_new_tokens": 12, "search_trials": 0}, "peft": {"method": "none"},
        "train": {"epochs": 6, "lr": 1e-2, "progress": "none", "seed": 1}}).run_dir)


def _app(run_dir: str, monkeypatch, **settings):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    return create_app(ServeSettings(run_dir=run_dir, backend="torch", **{"max_new_tokens": 32, "max_chars": 300, **settings}))


@pytest.fixture(scope="module")
def served(chat_run):
    """The run on a real uvicorn server in a thread, and an openai client for it."""
    with pytest.MonkeyPatch.context() as mp:
        app = _app(chat_run, mp, max_body_bytes=20_000)
    with _served(app) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_completion_and_a_streamed_chat_completion_give_the_greedy_text(served, chat_run):
    url, client = served
    model_id = client.models.list().data[0].id
    assert model_id == Path(chat_run).name
    chat = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0)
    text = chat.choices[0].message.content
    assert chat.object == "chat.completion" and chat.model == model_id and chat.id.startswith("chatcmpl-")
    assert text.strip() == PROMPT and chat.choices[0].finish_reason == "stop"
    tok = AutoTokenizer.from_pretrained(Path(chat_run) / "model")
    prompt_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat.usage.prompt_tokens == len(prompt_ids) and chat.usage.completion_tokens >= 2
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and sum(1 for p in pieces if p) >= 2  # the same text, in several pieces
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage

    # a completion continues the raw text: here the chat-formatted prompt, so the same answer comes
    raw = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    done = client.completions.create(model=model_id, prompt=raw, max_tokens=100, temperature=0)
    assert done.object == "text_completion" and done.model == model_id and done.choices[0].text.strip() == PROMPT
    assert done.choices[0].finish_reason == "stop" and done.usage.prompt_tokens == len(tok(raw)["input_ids"])
    streamed = list(client.completions.create(model=model_id, prompt=raw, max_tokens=100, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    # max_tokens cuts it: finish_reason length, a prefix of the whole
    short = client.completions.create(model=model_id, prompt=raw, max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    assert done.choices[0].text.startswith(short.choices[0].text)


def test_stop_sequences_end_the_text_before_them_streamed_or_not(served):
    _, client = served
    for stop in (" was", [" grea", "zzz"]):
        cut = client.chat.completions.create(messages=MESSAGES, model="gen-chat", temperature=0, stop=stop)
        first = stop if isinstance(stop, str) else stop[0]
        assert cut.choices[0].message.content == PROMPT[:PROMPT.index(first)] and cut.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(messages=MESSAGES, model="gen-chat", temperature=0, stop=stop,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_stream_never_sends_part_of_a_stop_sequence():
    trim = StopTrimmer(["food was", "xyz"])
    sent = [trim.feed(p) for p in ["the fo", "od w", "as great"]] + [trim.flush()]
    assert sent == ["the ", "", "", ""] and trim.stopped
    trim = StopTrimmer(["food was"])
    assert [trim.feed(p) for p in ["the fo", "od is"]] + [trim.flush()] == ["the ", "food is", ""] and not trim.stopped
    assert StopTrimmer([]).whole("anything") == "anything"


def test_response_format_json_schema_gives_json_that_validates(served):
    _, client = served
    free = client.chat.completions.create(model="gen-chat", messages=MESSAGES, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # the model was tuned to answer in words
        json.loads(free.choices[0].message.content)
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True}}
    for temperature in (0, 1.0):
        out = client.chat.completions.create(model="gen-chat", messages=MESSAGES, temperature=temperature, seed=3, max_tokens=32,
                                             response_format=fmt)
        assert out.choices[0].finish_reason == "stop", out
        jsonschema_rs.validate(LABEL_SCHEMA, json.loads(out.choices[0].message.content))
    chunks = list(client.chat.completions.create(model="gen-chat", messages=MESSAGES, temperature=0, response_format=fmt, max_tokens=32,
                                                 stream=True))
    jsonschema_rs.validate(LABEL_SCHEMA, json.loads("".join(c.choices[0].delta.content or "" for c in chunks)))
    # /v1/completions takes it too (outside the client's typed arguments, as vLLM's)
    raw = client.completions.create(model="gen-chat", prompt=PROMPT, max_tokens=32, temperature=0,
                                    extra_body={"response_format": fmt})
    jsonschema_rs.validate(LABEL_SCHEMA, json.loads(raw.choices[0].text))
    anything = client.chat.completions.create(model="gen-chat", messages=MESSAGES, temperature=0,
                                              response_format={"type": "json_object"})
    assert anything.choices[0].message.content.startswith("{")


def test_errors_are_openai_error_objects(served):
    url, client = served
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-0123456789", max_retries=0).chat.completions.create(
            model="gen-chat", messages=MESSAGES)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen-chat", messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error" and "n=1" in e.value.body["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "n": 2, "stream": True},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.headers["x-request-id"]
    no_key = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert e.value.body["param"] == "model" and "gen-chat" in e.value.body["message"]
    for bad, param in ((dict(temperature=3), "temperature"), (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
                       (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
                        "response_format.json_schema.schema"),
                       (dict(messages=[{"role": "tool", "content": "x"}]), "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "gen-chat", "messages": MESSAGES, **bad})
        assert e.value.body["param"] == param, (bad, e.value.body)
    # the server's limits: max_chars on the prompt (all messages together), the body size before it is parsed
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gen-chat", messages=[{"role": "system", "content": "x" * 200}, *MESSAGES * 10])
    assert e.value.status_code == 413 and e.value.body["code"] == "prompt_too_long"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="gen-chat", prompt="word " * 5000)
    assert e.value.status_code == 413 and "request body over" in e.value.body["message"]


def test_without_a_chat_template_chat_is_a_400_and_the_queue_and_cap_are_the_servers(chat_run, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    shutil.copytree(chat_run, plain)
    (plain / "model" / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "model" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(_app(str(plain), monkeypatch, max_new_tokens=2)) as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
        assert "/v1/completions" in r.json()["error"]["message"]
        capped = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "temperature": 0}, headers=auth).json()
        assert capped["usage"]["completion_tokens"] <= 2 and capped["model"] == "plain"
    with TestClient(_app(str(plain), monkeypatch, max_generate_queue=0)) as c:  # the queue /v1/generate shares
        for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/generate", {"text": PROMPT})):
            r = c.post(path, json=body, headers=auth)
            assert r.status_code == 503 and r.headers["Retry-After"] == "2", (path, r.text)
        assert c.post("/v1/completions", json={"prompt": PROMPT}, headers=auth).json()["error"]["type"] == "server_error"


def test_a_dropped_chat_stream_stops_the_model_within_two_steps(chat_run, monkeypatch):
    forward = _CountedForward(step_s=0.05).install(monkeypatch)
    app = _app(chat_run, monkeypatch, max_new_tokens=150)  # 150 steps: 7.5 s if nothing stops them
    with _served(app) as url, httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 150, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            time.sleep(0.5)
            assert forward.calls >= 3  # generating
        at_close = forward.calls  # leaving the block closed the connection mid-stream
        time.sleep(1.5)  # 30 more steps if the model kept going
        assert forward.calls - at_close <= 2, (at_close, forward.calls)
        monkeypatch.setattr(forward, "step_s", 0.0)  # the queue is free: the next request runs to its length
        done = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="gen-chat", messages=MESSAGES, max_tokens=5)
        assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"


def test_a_model_failure_is_a_500_or_an_error_chunk_and_the_log_keeps_no_text(chat_run, monkeypatch, caplog):
    _CountedForward(step_s=0.0, fail_at=4).install(monkeypatch)
    caplog.set_level(logging.INFO, logger="lmtune.serve")
    with _served(_app(chat_run, monkeypatch)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="gen-chat", messages=MESSAGES, max_tokens=20)
        assert e.value.body["type"] == "server_error" and "generation failed" in e.value.body["message"]
        with pytest.raises(openai.APIError, match="generation failed"):  # the client raises on the error chunk
            list(client.completions.create(model="gen-chat", prompt=PROMPT, max_tokens=20, stream=True))
    failed = [r.getMessage() for r in caplog.records if "generation failed" in r.getMessage()]
    assert len(failed) == 2 and all("RuntimeError" in m for m in failed), failed
    assert not any(PROMPT in r.getMessage() for r in caplog.records)


def test_fuzzing_the_openai_routes_of_a_chat_model_gives_no_5xx(chat_run, monkeypatch):
    """schemathesis over the server's OpenAPI with a chat template, so generated messages, stops and
    response formats (random JSON schemas included) reach the model and the grammar compiler."""
    app = _app(chat_run, monkeypatch, max_new_tokens=3, max_chars=200)
    calls = fuzz_openapi(app, ({"Authorization": f"Bearer {KEY}"},), 15, {"/v1/chat/completions", "/v1/completions"})
    assert ("/v1/chat/completions", 200) in calls and ("/v1/completions", 200) in calls


def test_the_runs_own_constraint_holds_on_the_openai_routes_unless_the_request_brings_one(chat_run, tmp_path, monkeypatch):
    """A run trained with generate.choices answers one of them on /v1/completions and chat too; a request's
    response_format replaces it for that request."""
    chosen = tmp_path / "chosen"
    shutil.copytree(chat_run, chosen)
    meta = json.loads((chosen / "model" / "lmtune.json").read_text())
    meta["task_state"]["choices"] = ["alpha", "beta gamma"]  # as a run with generate.choices saves it
    (chosen / "model" / "lmtune.json").write_text(json.dumps(meta))
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(_app(str(chosen), monkeypatch)) as c:
        done = c.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0}, headers=auth).json()
        assert done["choices"][0]["text"].strip() in ("alpha", "beta gamma"), done
        chat = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 1, "seed": 3}, headers=auth).json()
        assert chat["choices"][0]["message"]["content"].strip() in ("alpha", "beta gamma"), chat
        fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL_SCHEMA}}
        own = c.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": fmt, "temperature": 0,
                                                   "max_tokens": 32}, headers=auth).json()
        assert json.loads(own["choices"][0]["message"]["content"])["label"] in ("pos", "neg"), own


def test_stop_sequences_are_bounded_and_checked_before_the_queue(served, chat_run, monkeypatch):
    url, client = served
    import httpx
    auth = {"Authorization": f"Bearer {KEY}"}
    long = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "stop": ["a" * 65]}, headers=auth, timeout=30)
    assert long.status_code == 400 and long.json()["error"]["param"] == "stop"
    fine = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "stop": ["a" * 64], "max_tokens": 2}, headers=auth,
                      timeout=30)
    assert fine.status_code == 200, fine.text
    big = {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 200} for i in range(120)}}
    with TestClient(_app(chat_run, monkeypatch, max_body_bytes=100_000)) as c:  # a body the server takes, a schema too big
        r = c.post("/v1/chat/completions", headers=auth, json={
            "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": big}}})
    assert r.status_code == 400 and "20000" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT, "max_tokens": 150}),
                                       ("/v1/generate", {"text": PROMPT, "max_new_tokens": 150, "stream": False})])
def test_a_dropped_non_streamed_request_stops_the_model_too(chat_run, monkeypatch, path, body):
    forward = _CountedForward(step_s=0.05).install(monkeypatch)
    app = _app(chat_run, monkeypatch, max_new_tokens=150)  # 150 steps: 7.5 s if nothing stops them
    with _served(app) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.6)
        at_close = forward.calls
        assert at_close >= 3  # it was generating
        time.sleep(1.5)  # 30 more steps if the model kept going
        assert forward.calls - at_close <= 8, (at_close, forward.calls)  # the watcher polls every 0.25 s


def test_a_vanishing_temperature_decodes_greedily(served):
    """5e-324 (a fuzzer's find): dividing the logits by it gives inf and NaN probabilities, a 500; it means greedy."""
    _, client = served
    tiny = client.completions.create(model="gen-chat", prompt=PROMPT, max_tokens=5, temperature=5e-324)
    greedy = client.completions.create(model="gen-chat", prompt=PROMPT, max_tokens=5, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text
