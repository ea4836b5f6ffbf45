"""Parameter-efficient methods on a tiny random BERT: train, save, reload, predict, merge."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.cli import main

METHODS = ["lora", "adalora", "ia3", "prefix", "prompt", "adapter"]


def _cfg(tiny_config, method: str, **train) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["run_name"] = method
    cfg["peft"] = {"method": method, "delta_t": 2, "init_r": 6, "target_r": 2}
    cfg["train"].update({"epochs": 4, "lr": 1e-2, "head_lr": 1e-2, **train})
    return cfg


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_reloads_and_predicts_identically(tiny_config, pretrained_tiny, method):
    cfg = _cfg(tiny_config, method)
    cfg["model"]["name"] = pretrained_tiny
    run = lmtune.train(cfg)
    hist = [json.loads(x) for x in (run.run_dir / "history.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in hist if "train_loss" in h]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    tr = run.metrics["train"]
    assert tr["peft_method"] == method and 0 < tr["trainable_pct"] < 50
    assert tr["artifact_mb"] > 0 and tr["peak_mem_mb"] > 0 and tr["seconds_per_epoch"] > 0
    model_dir = run.run_dir / "model"
    assert not (model_dir / "model.safetensors").exists()  # adapter-only artifact
    weights = load_file(str(next(p for p in model_dir.glob("*.safetensors"))))
    assert any("classifier" in k for k in weights), list(weights)[:5]  # the head travels with the adapter
    texts = ["the food was great", "awful service really", "it felt fine"]
    before = run.predict(texts)
    after = lmtune.load(run.run_dir).predict(texts)
    for a, b in zip(before, after):
        assert a["label"] == b["label"]
        for lab in a["probabilities"]:
            assert abs(a["probabilities"][lab] - b["probabilities"][lab]) < 1e-5


def test_adalora_ranks_change_during_training(tiny_config):
    run = lmtune.train(_cfg(tiny_config, "adalora", epochs=6))
    ranks = run.metrics["train"]["rank_pattern"]
    assert ranks and all(0 <= r <= 6 for r in ranks.values())
    assert any(r < 6 for r in ranks.values())  # the allocator pruned from init_r
    assert "AdaLoRA final ranks" in (run.run_dir / "report.md").read_text()


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_merge_gives_a_plain_model_with_equal_logits(tiny_config, tmp_path, method, capsys):
    run = lmtune.train(_cfg(tiny_config, method, epochs=2))
    out = tmp_path / f"merged-{method}"
    assert main(["merge", str(run.run_dir), str(out)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["the food was great", "awful service really"], padding=True, return_tensors="pt")
    loaded = lmtune.load(run.run_dir).model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, loaded(**enc).logits, atol=1e-4)
    assert main(["merge", str(run.run_dir), str(out)]) == 2  # never overwrites


def test_prompt_methods_refuse_to_merge(tiny_config, tmp_path, capsys):
    run = lmtune.train(_cfg(tiny_config, "prefix", epochs=1))
    assert main(["merge", str(run.run_dir), str(tmp_path / "m")]) == 2
    assert "cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_peft_default_learning_rates_are_per_method(tiny_config):
    from lmtune.training.optim import resolve_learning_rates
    from lmtune.config import TrainConfig
    model = AutoModelForSequenceClassification.from_pretrained(tiny_config["model"]["name"], num_labels=2)
    assert resolve_learning_rates(TrainConfig(), model, "lora").lr == 1e-3
    assert resolve_learning_rates(TrainConfig(), model, "prompt").lr == 3e-2
    assert resolve_learning_rates(TrainConfig(), model).lr == 1e-4  # full fine-tuning, width 32


def test_compare_full_reports_both_side_by_side(tiny_config):
    cfg = _cfg(tiny_config, "lora", epochs=1)
    cfg["peft"]["compare_full"] = True
    run = lmtune.train(cfg)
    table = run.metrics["comparison"]
    assert set(table) == {"lora", "full"}
    assert table["lora"]["trainable_pct"] < table["full"]["trainable_pct"] == pytest.approx(100.0)
    assert table["lora"]["artifact_mb"] < table["full"]["artifact_mb"]
    assert json.loads((run.run_dir / "metrics.json").read_text())["comparison"] == table
    assert "PEFT vs full fine-tuning" in (run.run_dir / "report.md").read_text()
