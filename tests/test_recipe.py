"""The recipe's stages one at a time, on the tiny model: each fills its own part of the context."""
from __future__ import annotations

import copy

import pytest
import torch

from lmtune.api import as_config
from lmtune.recipe import STAGES, new_context
from lmtune.recipe.stages import adapt, build, evaluate, prepare_data
from lmtune.tasks import get_task


@pytest.fixture
def ctx(tiny_config, tmp_path):
    cfg = as_config(tiny_config)
    task = get_task(cfg.task)
    return new_context(cfg, task, task.read(cfg), tmp_path / "run")


def test_build_makes_the_seeded_backbone_and_head_with_frozen_parts(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["freeze_embeddings"] = True
    c = as_config(cfg)
    task = get_task(c.task)
    first, second = (new_context(c, task, task.read(c), tmp_path / name) for name in ("a", "b"))
    build(first)
    build(second)
    assert first.built.model.config.num_labels == 2 and first.built.tokenizer is not None
    emb = first.built.model.get_input_embeddings().weight
    assert not emb.requires_grad
    head = dict(first.built.model.named_parameters())["classifier.weight"]
    assert head.requires_grad
    assert torch.equal(head, dict(second.built.model.named_parameters())["classifier.weight"])  # seeded: same head
    assert first.data is None and first.built.lrs is None  # build leaves data and learning rates to later stages


def test_prepare_data_encodes_every_split_and_counts_resampled_and_augmented_rows(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["resample"] = "oversample"
    cfg["augment"] = {"methods": ["typo"], "multiplier": 1}
    c = as_config(cfg)
    task = get_task(c.task)
    ctx = new_context(c, task, task.read(c), tmp_path / "run")
    build(ctx)
    prepare_data(ctx)
    data = ctx.data
    assert set(data.encoded) == {"train", "dev", "test"}
    assert len(data.encoded["dev"].examples) == len(ctx.splits.dev) == 32
    assert data.augmented is not None and len(data.augmented.examples) > 0
    assert len(data.resampled) >= len(ctx.splits.train)
    assert data.train_size == len(data.resampled) + len(data.augmented.examples)
    assert len(data.train_features) == data.train_size  # short texts: one feature per example
    batch = data.collate(data.train_features[:4])
    assert batch["input_ids"].shape[0] == 4


def test_adapt_needs_prepared_data_and_sets_the_learning_rates(ctx):
    build(ctx)
    prepare_data(ctx)
    adapt(ctx)
    assert ctx.built.lrs.lr == pytest.approx(3e-3) and ctx.built.lrs.metric == "accuracy"
    assert 0 < ctx.built.trainable <= ctx.built.total


def test_evaluate_alone_scores_dev_and_test_of_the_model_as_built(ctx):
    build(ctx)
    prepare_data(ctx)
    evaluate(ctx)
    out = ctx.outcome
    assert set(out.split_metrics) == {"dev", "test"}
    assert 0.0 <= out.split_metrics["dev"]["accuracy"] <= 1.0
    assert len(out.preds["test"]) == 32 and {"label", "probabilities", "gold"} <= set(out.preds["test"][0])
    assert not (ctx.rd.root / "metrics.json").exists()  # evaluating writes nothing: save and write_results do


def test_the_recipe_reads_as_named_stages_with_optional_ones_declaring_when_they_apply(ctx):
    names = [s.name for s in STAGES]
    core = ["record", "build", "prepare_data", "adapt", "audit", "fit", "restore", "evaluate", "save", "write_results"]
    assert [n for n in names if n in core] == core
    build(ctx)
    prepare_data(ctx)
    evaluate(ctx)
    applies = {s.name: s.applies(ctx) for s in STAGES}
    # the tiny classification run: no label noise search, no continued run, no generation, no index, no attack
    assert not any(applies[n] for n in ("label_noise", "warm_start", "forgetting", "decoding_search", "index", "slices", "attack"))
    assert applies["drift_reference"] and applies["save"]
