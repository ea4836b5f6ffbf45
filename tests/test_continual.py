"""Keeping models current: continual fine-tuning (head extension, replay, L2-SP, forgetting), drift
checks (file and live traffic) and masked-LM pretraining, on the tiny random BERT."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.drift import mmd_test
from lmtune.serve.app import ServeSettings, create_app
from tests.conftest import FILL, toy_rows, write_csv

TOPICS = {"bank": ["loan", "account", "card", "transfer"], "travel": ["flight", "hotel", "train", "visa"]}


def topic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """A second task with other labels (bank / travel by keyword) for the continued run."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "bank" if i % 2 == 0 else "travel"
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 10))]
        words.insert(rng.randint(0, len(words)), rng.choice(TOPICS[label]))
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("old")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3))}
    return lmtune.train({"output_dir": str(d / "runs"), "run_name": "a", "data": {**data, "max_length": 32},
                         "model": {"name": tiny_model},
                         "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}})


def _new_config(tmp_path: Path, tiny_model: str, old_run, **continual) -> dict:
    data = {k: str(write_csv(tmp_path / f"new_{k}.csv", topic_rows(n, s))) for k, n, s in (("train", 64, 5), ("dev", 24, 6),
                                                                                            ("test", 24, 7))}
    return {"output_dir": str(tmp_path / "runs"), "run_name": "b", "data": {**data, "max_length": 32},
            "model": {"name": tiny_model}, "continual": {"from_run": str(old_run.run_dir), **continual},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}}


def test_head_extension_keeps_the_old_logits_at_step_zero(tmp_path, tiny_model, old_run):
    from lmtune import continual
    from lmtune.api import load
    from lmtune.config import build_config
    from lmtune.tasks import get_task
    cfg = build_config(_new_config(tmp_path, tiny_model, old_run, missing_labels="keep"))
    task = get_task("classification")
    splits, prev = continual.prepare(cfg, task, task.read(cfg))
    assert splits.labels == ["neg", "pos", "bank", "travel"]  # old labels first, in the old head's order
    model, tok = task.build_model(cfg, splits.labels)
    continual.load_previous(prev, load)
    head = continual.warm_start(model, prev, splits.labels)
    assert head == ["classifier.weight", "classifier.bias"]
    batch = tok(["the food was good", "really awful day", "a loan for the flight"], padding=True, return_tensors="pt")
    old_model = old_run.model.cpu().eval()
    with torch.no_grad():
        old_logits = old_model(**batch).logits
        new_logits = model.eval()(**batch).logits
    assert new_logits.shape == (3, 4)
    assert torch.allclose(new_logits[:, :2], old_logits, atol=1e-6)  # unchanged for the old labels
    assert not torch.allclose(new_logits[:, 2:], torch.zeros(3, 2))  # new rows initialised, not zero


def test_missing_old_labels_are_an_error_unless_allowed(tmp_path, tiny_model, old_run, capsys):
    cfg = _new_config(tmp_path, tiny_model, old_run)
    with pytest.raises(lmtune.InputError, match="no example in the new training data.*replay"):
        lmtune.train(cfg)
    assert not (tmp_path / "runs" / "b").exists()  # nothing written
    cfg["model"]["name"] = str(old_run.run_dir / "model")  # another base model
    with pytest.raises(lmtune.InputError, match="set model.name to the same model"):
        lmtune.train(cfg)


def test_replay_reads_the_old_runs_data_and_forgetting_is_reported(tmp_path, tiny_model, old_run):
    run = lmtune.train(_new_config(tmp_path, tiny_model, old_run, replay=0.5, l2sp=0.01))
    assert run.labels == ["neg", "pos", "bank", "travel"]
    splits = json.loads((run.run_dir / "splits.json").read_text())
    assert splits["continual"]["replayed"] == 48  # half of the old run's 96 training rows, read from its train file
    c = run.metrics["continual"]
    assert c["old_test_examples"] == 32 and {"before", "after", "forgetting"} <= set(c)
    assert c["forgetting"] == pytest.approx(c["before"] - c["after"])
    assert "## Continual fine-tuning" in (run.run_dir / "report.md").read_text()
    # the continued model still knows the old task (replayed), and learned the new one
    preds = run.predict(["the food was good", "really awful day", "a loan please", "book a flight"])
    assert {p["label"] for p in preds} <= set(run.labels)
    loaded = lmtune.load(run.run_dir)
    assert loaded.labels == run.labels


def test_cli_from_flag_and_peft_continuation(tmp_path, tiny_model, old_run):
    import yaml
    cfg = _new_config(tmp_path, tiny_model, old_run, missing_labels="drop")
    cfg.pop("continual")
    cfg["peft"] = {"method": "lora"}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--from", str(old_run.run_dir), "--continual.missing_labels", "drop"]) == 0
    run = lmtune.load(tmp_path / "runs" / "b")
    assert run.labels == ["bank", "travel"]  # old labels dropped, so no old test examples remain
    assert not (run.run_dir / "model" / "adapter_config.json").exists()  # saved merged: it stands alone


def test_drift_check_finds_a_domain_change_and_not_a_resample(tmp_path, old_run, capsys):
    same = write_csv(tmp_path / "same.csv", toy_rows(60, 9))
    other = write_csv(tmp_path / "other.csv", [(f"{w} 2024 Q{i % 4} revenue rose {i}%", "pos") for i, w in
                                               enumerate(["Nokia", "Apple", "Tesla", "Siemens"] * 15)])
    assert main(["drift", str(old_run.run_dir), "--data", str(same), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["input_shift"]["p_value"] > 0.05 and not r["input_shift"]["shifted"]
    assert r["label_shift"]["p_value"] > 0.05
    assert main(["drift", str(old_run.run_dir), "--data", str(other), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["input_shift"]["p_value"] < 0.01 and r["shifted"]
    assert r["label_shift"]["shifted"]  # all pos
    assert r["vocabulary_shift"]["new"]["unseen_word_rate"] > 0.5
    assert {f["kind"] for f in r["findings"]} >= {"input_shift", "label_shift", "vocabulary_shift"}
    assert json.loads((old_run.run_dir / "drift.json").read_text())["shifted"]
    assert "## Drift" in (old_run.run_dir / "report.md").read_text()


def test_mmd_test_is_calibrated_and_has_power():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(150, 8))
    assert mmd_test(a, b, 200)["p_value"] > 0.05
    assert mmd_test(a, b + 0.5, 200)["p_value"] < 0.01


def test_serve_drift_gauges_move_when_traffic_changes_domain(old_run):
    assert (old_run.run_dir / "drift_reference.safetensors").is_file()
    client = TestClient(create_app(ServeSettings(run_dir=str(old_run.run_dir), backend="torch", no_auth=True)))

    def gauges() -> dict:
        text = client.get("/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith(("lmtune_drift", "lmtune_abstain_rate", "lmtune_mean_confidence"))}

    with client:
        for i in range(0, 60, 10):
            rows = toy_rows(10, 100 + i)
            assert client.post("/v1/predict", json={"texts": [t for t, _ in rows]}).status_code == 200
        g = gauges()
        assert g["lmtune_drift_window_texts"] == 60 and g["lmtune_drift_pvalue"] > 0.05
        assert 0.5 < g["lmtune_mean_confidence"] <= 1
        for i in range(0, 200, 20):  # the traffic moves to another domain
            texts = [f"{w} {j} quarterly EBITDA guidance" for j, w in enumerate(["Nokia", "Apple"] * 10, i)]
            assert client.post("/v1/predict", json={"texts": texts}).status_code == 200
        g = gauges()
        assert g["lmtune_drift_window_texts"] == 200 and g["lmtune_drift_pvalue"] < 0.01


def test_pretrain_masked_lm_writes_a_model_that_fine_tunes(tmp_path, tiny_model, capsys):
    texts = [t for t, _ in toy_rows(400, 21)] + ["这部电影非常好看，演员很出色"] * 20
    (tmp_path / "unlabeled.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    cfg = {"output_dir": str(tmp_path / "pre"), "run_name": "p", "model": {"name": tiny_model}, "data": {"max_length": 32},
           "pretrain": {"files": ["unlabeled.txt"]}, "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "progress": "none"}}
    import yaml
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", str(tmp_path / "pre.yaml")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((tmp_path / "pre" / "p" / "pretrain.json").read_text())
    assert result["new_head_tensors"] > 0  # the tiny backbone had no MLM head
    assert out["perplexity_after"] < out["perplexity_before"] / 5
    model_dir = result["model_dir"]
    run = lmtune.train({"output_dir": str(tmp_path / "runs"), "data": {"train": str(write_csv(tmp_path / "t.csv", toy_rows(64, 1))),
                                                                        "max_length": 32},
                        "model": {"name": model_dir}, "train": {"epochs": 1, "batch_size": 8, "progress": "none"}})
    assert run.metrics["test"]["n"] > 0
    assert main(["pretrain", str(tmp_path / "pre.yaml")]) == 2  # run_name exists: refused before training
    assert "already exists" in capsys.readouterr().err


def test_pretrain_rejects_missing_text_files(tmp_path, tiny_model, capsys):
    assert main(["pretrain", "--model.name", tiny_model, "--pretrain.files", "[nothere.txt]"]) == 2
    assert "nothere.txt: file not found" in capsys.readouterr().err
