"""Shared fixtures: a tiny random BERT (with the packaged MiniLM's tokenizer) and learnable toy data."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from lmtune.config import DEFAULT_MODEL
from lmtune.models import resolve_model

POS = ["good", "great", "excellent", "lovely", "superb", "wonderful", "happy", "fine"]
NEG = ["bad", "awful", "terrible", "poor", "horrible", "sad", "broken", "ugly"]
FILL = ["the", "movie", "was", "really", "a", "day", "food", "service", "very", "quite", "it", "felt"]


def toy_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentiment by keyword, padded with filler words of varying length: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label == "pos" else NEG))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple], header=("text", "label"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random BERT saved like a hub checkpoint (no download)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)  # the same random backbone whatever ran before
    BertForSequenceClassification(cfg).bert.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def toy_data(tmp_path) -> dict:
    return {"train": str(write_csv(tmp_path / "train.csv", toy_rows(96, 1))),
            "dev": str(write_csv(tmp_path / "dev.csv", toy_rows(32, 2))),
            "test": str(write_csv(tmp_path / "test.csv", toy_rows(32, 3)))}


@pytest.fixture
def tiny_config(tmp_path, tiny_model, toy_data) -> dict:
    return {"output_dir": str(tmp_path / "runs"), "run_name": "t",
            "data": {**toy_data, "max_length": 32},
            "model": {"name": tiny_model},
            "train": {"epochs": 10, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}}


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory, tiny_model) -> str:
    """A tiny backbone 'pretrained' on the toy task (full fine-tuning, then the head dropped): like a
    real pretrained encoder, its features carry the signal, so a method that trains few weights on
    top of it can learn within a few steps (on random frozen features none of them can)."""
    import lmtune
    d = tmp_path_factory.mktemp("pretrain")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(96, i))) for i, k in enumerate(("train", "dev", "test"), 11)}
    run = lmtune.train({"output_dir": str(d / "runs"), "data": data, "model": {"name": tiny_model},
                        "train": {"epochs": 10, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 3}})
    out = d / "backbone"
    run.model.bert.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)
