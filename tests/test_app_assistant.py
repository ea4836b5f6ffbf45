"""The assistant app end to end: an intent run with abstention, an FAQ, a retrieval run, routing,
the threshold chosen on dev, and the HTTP service (auth, sessions, page, logs without texts)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

import lmtune
from lmtune.apps import assistant
from lmtune.apps.assistant.server import create_app
from lmtune.errors import InputError
from lmtune.serve.app import ServeSettings
from tests.test_retrieval import TOPICS, _cfg, faq_rows, tiny_encoder, train_pair_run  # noqa: F401  (the fixture)
from tests.fuzz import fuzz_openapi

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OOS = ["the train leaves at noon from platform two", "weather tomorrow at noon", "platform two the train",
       "who won the match yesterday"]


def _labeled(path: Path, rows: list[dict], oos: list[str]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        topic = {d: q for q, d in TOPICS}
        w.writerows([(r["query"], topic[r["document"].split()[3]]) for r in rows] + [(t, "oos") for t in oos])
    return str(path)


@pytest.fixture(scope="module")
def app_config(tmp_path_factory, tiny_encoder) -> Path:  # noqa: F811
    d = tmp_path_factory.mktemp("assistant")
    retriever = lmtune.train(_cfg(d, tiny_encoder))
    intents = lmtune.train({"output_dir": str(d / "runs"), "run_name": "intents", "model": {"name": tiny_encoder},
                            "data": {"train": _labeled(d / "itrain.csv", faq_rows(240, 1), []),
                                     "dev": _labeled(d / "idev.csv", faq_rows(48, 2), OOS * 3), "max_length": 32},
                            "train": {"epochs": 10, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1},
                            "abstain": {"target": "false_accept", "value": 0.0, "oos_label": "oos"}})
    with open(d / "faq.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["intent", "answer"])
        w.writerows([(q, f"our answer on {a} for customers") for q, a in TOPICS])
    conf = d / "assistant.yaml"
    conf.write_text(yaml.safe_dump({"intents": str(intents.run_dir), "faq": "faq.csv", "retriever": str(retriever.run_dir),
                                    "dev": _labeled(d / "adev.csv", faq_rows(48, 4), OOS * 3)}), encoding="utf-8")
    _labeled(d / "atest.csv", faq_rows(48, 3), OOS * 3)
    return conf


def test_routes_answer_known_intents_and_hand_off_out_of_scope(app_config):
    cfg = assistant.load_config(app_config)
    cfg.retriever = None  # the intent run alone: it answers or hands off
    a = assistant.Assistant(cfg)
    out = a.route(["what about my refund please", OOS[0]])
    assert out[0]["route"] == "intent" and out[0]["answer"] == "our answer on reimbursement for customers"
    assert out[0]["handoff"] is False and "intent_score" in out[0]["scores"]
    assert out[1]["route"] == "handoff" and out[1]["handoff"] and out[1]["answer"] == assistant.FALLBACK
    result = a.evaluate(str(app_config.parent / "atest.csv"))
    assert result["routing_accuracy"] >= 0.8 and result["n"] == 60 and result["oos_handoff_recall"] is not None


def test_retrieval_route_and_its_threshold(app_config):
    a = assistant.Assistant(assistant.load_config(app_config))
    abstained = {"label": "oos", "abstained": True, "score": 0.4}
    sims = np.zeros(len(a.faq))
    sims[1] = 0.9
    assert a._route(abstained, sims, 0.5)["route"] == "faq"
    assert a._route(abstained, sims, 0.5)["answer"] == a.faq[1]["answer"]
    assert a._route(abstained, sims, 0.95)["route"] == "handoff"
    assert a._route(abstained, sims, None)["route"] == "handoff"  # no threshold: retrieval never answers
    # the chosen threshold is one no lower threshold beats on dev
    texts, gold = a._labeled(a.cfg.dev)
    preds, all_sims = a._candidates(texts)

    def right(t):
        return sum(a.correct(a._route(p, all_sims[i], t), g) for i, (p, g) in enumerate(zip(preds, gold)))
    chosen = a.threshold if a.threshold is not None else float("inf")
    cands = sorted({round(float(s.max()), 4) for s in all_sims} | {float("inf")})  # the thresholds worth trying
    counts = {t: right(t) for t in cands}
    best = max(counts.values())
    assert chosen == max(t for t, c in counts.items() if c == best)  # the sorted-score count agrees with routing each message
    assert all(right(t) <= best for t in (-1.0, 0.0, 0.5, 0.9))


def test_a_reranker_reorders_the_faq_candidates_and_its_score_is_thresholded(app_config, tmp_path, tiny_encoder):  # noqa: F811
    pairs = train_pair_run(tmp_path, tiny_encoder)
    cfg = assistant.load_config(app_config)
    cfg.reranker, cfg.rerank_depth = str(pairs.run_dir), 3
    a = assistant.Assistant(cfg)
    texts, gold = a._labeled(cfg.dev)
    preds, scores = a._candidates(texts)
    plain = a.retriever.embed(texts) @ a.faq_emb.T
    for i, p in enumerate(preds):
        finite = np.flatnonzero(np.isfinite(scores[i]))
        if a._intent_answers(p):
            assert len(finite) == 0  # answered by the intent run: never reranked
            continue
        assert set(finite) == set(np.argsort(-plain[i], kind="stable")[:3])  # the retriever's 3 best, rescored
        want = pairs.relevance([(texts[i], a.faq[j]["question"]) for j in finite])
        assert scores[i, finite] == pytest.approx(want, abs=1e-6)
    assert a.threshold is None or 0.0 <= a.threshold <= 1.0  # chosen on dev among the pair run's probabilities
    routed = a.route(texts)
    for r, row in zip(routed, scores):
        if r["route"] == "faq":  # the entry answered is the reranker's best, not the retriever's
            assert a.faq[int(np.argmax(row))]["answer"] == r["answer"] and r["scores"]["retrieval_score"] >= a.threshold
    bad = app_config.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump({"intents": cfg.intents, "faq": "faq.csv", "reranker": str(pairs.run_dir)}), encoding="utf-8")
    with pytest.raises(InputError, match="give retriever too"):
        assistant.load_config(bad)


def test_chat_service(app_config, monkeypatch, caplog):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    app = create_app(assistant.load_config(app_config), ServeSettings(run_dir="", max_chars=200))
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="lmtune.assistant"):
        assert c.post("/v1/chat", json={"message": "refund please"}).status_code == 401
        assert c.get("/").status_code == 200 and "/v1/chat" in c.get("/").text
        r = c.post("/v1/chat", json={"message": "what about my refund please"}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["turn"] == 1 and body["answer"] == "our answer on reimbursement for customers"
        again = c.post("/v1/chat", json={"message": OOS[1], "session_id": body["session_id"]}, headers=AUTH).json()
        assert again["turn"] == 2 and again["route"] in ("faq", "handoff")
        assert c.post("/v1/chat", json={"message": "x" * 201}, headers=AUTH).status_code == 413
        assert c.post("/v1/chat", json={"message": "hi", "session_id": "bad id!"}, headers=AUTH).status_code == 422
        assert c.post("/v1/chat", json={"message": "   "}, headers=AUTH).status_code == 422
        assert 'lmtune_assistant_routes_total{route="intent"}' in c.get("/metrics", headers=AUTH).text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "route=intent" in logged or "route=faq" in logged
    assert "what about my" not in logged and "tomorrow at noon" not in logged  # never the user's text (labels are fine)


def test_bad_configs(tmp_path, app_config, monkeypatch):
    conf = tmp_path / "a.yaml"
    conf.write_text("intents: x\nfaq: y\nretreiver: z\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown key"):
        assistant.load_config(conf)
    bad_faq = tmp_path / "faq.csv"
    bad_faq.write_text("intent,answer\nrefund,\n", encoding="utf-8")
    cfg = assistant.load_config(app_config)
    cfg.faq = str(bad_faq)
    with pytest.raises(InputError, match=r"faq.csv: line 2: the answer is empty"):
        assistant.Assistant(cfg)
    bad_faq.write_text("intent,answer\nnot_an_intent,hello\n", encoding="utf-8")
    with pytest.raises(InputError, match="not labels of the intent run"):
        assistant.Assistant(cfg)
    monkeypatch.delenv("LMTUNE_API_KEYS", raising=False)
    with pytest.raises(InputError, match="no API key"):
        create_app(assistant.load_config(app_config), ServeSettings(run_dir=""))


def test_fuzzing_the_assistant_api_gives_no_5xx(app_config, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    app = create_app(assistant.load_config(app_config), ServeSettings(run_dir="", max_chars=200))
    with TestClient(app) as c:  # what a hostile client may send that the schema's generator will hardly find
        for message in ("nul \x00 inside", "\ud800", "\u2028\u2029", "é" * 200, "🙂" * 50):
            r = c.post("/v1/chat", content=json.dumps({"message": message}), headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code in (200, 413, 422), (message, r.status_code, r.text)
        calls = [code for _, code in fuzz_openapi(app, (AUTH, {}), 15, {"/v1/chat", "/healthz", "/metrics"})]
    assert len(calls) >= 20 and 200 in calls and 401 in calls
