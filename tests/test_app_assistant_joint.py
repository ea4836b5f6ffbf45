"""The assistant over a joint intent + slot run (issue 49, item 1): one model gives the intent and the slots,
every reply carries the slots, FAQ answers are filled from them, and an answer that needs a slot the message
lacks becomes a clarifying question (route clarify). The plain classification case is tests/test_app_assistant.py."""
from __future__ import annotations

import csv
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
from tests.fuzz import fuzz_openapi
from tests.test_joint import INTENTS, config, rows, write_jsonl

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
# play_music never has a city: its answer always needs one the message lacks (the clarify route)
ANSWERS = {"book_flight": "Your flight from {fromloc} to {toloc} is booked.",
           "get_weather": "It will be sunny in {city} on {date}.",
           "play_music": "Playing {song} in {city} {{as asked}}."}


def write_faq(path: Path, answers: dict[str, str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["intent", "answer"])
        w.writerows(answers.items())


@pytest.fixture(scope="module")
def joint_config(tmp_path_factory, tiny_model) -> Path:
    d = tmp_path_factory.mktemp("assistant-joint")
    run = lmtune.train(config(d, tiny_model, write_jsonl(d / "train.jsonl", rows(96, 1)),
                              write_jsonl(d / "dev.jsonl", rows(30, 2))))
    write_faq(d / "faq.csv", ANSWERS)
    conf = d / "assistant.yaml"
    conf.write_text(yaml.safe_dump({"intents": str(run.run_dir), "faq": "faq.csv"}), encoding="utf-8")
    return conf


def test_a_served_joint_run_gives_intent_and_slots_in_one_reply(joint_config, monkeypatch, caplog):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    app = create_app(assistant.load_config(joint_config), ServeSettings(run_dir="", max_chars=200))
    text = "book a flight from paris to rome"
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="lmtune.assistant"):
        r = c.post("/v1/chat", json={"message": text}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["route"] == "intent" and body["intent"] == "book_flight" and not body["handoff"]
        assert {(s["type"], s["text"]) for s in body["slots"]} == {("fromloc", "paris"), ("toloc", "rome")}
        assert all(text[s["start"]:s["end"]] == s["text"] and 0 < s["score"] <= 1 for s in body["slots"])
        assert body["answer"] == "Your flight from paris to rome is booked." and body["missing_slots"] == []
        music = c.post("/v1/chat", json={"message": "play halo by adele", "session_id": body["session_id"]}, headers=AUTH).json()
        assert music["turn"] == 2 and music["route"] == "clarify" and music["intent"] == "play_music"
        assert music["missing_slots"] == ["city"] and "city" in music["answer"] and "{" not in music["answer"]
        assert not music["handoff"] and ("song", "halo") in {(s["type"], s["text"]) for s in music["slots"]}
        assert 'lmtune_assistant_routes_total{route="clarify"}' in c.get("/metrics", headers=AUTH).text
        schema = c.get("/openapi.json").json()["components"]["schemas"]
    props = schema["ChatResponse"]["properties"]
    assert props["slots"]["items"]["$ref"].endswith("/Slot") and props["missing_slots"]["items"]["type"] == "string"
    assert {"type", "text", "start", "end", "score"} <= set(schema["Slot"]["properties"])
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "route=intent" in logged and "paris" not in logged and "halo" not in logged  # never the user's words


def test_answers_are_filled_from_the_slots_or_ask_for_the_missing_ones(joint_config):
    a = assistant.Assistant(assistant.load_config(joint_config))
    assert a.intent_labels == list(INTENTS) and a.slot_types == ["artist", "city", "date", "fromloc", "song", "toloc"]

    def pred(intent: str, *slots: tuple[str, str, float]) -> dict:
        return {"intent": intent, "score": 0.9, "slots": [{"label": t, "text": w, "score": p, "start": 0, "end": len(w)}
                                                           for t, w, p in slots]}
    out = a._route(pred("get_weather", ("city", "oslo", 0.6), ("date", "monday", 0.9), ("city", "rome", 0.8)), None, None)
    assert out["route"] == "intent" and out["answer"] == "It will be sunny in rome on monday."  # the surer city
    out = a._route(pred("book_flight", ("fromloc", "paris", 0.9)), None, None)
    assert out["route"] == "clarify" and out["missing_slots"] == ["toloc"] and out["intent"] == "book_flight"
    assert out["answer"] == "I can help with that. Could you tell me the toloc?" and not out["handoff"]
    out = a._route(pred("book_flight"), None, None)
    assert out["missing_slots"] == ["fromloc", "toloc"] and out["answer"].endswith("the fromloc and toloc?")
    out = a._route(pred("play_music", ("song", "halo", 0.9), ("city", "oslo", 0.9)), None, None)
    assert out["answer"] == "Playing halo in oslo {as asked}."  # {{ }} are literal braces
    # the retrieval route fills (or asks) the same way when the intent run abstains
    sims = np.zeros(len(a.faq))
    sims[[row["intent"] for row in a.faq].index("book_flight")] = 0.9
    held = {**pred("book_flight", ("fromloc", "oslo", 0.9), ("toloc", "rome", 0.9)), "intent": "abstain", "abstained": True}
    out = a._route(held, sims, 0.5)
    assert out["route"] == "faq" and out["answer"] == "Your flight from oslo to rome is booked." and len(out["slots"]) == 2
    assert a._route({**held, "slots": []}, sims, 0.5)["route"] == "clarify"
    assert a._route(held, sims, 0.95)["route"] == "handoff" and len(a._route(held, sims, 0.95)["slots"]) == 2
    # routed right: the intent's FAQ entry, filled or asking for its slots
    assert a.correct(a._route(pred("book_flight"), None, None), "book_flight")
    assert not a.correct(a._route(pred("book_flight"), None, None), "get_weather")


def test_abstention_works_as_before_and_replies_keep_the_slots(joint_config, tmp_path):
    a = assistant.Assistant(assistant.load_config(joint_config))
    found = a.intents.tune_abstention(write_jsonl(tmp_path / "dev.jsonl", rows(30, 2)), "coverage", 0.5)
    assert found["threshold"] is not None  # the surest half answered, the rest handed off
    routed = a.route([" ".join(r["tokens"]) for r in rows(12, 8)])
    held = [r for r in routed if r["scores"]["abstained"]]
    assert held and all(r["route"] == "handoff" and r["handoff"] and r["intent"] is None and r["slots"] for r in held)
    assert all(r["route"] in ("intent", "clarify") for r in routed if not r["scores"]["abstained"])


def test_dev_messages_in_the_joint_layout_or_text_and_intent(joint_config, tmp_path):
    a = assistant.Assistant(assistant.load_config(joint_config))
    items = rows(15, 5)
    layout = write_jsonl(tmp_path / "dev.jsonl", items)
    plain = tmp_path / "dev.csv"
    with open(plain, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("text", "intent"), *[(" ".join(r["tokens"]), r["intent"]) for r in items],
                                  ("who won the match", "oos")])
    texts, gold = a._labeled(layout)
    assert texts[0] == " ".join(items[0]["tokens"]) and gold == [r["intent"] for r in items]
    assert a._labeled(str(plain)) == (texts + ["who won the match"], gold + ["oos"])
    result = a.evaluate(layout)
    assert result["n"] == 15 and result["routing_accuracy"] >= 0.8 and set(result["routes"]) <= {"intent", "clarify", "handoff"}
    plain.write_text("text,intent\nbook a flight,book_flight\nplay it,cancel_flight\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"dev.csv: line 3: intent 'cancel_flight' is not a label of the intent run"):
        a._labeled(str(plain))
    plain.write_text("text,intent\nbook a flight,\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"dev.csv: line 2: no intent"):
        a._labeled(str(plain))


def test_a_placeholder_that_is_no_slot_type_of_the_run_is_refused_with_its_line(joint_config, tmp_path):
    cfg = assistant.load_config(joint_config)
    cfg.faq = str(tmp_path / "faq.csv")
    write_faq(Path(cfg.faq), {**ANSWERS, "get_weather": "Rain in {city} and a delay on {airline}."})
    with pytest.raises(InputError, match=r"faq.csv: line 3: placeholder \{airline\} is not a slot type of the intent run"):
        assistant.Assistant(cfg)


def test_fuzzing_the_joint_assistant_api_gives_no_5xx(joint_config, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    app = create_app(assistant.load_config(joint_config), ServeSettings(run_dir="", max_chars=200))
    with TestClient(app) as c:  # slots' character offsets on texts the words split oddly
        for message in ("book a flight from  paris\u2028to rome", "🙂 play halo by adele 🙂", "\x00 weather in oslo"):
            r = c.post("/v1/chat", json={"message": message}, headers=AUTH)
            assert r.status_code in (200, 422), (message, r.status_code, r.text)
            if r.status_code == 200:
                assert all(message[s["start"]:s["end"]] == s["text"] for s in r.json()["slots"])
        calls = [code for _, code in fuzz_openapi(app, (AUTH, {}), 15, {"/v1/chat", "/healthz", "/metrics"})]
    assert len(calls) >= 20 and 200 in calls and 401 in calls
