"""Structured pruning before export: importance finds dead heads and neurons, slicing them out
leaves the model's outputs unchanged, distillation's loss is what it claims, and an exported pruned
run is verified, smaller and serves the same way."""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import lmtune
import lmtune.export.onnx
from lmtune.cli import main
from lmtune.export.prune import distillation_loss, importance, parse_prune, prune_structured
from lmtune.tasks import get_task
from tests.conftest import toy_rows


@pytest.fixture
def bert_and_features(tiny_model):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=AutoTokenizer.from_pretrained(tiny_model).vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=16, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # at init the logits are ~0.02: make a change in the encoder visible in them
        model.classifier.weight.mul_(100)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    task = get_task("classification")
    from lmtune.data.readers import Example
    rows = toy_rows(40, 5)
    enc = task.encode([Example(t, y, f"row {i}") for i, (t, y) in enumerate(rows)], tokenizer, 32, ["neg", "pos"])
    return model, enc.features, functools.partial(task.collate, tokenizer=tokenizer), task


def _logits(model, features, collate):
    batch = collate(features)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_importance_finds_dead_units_and_pruning_them_keeps_the_outputs(bert_and_features):
    model, features, collate, task = bert_and_features
    layers = model.bert.encoder.layer
    d = layers[0].attention.self.attention_head_size
    with torch.no_grad():  # plant units that contribute nothing: their output columns are zero
        layers[0].attention.output.dense.weight[:, 1 * d:2 * d] = 0
        layers[1].attention.output.dense.weight[:, 3 * d:4 * d] = 0
        for layer, dead in zip(layers, ([0, 5, 9, 12], [2, 3, 7, 15])):
            layer.output.dense.weight[:, dead] = 0
    before = _logits(model, features, collate)
    heads, neurons = importance(model, features, collate, task.loss)
    assert heads[0][1] == 0 and heads[1][3] == 0 and all(bool((h > 0).sum() == 3) for h in heads)
    assert all(bool((n == 0).sum() == 4) for n in neurons)
    report = prune_structured(model, heads, neurons, heads=0.25, ffn=0.25)  # 2 of 8 heads, 8 of 32 neurons
    assert report["heads_per_layer"] == [3, 3] and report["ffn_per_layer"] == [12, 12]
    assert report["encoder_params_after"] < report["encoder_params_before"]
    assert layers[0].attention.self.query.out_features == 3 * d and layers[1].output.dense.in_features == 12
    torch.testing.assert_close(_logits(model, features, collate), before, atol=1e-5, rtol=1e-4)
    # pruning a live unit does change them: the equality above is not vacuous
    prune_structured(model, [torch.rand(3), torch.rand(3)], [torch.rand(12), torch.rand(12)], heads=0.2, ffn=0.0)
    assert (_logits(model, features, collate) - before).abs().max() > 1e-2


def test_every_layer_keeps_a_head(bert_and_features):
    model, _, _, _ = bert_and_features
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])]
    report = prune_structured(model, scores, [torch.ones(16)] * 2, heads=0.5)
    assert report["heads_per_layer"] == [4, 1]


def test_distillation_loss_is_the_task_loss_when_student_and_teacher_agree(bert_and_features):
    model, features, collate, task = bert_and_features
    batch = collate(features[:8])
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    ce = task.loss(out, batch)
    same = distillation_loss(task.loss, copy.deepcopy(model), alpha=0.5)(out, batch)
    torch.testing.assert_close(same, 0.5 * ce)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.mul_(-3)
    assert distillation_loss(task.loss, other, alpha=0.5)(out, batch) > 0.5 * ce + 1e-3


@pytest.mark.parametrize("spec, message", [("heads", "ffn:AMOUNT"), ("ffn:1.5", "0 < AMOUNT < 1"), ("layers:0.5", "ffn:AMOUNT"),
                                           ("magnitude:0.3,ffn:0.5", "does not combine")])
def test_bad_prune_specs_are_refused(spec, message):
    with pytest.raises(lmtune.InputError, match=message):
        parse_prune(spec)


def test_export_with_structured_pruning_and_distillation(cls_run_dir, capsys):
    assert main(["export", cls_run_dir, "--prune", "ffn:0.5,heads:0.5", "--quantize", "int8", "--sample", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((lmtune.load(cls_run_dir).run_dir / "export" / "export.json").read_text())
    p = report["prune"]
    # tiny_model: 2 layers of 2 heads and 64 FFN neurons; a layer whose heads all rank last keeps one
    assert sum(p["ffn_per_layer"]) == 64 and sum(p["heads_per_layer"]) in (2, 3) and min(p["heads_per_layer"]) == 1
    assert p["recovery"]["steps"] > 0 and p["refitted"] == ["calibration"]
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-4  # the ONNX graph is the pruned model's
    assert report["onnx_fp32"]["dev"]["accuracy"] == pytest.approx(report["pytorch_pruned"]["dev"]["accuracy"])
    meta = json.loads((lmtune.load(cls_run_dir).run_dir / "export" / "lmtune.json").read_text())
    # whatever temperature the refit chose (1.0 where it would not lower the held-out dev ECE) is folded into
    # the pruned graph, so its logits are the probabilities lmtune reports
    assert meta["task_state"]["folded_temperature"] == meta["task_state"]["temperature"]
    for backend in ("onnx", "onnx-int8"):
        for r in lmtune.load(cls_run_dir, backend=backend).predict(["the food was great", "awful service"]):
            assert r["label"] in ("neg", "pos") and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)


@pytest.fixture
def cls_run_dir(tmp_path, tiny_config) -> str:
    return str(lmtune.train({**tiny_config, "train": {**tiny_config["train"], "epochs": 3}}).run_dir)


def test_ner_export_with_structured_pruning(tmp_path, tiny_model):
    sents = "\n\n".join(["Peter B-PER\nlives O\nin O\nParis B-LOC", "Anna B-PER\nvisits O\nRome B-LOC"] * 10)
    (tmp_path / "train.conll").write_text(sents + "\n")
    run = lmtune.train({"task": "ner", "output_dir": str(tmp_path), "run_name": "ner",
                        "data": {"train": str(tmp_path / "train.conll"), "dev": str(tmp_path / "train.conll"), "max_length": 32},
                        "model": {"name": tiny_model},
                        "train": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}})
    report = lmtune.export.onnx.export_run(run.run_dir, prune="ffn:0.5", recover_epochs=1, sample=8)
    assert sum(report["prune"]["ffn_per_layer"]) == 64 and report["prune"]["recovery"]["steps"] == 3
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-4 and "f1" in report["pytorch_pruned"]["dev"]
    (pred,) = lmtune.load(run.run_dir, backend="onnx").predict(["Peter lives in Rome"])
    assert all(e["label"] in ("PER", "LOC") for e in pred["entities"])
