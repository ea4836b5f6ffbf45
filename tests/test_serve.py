"""Export (ONNX, int8) and the HTTP service: auth, limits, errors, batching, abstention, NER spans,
metrics, back-pressure, PII masking, and a schemathesis fuzz run of the OpenAPI schema."""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.export.onnx import export_run
from lmtune.serve.app import ServeSettings, create_app
from lmtune.serve.batcher import Batcher, QueueFull
from lmtune.serve.security import mask_pii
from tests.conftest import toy_rows, write_csv
from tests.fuzz import fuzz_openapi

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OOS = ["the train leaves at noon from platform two", "weather tomorrow at noon", "platform two the train"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, pretrained_tiny) -> str:
    d = tmp_path_factory.mktemp("serve_cls")
    dev = toy_rows(32, 2) + [(t, "oos") for t in OOS * 4]
    run = lmtune.train({"output_dir": str(d), "run_name": "cls",
                        "data": {"train": str(write_csv(d / "train.csv", toy_rows(96, 1))),
                                 "dev": str(write_csv(d / "dev.csv", dev)), "max_length": 32},
                        "model": {"name": pretrained_tiny},
                        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1},
                        "abstain": {"target": "false_accept", "value": 0.0, "oos_label": "oos"}})
    return str(run.run_dir)


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_model) -> str:
    d = tmp_path_factory.mktemp("serve_ner")
    sents = "\n\n".join(["Peter B-PER\nlives O\nin O\nParis B-LOC", "Anna B-PER\nvisits O\nRome B-LOC"] * 20)
    (d / "train.conll").write_text(sents + "\n")
    run = lmtune.train({"task": "ner", "output_dir": str(d), "run_name": "ner",
                        "data": {"train": str(d / "train.conll"), "dev": str(d / "train.conll"), "max_length": 32},
                        "model": {"name": tiny_model},
                        "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1, "calibrate": False}})
    return str(run.run_dir)


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)


def _client(run_dir: str, **settings) -> TestClient:
    return TestClient(create_app(ServeSettings(run_dir=run_dir, backend="torch", **settings)))


def test_export_onnx_and_int8_on_the_packaged_model(tmp_path, capsys):
    data = {k: str(write_csv(tmp_path / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 64, 1), ("dev", 48, 2))}
    # the plain fine-tuned classifier's export (32 per class would make fewshot's auto choose setfit: see test_fewshot)
    run = lmtune.train({"output_dir": str(tmp_path), "run_name": "mini", "data": data, "fewshot": {"method": "none"},
                        "train": {"epochs": 1, "batch_size": 16, "progress": "none"}})
    assert main(["export", str(run.run_dir), "--quantize", "int8", "--sample", "32"]) == 0
    report = json.loads((run.run_dir / "export" / "export.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-4
    assert report["onnx_int8"]["max_abs_logit_diff"] < 0.5
    acc = report["pytorch"]["dev"]["accuracy"]
    assert report["onnx_fp32"]["dev"]["accuracy"] == pytest.approx(acc)
    assert report["onnx_int8"]["dev"]["accuracy"] >= acc - 0.05
    assert report["onnx_int8"]["bytes"] < 0.5 * report["onnx_fp32"]["bytes"]
    onnx_run = lmtune.load(run.run_dir, backend="onnx-int8")
    texts = ["the food was great", "awful service"]
    assert [r["label"] for r in onnx_run.predict(texts)] == [r["label"] for r in lmtune.load(run.run_dir).predict(texts)]
    with pytest.raises(lmtune.InputError, match="magnitude"):
        export_run(run.run_dir, prune="heads")
    pruned = export_run(run.run_dir, prune="magnitude:0.3")
    assert pruned["prune"]["sparsity"] == pytest.approx(0.3, abs=0.01) and pruned["onnx_fp32"]["max_abs_logit_diff"] < 1e-4


def test_auth_limits_and_errors(cls_run, keys):
    with _client(cls_run, max_texts=4, max_chars=50, max_body_bytes=2000) as c:
        body = {"texts": ["the food was great"]}
        assert c.post("/v1/predict", json=body).status_code == 401
        r = c.post("/v1/predict", json=body, headers={"Authorization": "Bearer wrong-key-0123456789"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and KEY not in r.text
        ok = c.post("/v1/predict", json=body, headers={"X-API-Key": KEY, "X-Request-ID": "abc-123"})
        assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "abc-123" and ok.json()["request_id"] == "abc-123"
        p = ok.json()["predictions"][0]
        assert p["label"] in ("pos", "neg") and abs(sum(p["probabilities"].values()) - 1) < 1e-4
        too_many = c.post("/v1/predict", json={"texts": ["good"] * 5}, headers=AUTH)
        assert too_many.status_code == 413 and "limit is 4" in too_many.json()["detail"]
        too_long = c.post("/v1/predict", json={"texts": ["good " * 20]}, headers=AUTH)
        assert too_long.status_code == 413 and "texts[0]" in too_long.json()["detail"]
        big = c.post("/v1/predict", content=b'{"texts": ["' + b"a" * 3000 + b'"]}', headers={**AUTH, "Content-Type": "application/json"})
        assert big.status_code == 413
        assert c.post("/v1/predict", json={"texts": ["  "]}, headers=AUTH).status_code == 422
        assert c.post("/v1/predict", json={"texts": []}, headers=AUTH).status_code == 422
        assert c.post("/v1/predict", json={"text": "x"}, headers=AUTH).status_code == 422
        assert c.post("/v1/predict", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}).status_code == 422
        assert c.get("/healthz").json()["status"] == "ok" and c.get("/readyz").json()["status"] == "ready"
        assert c.get("/metrics").status_code == 401
        metrics = c.get("/metrics", headers=AUTH).text
        assert 'lmtune_requests_total{endpoint="/v1/predict",status="401"} 2.0' in metrics
        assert "lmtune_batch_size_bucket" in metrics and "lmtune_request_seconds_bucket" in metrics


def test_serve_refuses_to_start_without_keys(cls_run, monkeypatch):
    monkeypatch.delenv("LMTUNE_API_KEYS", raising=False)
    with pytest.raises(lmtune.InputError, match="no API key"):
        create_app(ServeSettings(run_dir=cls_run))
    monkeypatch.setenv("LMTUNE_API_KEYS", "short")
    with pytest.raises(lmtune.InputError, match="shorter than 16"):
        create_app(ServeSettings(run_dir=cls_run))


def test_abstention_over_http(cls_run, keys):
    with _client(cls_run) as c:
        preds = c.post("/v1/predict", json={"texts": OOS + ["the food was great"]}, headers=AUTH).json()["predictions"]
    assert all(p["abstained"] and p["label"] == "oos" and p["top_label"] in ("pos", "neg") for p in preds[:3])


def test_ner_spans_over_http(ner_run, keys):
    with _client(ner_run) as c:
        r = c.post("/v1/predict", json={"texts": ["Peter lives in Paris"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert len(p["tags"]) == 4
    assert {(e["text"], e["label"]) for e in p["entities"]} == {("Peter", "PER"), ("Paris", "LOC")}
    assert all("Peter lives in Paris"[e["start"]:e["end"]] == e["text"] for e in p["entities"])


def test_a_text_gets_the_same_answer_alone_or_batched(cls_run, keys):
    texts = [f"{w} the movie was really quite a day" * (1 + i % 3) for i, w in enumerate(["good", "bad", "superb", "awful"] * 4)]
    with _client(cls_run, max_wait_ms=50) as c:
        alone = [c.post("/v1/predict", json={"texts": [t]}, headers=AUTH).json()["predictions"][0] for t in texts]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda t: c.post("/v1/predict", json={"texts": [t]}, headers=AUTH).json()["predictions"][0], texts))
        metrics = c.get("/metrics", headers=AUTH).text
    for a, b in zip(alone, together):
        assert a["label"] == b["label"]
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5 for k in a["probabilities"])
    count = float(next(x for x in metrics.splitlines() if x.startswith("lmtune_batch_size_count")).split()[-1])
    assert count < 2 * len(texts)  # 32 requests went through fewer than 32 model calls


def test_queue_full_gives_503_with_retry_after(cls_run, keys):
    with _client(cls_run, max_queue=2) as c:
        r = c.post("/v1/predict", json={"texts": ["good", "bad", "fine"]}, headers=AUTH)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"


def test_batcher_bounds_the_queue_and_drains_on_close():
    async def scenario():
        calls = []

        def predict(texts):
            calls.append(len(texts))
            return [{"label": t} for t in texts]
        b = Batcher(predict, max_batch_size=8, max_wait_ms=20, max_queue=10)
        b.start()
        jobs = [asyncio.ensure_future(b.submit([f"t{i}", f"u{i}"])) for i in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(["one too many"])
        await b.close()  # graceful: every accepted request is answered
        results = [j.result() for j in jobs]
        assert results[3] == [{"label": "t3"}, {"label": "u3"}]
        assert sum(calls) == 10 and len(calls) < 5
    asyncio.run(scenario())


def test_pii_is_masked_in_logs(cls_run, keys, caplog):
    assert mask_pii("mail bob.smith@example.com or call +1 (415) 555-0134, card 4111 1111 1111 1111") == \
        "mail <email> or call <phone>, card <number>"
    assert mask_pii("身份证 11010519491231002X") == "身份证 <id>"
    caplog.set_level(logging.INFO)
    with _client(cls_run) as c:
        c.post("/v1/predict", json={"texts": ["reach me at bob.smith@example.com"]}, headers={**AUTH, "X-Request-ID": "r1"})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "id=r1" in logged and "bob.smith" not in logged and KEY not in logged


def test_openai_routes_on_a_classifier_say_it_does_not_generate(cls_run, keys):
    with _client(cls_run) as c:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            assert c.post(path, json=body).status_code == 401
            r = c.post(path, json=body, headers=AUTH)
            error = r.json()["error"]
            assert r.status_code == 404 and error["code"] == "model_not_generative" and "classification" in error["message"]
        assert "/v1/chat/completions" not in c.get("/openapi.json").json()["paths"]


@pytest.fixture
def api_app(cls_run, keys):
    return create_app(ServeSettings(run_dir=cls_run, backend="torch", max_texts=8, max_chars=200))


def test_fuzzing_the_openapi_schema_gives_no_5xx(api_app):
    calls = [code for _, code in fuzz_openapi(api_app, (AUTH, {}), 25, {"/v1/predict", "/healthz", "/readyz", "/metrics"})]
    assert len(calls) >= 20 and 200 in calls and 401 in calls
