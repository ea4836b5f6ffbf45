"""Task multitask (issue 49, item 1): several tasks, each from its own files, over one shared encoder; batches shared
out by a sampling rule; one model folder whose predict, serve and ONNX export give every task's outputs in one pass."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.export.onnx import export_run
from lmtune.serve.app import ServeSettings, create_app
from lmtune.training.batching import mixed_batches, task_shares
from tests.fuzz import fuzz_openapi
from tests.test_joint import INTENTS, utterance

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---- the sampling rule ------------------------------------------------------------------------------
def test_an_epoch_shares_its_batches_out_by_the_rule_one_task_per_batch():
    sizes = [800, 100]
    groups = [list(range(800)), list(range(800, 900))]
    lengths = [5 + i % 7 for i in range(900)]
    for rule, expect in (("proportional", [80, 10]), ("round_robin", [45, 45]),
                         ("temperature", [66, 24])):  # sqrt(800) : sqrt(100) = 0.739 : 0.261 of 90 batches
        batches = mixed_batches(groups, lengths, 10, seed=3, epoch=0, sampling=rule, temperature=2.0)
        assert len(batches) == 90  # the single-task epoch: ceil(900 / 10)
        owner = [0 if b[0] < 800 else 1 for b in batches]
        assert all(all((i < 800) == (o == 0) for i in b) for b, o in zip(batches, owner))  # one task per batch
        assert [owner.count(0), owner.count(1)] == expect, rule
        assert batches == mixed_batches(groups, lengths, 10, 3, 0, rule, 2.0)  # a pure function of (seed, epoch)
        assert batches != mixed_batches(groups, lengths, 10, 3, 1, rule, 2.0)
    rr = mixed_batches(groups, lengths, 10, 3, 0, "round_robin")
    assert [0 if b[0] < 800 else 1 for b in rr][:6] == [0, 1, 0, 1, 0, 1]  # tasks in turn
    small = [i for b in rr if b[0] >= 800 for i in b]
    assert set(small) == set(range(800, 900)) and len(small) > 100  # upsampled: every example, some twice
    np.testing.assert_allclose(task_shares(sizes, "temperature", 1.0), task_shares(sizes, "proportional"))


# ---- a run ------------------------------------------------------------------------------------------
def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def intent_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(utterance(INTENTS[i % 3], rng)[0]), "label": INTENTS[i % 3]} for i in range(n)]


def slot_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens, tags = utterance(INTENTS[i % 3], rng)
        out.append({"tokens": tokens, "tags": tags})
    return out


def sub_configs(d: Path) -> list[str]:
    """Two ordinary single-task configs, each with its own files (the slots file is larger: the tasks differ in size)."""
    intent = {"task": "classification", "data": {"train": _write(d / "intent_train.jsonl", intent_rows(60, 1)),
                                                 "dev": _write(d / "intent_dev.jsonl", intent_rows(24, 2)),
                                                 "test": _write(d / "intent_test.jsonl", intent_rows(24, 3))}}
    slots = {"task": "ner", "data": {"train": _write(d / "slots_train.jsonl", slot_rows(120, 4)),
                                     "dev": _write(d / "slots_dev.jsonl", slot_rows(24, 5)),
                                     "test": _write(d / "slots_test.jsonl", slot_rows(24, 6))}}
    paths = []
    for name, cfg in (("intent", intent), ("slots", slots)):
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        paths.append(str(d / f"{name}.yaml"))
    return paths


def config(d: Path, model: str, **multitask) -> dict:
    return {"task": "multitask", "output_dir": str(d / "runs"), "run_name": "mt", "model": {"name": model},
            "data": {"max_length": 32}, "multitask": {"tasks": sub_configs(d), **multitask},
            "train": {"epochs": 8, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "progress": "none", "seed": 1}}


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, tiny_model) -> lmtune.Run:
    d = tmp_path_factory.mktemp("multitask")
    return lmtune.train(config(d, tiny_model))


def test_one_encoder_learns_two_tasks_from_their_own_files_and_reports_each(mt_run):
    m = mt_run.metrics["test"]
    assert set(m["tasks"]) == {"intent", "slots"}
    assert m["tasks"]["intent"]["accuracy"] >= 0.9 and m["tasks"]["slots"]["f1"] >= 0.8, m  # both heads learned
    assert m["task_mean"] == pytest.approx((m["tasks"]["intent"]["accuracy"] + m["tasks"]["slots"]["f1"]) / 2)
    assert m["intent_accuracy"] == m["tasks"]["intent"]["accuracy"] and "slots_f1" in m
    assert mt_run.metrics["metric"] == "task_mean"
    report = (mt_run.run_dir / "report.md").read_text()
    for section in ("## Tasks", "## intent (classification)", "## slots (ner)", "temperature (T 2)"):
        assert section in report, section
    for png in ("intent_reliability.png", "slots_reliability.png"):  # each task's plots under its own name
        assert f"]({png})" in report and (mt_run.run_dir / png).is_file(), png
    rows = [json.loads(line) for line in (mt_run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and [r["task"] for r in rows].count("intent") == 24
    assert all(set(r) == {"task", r["task"]} for r in rows)
    assert {"label", "gold"} <= set(rows[0]["intent"]) and {"entities", "tags"} <= set(rows[-1]["slots"])
    splits = json.loads((mt_run.run_dir / "splits.json").read_text())
    assert splits["method"] == "multitask" and set(splits["tasks"]) == {"intent", "slots"}


def test_a_text_gets_every_task_from_one_encoder_pass_and_the_saved_model_agrees(mt_run, capsys):
    text = "book a flight from paris to rome"
    calls = []
    hook = mt_run.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        row = mt_run.predict([text])[0]
    finally:
        hook.remove()
    assert len(calls) == 1  # one encoder pass for both heads
    assert row["text"] == text and row["intent"]["label"] == "book_flight"
    assert {(s["text"], s["label"]) for s in row["slots"]["entities"]} == {("paris", "fromloc"), ("rome", "toloc")}
    assert abs(sum(row["intent"]["probabilities"].values()) - 1) < 1e-3
    loaded = lmtune.load(mt_run.run_dir)
    again = loaded.predict([text])[0]
    assert again["intent"]["label"] == row["intent"]["label"] and again["slots"]["tags"] == row["slots"]["tags"]
    assert again["intent"]["score"] == pytest.approx(row["intent"]["score"], abs=1e-5)  # calibrated the same way
    assert main(["predict", str(mt_run.run_dir), "--text", "play halo by adele"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["intent"]["label"] == "play_music" and {e["label"] for e in out["slots"]["entities"]} == {"song", "artist"}


def test_evaluate_reads_one_sub_tasks_file_by_name(mt_run, tmp_path, capsys):
    f = _write(tmp_path / "more.jsonl", intent_rows(9, 8))
    m = mt_run.evaluate(f"intent={f}")
    assert m["tasks"]["intent"]["accuracy"] >= 0.8 and "slots" not in m["tasks"]
    assert main(["evaluate", str(mt_run.run_dir), "--data", f]) == 2
    assert "give NAME=FILE" in capsys.readouterr().err


def test_one_request_returns_every_task_and_the_schema_says_so(mt_run, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)

    def app():
        return create_app(ServeSettings(run_dir=str(mt_run.run_dir), backend="torch", max_texts=8, max_chars=200))
    with TestClient(app()) as c:
        assert c.post("/v1/predict", json={"texts": ["weather in oslo on friday"]}).status_code == 401
        r = c.post("/v1/predict", json={"texts": ["weather in oslo on friday"]}, headers=AUTH)
        schema = c.get("/openapi.json").json()
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert p["intent"]["label"] == "get_weather" and p["slots"]["tags"] == ["O", "O", "B-city", "O", "B-date"]
    assert {"intent", "slots"} <= set(schema["components"]["schemas"]["Prediction"]["properties"])
    calls = [code for _, code in fuzz_openapi(app(), (AUTH, {}), 10, {"/v1/predict"})]
    assert 200 in calls and 401 in calls


def test_the_onnx_export_has_every_head_and_matches_pytorch(mt_run):
    report = export_run(mt_run.run_dir, sample=16)
    r = report["onnx_fp32"]
    assert r["max_abs_logit_diff"] < 1e-4, r
    assert r["dev"] == pytest.approx(report["pytorch"]["dev"], abs=1e-6)
    import onnx
    graph = onnx.load(str(mt_run.run_dir / "export" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["intent_logits", "slots_logits"]
    onnx_run = lmtune.load(mt_run.run_dir, backend="onnx")
    text = ["book a flight from oslo to vienna"]
    assert onnx_run.predict(text)[0]["slots"]["tags"] == mt_run.predict(text)[0]["slots"]["tags"]
    assert onnx_run.predict(text)[0]["intent"]["label"] == mt_run.predict(text)[0]["intent"]["label"]


def test_bad_multitask_configs_are_refused_before_anything_is_written(tmp_path, tiny_model, capsys):
    cfg = config(tmp_path, tiny_model)
    one = {**cfg, "multitask": {"tasks": cfg["multitask"]["tasks"][:1]}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    assert main(["train", str(tmp_path / "one.yaml")]) == 2
    assert "multitask.tasks: give at least two sub-task config files" in capsys.readouterr().err
    gen = tmp_path / "gen.yaml"
    gen.write_text(yaml.safe_dump({"task": "generation", "data": {"train": "x.jsonl"}}))
    bad = {**cfg, "multitask": {"tasks": [cfg["multitask"]["tasks"][0], str(gen)]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert f"error: {gen}: task generation cannot share an encoder" in capsys.readouterr().err
    weights = {**cfg, "multitask": {**cfg["multitask"], "weights": [1.0]}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(weights))
    assert main(["train", str(tmp_path / "w.yaml")]) == 2
    assert "multitask.weights: 1 values for 2 tasks" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_dashboard_lists_and_shows_the_run(mt_run):
    from lmtune.ui.app import UiSettings, create_ui
    root = mt_run.run_dir.parent
    c = TestClient(create_ui(UiSettings(runs_dir=str(root), workdir=str(root.parent))), base_url="http://127.0.0.1:7860")
    home = c.get("/")
    assert home.status_code == 200 and "mt" in home.text
    page = c.get("/run/mt")
    assert page.status_code == 200, page.text[-2000:]
    assert "task_mean" in page.text and "multitask" in page.text


def test_the_audit_checks_each_tasks_data_on_its_own(tmp_path, tiny_model, capsys):
    cfg = config(tmp_path, tiny_model)
    train = tmp_path / "intent_train.jsonl"  # one intent row repeated in the intent task's test file: a leak there
    test = tmp_path / "intent_test.jsonl"
    test.write_text(test.read_text() + train.read_text().splitlines()[0] + "\n")
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["audit", str(tmp_path / "mt.yaml")]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert findings and all(f["detail"].startswith(("intent: ", "slots: ")) for f in findings)  # each names its task
    leaks = {f["detail"].split(":")[0]: f["detail"] for f in findings if f["check"] == "leakage_test"}
    assert " of 25 test example(s)" in leaks["intent"], leaks  # counted over the intent task's own test file (24 + 1)
    assert "slots" not in leaks or " of 24 test example(s)" in leaks["slots"], leaks
