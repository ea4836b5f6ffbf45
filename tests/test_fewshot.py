"""Few-shot classification (lmtune.fewshot): auto's rule, SetFit's pairs, the contrastive stage, label prototypes,
and a run on 8 examples per class with the packaged MiniLM that reports its method and loads as usual."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

import lmtune
from lmtune.api import as_config
from lmtune.config import DEFAULT_MODEL
from lmtune.data.readers import Example
from lmtune.errors import InputError
from lmtune.analyses.fewshot import section
from lmtune.fewshot import (EmbeddingClassifier, decide, fit_head, is_word_label, prototype_prior, prototype_texts,
                            sample_pairs)
from lmtune.models import resolve_model
from tests.conftest import write_csv

TOPICS = {"sport": ["football", "tennis", "match", "goal", "team", "coach", "league", "stadium"],
          "cooking": ["recipe", "oven", "flour", "soup", "garlic", "bake", "kitchen", "sauce"]}
FILL = ["the", "a", "we", "saw", "about", "today", "this", "new", "really", "talked", "of", "again"]


def topic_rows(per_class: int, seed: int) -> list[tuple[str, str]]:
    """Two topics told apart by their words (which a sentence embedding already separates a little)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(per_class):
        for label, words in TOPICS.items():
            text = [rng.choice(FILL) for _ in range(rng.randint(2, 6))] + rng.sample(words, 2)
            rng.shuffle(text)
            rows.append((" ".join(text), label))
    return rows


def _splits(per_class: int) -> SimpleNamespace:
    return SimpleNamespace(train=[Example(t, lab, "t.csv:1") for t, lab in topic_rows(per_class, 0)])


def test_auto_picks_setfit_on_a_small_train_split_and_not_on_a_large_one(tiny_model):
    cfg = as_config({"model": {"name": DEFAULT_MODEL}})
    small, large = decide(cfg, _splits(8)), decide(cfg, _splits(65))
    assert small["method"] == "setfit" and small["median_per_class"] == 8 and "<= 64" in small["why"]
    assert large["method"] == "none" and "65 labeled examples (> 64)" in large["why"]
    assert "median class" in small["rule"]
    assert "Method: **none** (the median class has 65 labeled examples (> 64))" in section(large)  # report.md says why
    # a checkpoint that is no sentence-embedding model (the tiny random BERT): plain fine-tuning, and why
    tiny = decide(as_config({"model": {"name": tiny_model}}), _splits(8))
    assert tiny["method"] == "none" and "not a sentence-embedding checkpoint" in tiny["why"]
    assert decide(as_config({"model": {"name": DEFAULT_MODEL}, "peft": {"method": "lora"}}), _splits(8))["method"] == "none"
    assert decide(as_config({"model": {"name": DEFAULT_MODEL}, "fewshot": {"max_per_class": 4}}), _splits(8))["method"] == "none"


def test_auto_does_not_take_a_large_set_with_a_long_tail_of_rare_classes_for_few_shot():
    """ATIS-like: one big class and many rare ones. The median class is small, the set is not: plain fine-tuning."""
    train = [Example(f"flight {i}", "flight", "t.csv:1") for i in range(1000)]
    train += [Example(f"ask {c} {i}", f"rare{c}", "t.csv:1") for c in range(4) for i in range(10)]
    d = decide(as_config({"model": {"name": DEFAULT_MODEL}}), SimpleNamespace(train=train))
    assert d["median_per_class"] == 10 and d["mean_per_class"] == 208
    assert d["method"] == "none" and "208 labeled examples on average (> 64)" in d["why"]
    assert "mean class" in d["rule"]


def test_setfit_pairs_are_balanced_and_positive_only_within_a_class():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    pairs = sample_pairs(labels, iterations=5, seed=1)
    assert len(pairs) == 2 * 5 * len(labels)
    assert sum(t for *_, t in pairs) == len(pairs) / 2
    assert all((labels[i] == labels[j]) == (t == 1.0) and i != j for i, j, t in pairs)
    assert pairs == sample_pairs(labels, iterations=5, seed=1) and len(sample_pairs(labels, 5, 1, max_pairs=7)) == 7


def test_word_labels_seed_prototypes_and_ids_do_not():
    f = as_config({}).fewshot
    assert [is_word_label(x) for x in ("0", "LABEL_3", "class-12", "card_arrival", "positive")] == [False] * 3 + [True] * 2
    assert prototype_texts(["card_arrival", "3"], f) == ["card arrival", None]
    f.label_descriptions = {"3": "a lost or stolen card"}
    assert prototype_texts(["card_arrival", "3"], f) == ["card arrival", "a lost or stolen card"]
    f.label_descriptions = {"nope": "x"}
    with pytest.raises(InputError, match="fewshot.label_descriptions: 'nope' is not a label"):
        prototype_texts(["a", "b"], f)


