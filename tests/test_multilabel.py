"""Multi-label classification on a tiny random BERT: reading (separated, JSON list, 0/1 columns, empty
rows), per-label thresholds and temperatures, metrics, save/reload, serve, ONNX export, attacks, PEFT."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.errors import InputError

KEYS = {"food": ["pizza", "pasta", "soup"], "service": ["waiter", "staff", "host"], "price": ["cheap", "expensive", "cost"]}
FILL = ["the", "was", "really", "a", "day", "very", "quite", "it", "felt", "we", "had"]


def toy_rows(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        labels = [lab for lab in KEYS if rng.random() < 0.45]
        if i % 11 == 0:
            labels = []  # rows with no label are allowed
        words = [rng.choice(FILL) for _ in range(rng.randint(3, 8))]
        for lab in labels:
            words.insert(rng.randint(0, len(words)), rng.choice(KEYS[lab]))
        rows.append((" ".join(words), labels))
    return rows


def write_sep(path: Path, rows, sep: str = "|") -> str:
    import csv
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "tags"])
        w.writerows([(t, sep.join(labs)) for t, labs in rows])
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps({"text": t, "tags": labs}) + "\n" for t, labs in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def ml_config(tmp_path, tiny_model) -> dict:
    return {"task": "multilabel", "output_dir": str(tmp_path / "runs"), "run_name": "ml",
            "data": {"train": write_sep(tmp_path / "train.csv", toy_rows(160, 1)),
                     "dev": write_jsonl(tmp_path / "dev.jsonl", toy_rows(48, 2)),
                     "test": write_sep(tmp_path / "test.csv", toy_rows(48, 3)),
                     "label_column": "tags", "label_separator": "|", "max_length": 32},
            "model": {"name": tiny_model},
            "train": {"epochs": 12, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}}


def test_multilabel_trains_tunes_thresholds_and_reloads(ml_config):
    run = lmtune.train(ml_config)
    m = run.metrics["test"]
    assert {"macro_f1", "micro_f1", "samples_f1", "subset_accuracy", "hamming_loss", "loss"} <= set(m)
    assert set(m["per_label"]) == {"food", "price", "service"}
    assert m["micro_f1"] > 0.6, m  # keywords are learnable
    state = json.loads((run.run_dir / "model" / "lmtune.json").read_text())["task_state"]
    assert len(state["thresholds"]) == 3 and all(0 < t < 1 for t in state["thresholds"])
    assert len(state["temperatures"]) == 3
    texts = ["the pizza was expensive", "we had a day", "the waiter was quite cheap"]
    before = run.predict(texts)
    after = lmtune.load(run.run_dir).predict(texts)
    assert [r["labels"] for r in before] == [r["labels"] for r in after]
    for a, b in zip(before, after):
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 1e-5
    # the per-label temperatures are folded into the output layer's rows: transformers.pipeline (sigmoid for
    # a multi_label_classification config) gives lmtune's probabilities
    from transformers import pipeline
    assert state["folded_temperatures"] == (state["temperatures"] if any(t != 1 for t in state["temperatures"]) else None)
    theirs = pipeline("text-classification", model=str(run.run_dir / "model"), top_k=None)(texts)
    for rows, b in zip(theirs, after):
        assert max(abs(r["score"] - b["probabilities"][r["label"]]) for r in rows) < 1e-4
    report = (run.run_dir / "report.md").read_text()
    assert "### Labels (test)" in report and "thresholds.png" in report and (run.run_dir / "thresholds.png").is_file()
    audit = {f["check"] for f in json.loads((run.run_dir / "audit.json").read_text())}
    assert {"label_cardinality", "label_co_occurrence"} <= audit
    preds = [json.loads(x) for x in (run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert all(isinstance(p["labels"], list) and isinstance(p["gold"], list) for p in preds)


def test_threshold_is_the_best_f1_cut():
    from lmtune.tasks.multilabel import best_f1_threshold
    p = np.array([0.9, 0.8, 0.35, 0.3, 0.1])
    y = np.array([1, 1, 1, 0, 0])
    t = best_f1_threshold(p, y)
    assert 0.3 < t <= 0.35  # taking the top three gives F1 1.0
    assert best_f1_threshold(p, np.zeros(5)) == 0.5


def test_thresholds_follow_the_chosen_metric():
    from lmtune.tasks.multilabel import choose_thresholds, decision_scores, threshold_tradeoff
    rng = np.random.default_rng(0)
    gold = (rng.random((300, 6)) < 0.15).astype(int)
    # a model that ranks well but scores every label high: per-label F1 cuts keep many borderline labels
    probs = np.clip(0.45 + 0.3 * gold + 0.25 * rng.random((300, 6)), 0, 1)
    per_label, rule = choose_thresholds(probs, gold, "macro_f1")
    assert rule == "per_label" and len(set(per_label)) > 1
    for metric in ("samples_jaccard", "micro_f1", "subset_accuracy"):
        shared, rule = choose_thresholds(probs, gold, metric)
        assert rule == "shared" and len(set(shared)) == 1
        # the shared threshold is at least as good on the metric it was chosen for as the per-label F1 cuts
        at = {name: decision_scores(gold, (probs >= np.asarray(th)).astype(int))[metric]
              for name, th in (("shared", shared), ("per_label", per_label))}
        assert at["shared"] >= at["per_label"], (metric, at)
    hamming, _ = choose_thresholds(probs, gold, "hamming_loss")  # an error metric: the lowest wins
    assert decision_scores(gold, (probs >= hamming[0]).astype(int))["hamming_loss"] <= \
        decision_scores(gold, (probs >= 0.5).astype(int))["hamming_loss"]
    rows = threshold_tradeoff(probs, gold, per_label)
    assert [r["threshold"] for r in rows][-2:] == ["chosen", "gold"]
    counts = [r["labels_per_text"] for r in rows[:9]]
    assert counts == sorted(counts, reverse=True)  # a higher threshold never predicts more labels


def test_a_run_with_train_metric_samples_jaccard_shares_one_threshold(ml_config):
    ml_config["train"].update(epochs=3, metric="samples_jaccard")
    run = lmtune.train(ml_config)
    assert len(set(run.task.thresholds)) == 1 and run.task.threshold_metric == "samples_jaccard"
    assert "samples_jaccard" in run.metrics["test"]
    report = (run.run_dir / "report.md").read_text()
    assert "one shared threshold chosen on dev for samples_jaccard" in report and "Threshold trade-off (dev)" in report
    again = lmtune.load(run.run_dir)
    assert again.task.thresholds == run.task.thresholds and again.task.threshold_metric == "samples_jaccard"


def test_binary_label_columns_and_bad_rows(tmp_path, tiny_model):
    from lmtune.config import build_config
    from lmtune.tasks import get_task
    p = tmp_path / "cols.csv"
    p.write_text("text,food,price\npizza here,1,0\ncheap soup,1,1\nnothing,0,0\n", encoding="utf-8")
    cfg = build_config({"task": "multilabel", "data": {"train": str(p), "label_columns": ["food", "price"]}})
    ex = get_task("multilabel").read_file(str(p), cfg)
    assert [e.labels for e in ex] == [["food"], ["food", "price"], []]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,food,price\npizza,yes,maybe\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv: line 2: column 'price' holds 'maybe'"):
        get_task("multilabel").read_file(str(bad), cfg)
    unseen = tmp_path / "dev.jsonl"
    unseen.write_text('{"text": "x y", "tags": ["food", "mood"]}\n', encoding="utf-8")
    cfg2 = build_config({"task": "multilabel", "data": {"train": str(p), "label_column": "tags"}})
    with pytest.raises(InputError, match=r"dev\.jsonl: line 1: label 'mood' never appears in the training data"):
        get_task("multilabel").read_file(str(unseen), cfg2, ["food", "price"])


def test_multilabel_serves_exports_attacks_and_trains_lora(ml_config, monkeypatch):
    from lmtune.export.onnx import export_run
    from lmtune.serve.app import ServeSettings, create_app
    cfg = copy.deepcopy(ml_config)
    cfg["train"]["epochs"] = 3
    run = lmtune.train(cfg)
    report = export_run(run.run_dir, quantize=None, sample=16)
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-3
    onnx_rows = lmtune.load(run.run_dir, backend="onnx").predict(["the pizza was cheap"])
    assert onnx_rows[0]["labels"] == run.predict(["the pizza was cheap"])[0]["labels"]
    monkeypatch.setenv("LMTUNE_API_KEYS", "multilabel-key-0123456789")
    with TestClient(create_app(ServeSettings(run_dir=str(run.run_dir), backend="torch"))) as client:
        r = client.post("/v1/predict", json={"texts": ["the waiter was cheap"]},
                        headers={"Authorization": "Bearer multilabel-key-0123456789"})
    assert r.status_code == 200 and isinstance(r.json()["predictions"][0]["labels"], list)
    result = lmtune.load(run.run_dir).attack(methods=["typo", "search"])
    assert "changed_rate" in result["attacks"]["typo"] and "skipped" in result["attacks"]["search"]
    lora = lmtune.train({**cfg, "run_name": "ml-lora", "peft": {"method": "lora"}})
    assert lora.metrics["train"]["peft_method"] == "lora" and "macro_f1" in lora.metrics["test"]


def test_multilabel_cli_predict(ml_config, tmp_path, capsys):
    cfg = copy.deepcopy(ml_config)
    cfg["train"]["max_steps"] = 4
    run = lmtune.train(cfg)
    assert main(["predict", str(run.run_dir), "--text", "pasta and staff"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(row) >= {"labels", "probabilities"}