def test_label_prototypes_start_the_head_and_pull_it_towards_them():
    torch.manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    y = torch.tensor([0, 1, 2] * 4)
    emb = torch.nn.functional.normalize(protos[y] + 0.3 * torch.randn(12, 8), dim=-1)
    prior, scale = prototype_prior(protos, torch.tensor([1.0, 1.0, 0.0]), emb, y)
    assert scale > 1 and torch.allclose(prior[:2], scale * protos[:2]) and prior[2].abs().sum() == 0  # no prototype: zero
    strong, _ = fit_head(emb, y, 3, prior, c=1e-4)  # a strong penalty keeps the head at its prototype start
    assert torch.allclose(strong, prior.float(), atol=1e-2)
    free, _ = fit_head(emb, y, 3, None, c=1e-4)  # without prototypes the same penalty holds it at zero
    assert free.abs().max() < 1e-2


def test_explicit_setfit_refuses_pairs_and_tasks_without_it(tmp_path):
    with pytest.raises(InputError, match="sentence pairs"):
        as_config({"fewshot": {"method": "setfit"}, "data": {"text_pair_column": "b"}})
    rows = [("a b", "x,y"), ("c d", "y"), ("e f", "x"), ("g h", "y")] * 4
    cfg = {"task": "multilabel", "output_dir": str(tmp_path / "runs"), "fewshot": {"method": "setfit"},
           "data": {"train": str(write_csv(tmp_path / "t.csv", rows)), "dev": str(write_csv(tmp_path / "d.csv", rows))},
           "train": {"epochs": 1, "progress": "none"}}
    with pytest.raises(InputError, match="fewshot.method setfit: the multilabel task does not support fewshot"):
        lmtune.train(cfg)


@pytest.mark.slow
def test_a_run_on_eight_per_class_trains_setfit_reports_it_and_loads_as_usual(tmp_path):
    data = {name: str(write_csv(tmp_path / f"{name}.csv", topic_rows(n, seed)))
            for name, n, seed in (("train", 8, 1), ("dev", 12, 2), ("test", 12, 3))}
    run = lmtune.train({"output_dir": str(tmp_path / "runs"), "run_name": "fs", "model": {"name": resolve_model(DEFAULT_MODEL)},
                        "data": {**data, "max_length": 32},
                        "fewshot": {"iterations": 5, "body_lr": 5e-5, "label_descriptions": {"cooking": "food, recipes and the kitchen"}},
                        "train": {"epochs": 2, "batch_size": 16, "progress": "none", "seed": 1}})
    results = json.loads((run.run_dir / "results.json").read_text())
    fs = results["fewshot"]
    assert fs["method"] == "setfit" and fs["setting"] == "auto" and fs["median_per_class"] == 8
    assert fs["pairs"] == 2 * 5 * 16 and fs["contrastive_seconds"] > 0
    # the contrastive stage pulls each class together and pushes the classes apart
    before, after = fs["cosine_before"], fs["cosine_after"]
    assert after["same_class"] > before["same_class"] + 0.1 and after["different_class"] < before["different_class"]
    assert after["same_class"] - after["different_class"] > before["same_class"] - before["different_class"] + 0.2
    assert fs["prototypes"]["labels"] == ["cooking", "sport"] and fs["prototypes"]["from_descriptions"] == ["cooking"]
    report = (run.run_dir / "report.md").read_text()
    assert "## Few-shot" in report and "Method: **setfit**" in report and "median class" in report
    assert run.metrics["test"]["accuracy"] >= 0.9
    loaded = lmtune.load(run.run_dir)
    assert isinstance(loaded.model, EmbeddingClassifier)
    rows = loaded.predict(["we talked about the football match and the coach", "bake the soup with garlic in the oven"])
    assert [r["label"] for r in rows] == ["sport", "cooking"]
    assert (run.run_dir / "drift_reference.safetensors").is_file()  # the encoder's token states, as a [CLS] model's
    assert loaded.evaluate(data["test"])["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])
    from lmtune.export.onnx import export_run  # the ONNX graph of the embedding classifier gives the same logits
    report = export_run(run.run_dir, sample=8)
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-3
    assert lmtune.load(run.run_dir, backend="onnx").predict(rows[0]["text"])[0]["label"] == "sport"
