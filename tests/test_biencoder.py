"""data.pair_encoding bi: each text of a pair encoded alone, judged by the cosine of the embeddings."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import lmtune
from lmtune.config import build_config
from lmtune.data.readers import Example
from lmtune.errors import InputError
from lmtune.tasks import get_task
from lmtune.tasks.base import encode_examples
from lmtune.tasks.biencoder import BiEncoderPairModel, CosineHead, choose_pair_encoding, is_sentence_embedding_model
from lmtune.tasks.retrieval import pool
from tests.conftest import write_csv
from tests.test_tasks_more import _pair_rows, _regression_rows

PAIRS = [("the food was good", "what a lovely day"), ("a terrible film", "the service was awful and slow"), ("same", "same")]


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory, tiny_model) -> str:
    """The tiny backbone marked as a sentence-transformers checkpoint (its modules.json)."""
    path = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_model, path)
    (path / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]')
    return str(path)


def test_each_text_is_embedded_as_if_it_were_alone_and_the_order_does_not_matter(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = BiEncoderPairModel(AutoModel.from_pretrained(tiny_model), 2, 1, "mean").eval()
    task, cfg = get_task("classification"), build_config({"data": {"text_pair_column": "b"}})
    enc = encode_examples(task, [Example(a, None, "", b) for a, b in PAIRS], tok, cfg, ["0", "1"])
    batch = {k: v for k, v in task.collate(enc.features, tok).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits

        def alone(texts):
            single = tok(texts, padding=True, return_tensors="pt")
            return pool(model.encoder(**single).last_hidden_state, single["attention_mask"], "mean")
        cos = (alone([a for a, _ in PAIRS]) * alone([b for _, b in PAIRS])).sum(-1)
    # untrained head: logit of the relevant label minus the other = 2 x the cosine (mean 0, spread 1 until trained)
    assert torch.allclose(logits[:, 1] - logits[:, 0], 2 * cos, atol=1e-4)
    assert abs(float(cos[2]) - 1.0) < 1e-4  # (A, A): the same embedding twice
    swapped = encode_examples(task, [Example(b, None, "", a) for a, b in PAIRS], tok, cfg, ["0", "1"])
    with torch.no_grad():
        back = model(**{k: v for k, v in task.collate(swapped.features, tok).items() if k != "labels"}).logits
    assert torch.allclose(logits, back, atol=1e-5)


def test_the_head_takes_its_scale_from_the_first_training_batch_only():
    head = CosineHead(2, 1).train()
    cos = torch.tensor([0.9, 0.8, 0.7, 0.6])
    z = head(cos)[:, 1] / 1.0
    assert torch.allclose(z, (cos - cos.mean()) / cos.std(), atol=1e-5) and float(head.initialized) == 1.0
    head(torch.tensor([0.1, 0.2]))  # later batches do not move it
    assert abs(float(head.cos_mean) - 0.75) < 1e-6
    fresh = CosineHead(1, None).train()
    fresh(torch.tensor([0.5]))  # one row has no spread: wait for a batch that has
    assert float(fresh.initialized) == 0.0


def test_auto_picks_bi_only_for_embedding_checkpoints_on_tasks_one_similarity_can_judge(tiny_model, embedding_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert is_sentence_embedding_model(embedding_model) and not is_sentence_embedding_model(tiny_model)
    assert choose_pair_encoding("auto", embedding_model, ["0", "1"], tok) == "bi"
    assert choose_pair_encoding("auto", embedding_model, None, tok) == "cross"  # regression: intervals that hold
    assert choose_pair_encoding("bi", embedding_model, None, tok) == "bi"
    assert choose_pair_encoding("auto", embedding_model, ["contradiction", "entailment", "neutral"], tok) == "cross"
    assert choose_pair_encoding("auto", embedding_model, ["a", "b"], tok) == "cross"  # which one means 'same'?
    assert choose_pair_encoding("auto", tiny_model, ["0", "1"], tok) == "cross"  # not an embedding model
    assert choose_pair_encoding("cross", embedding_model, ["0", "1"], tok) == "cross"
    assert choose_pair_encoding("bi", tiny_model, ["no", "yes"], tok) == "bi"
    with pytest.raises(InputError, match="needs a regression task or two labels"):
        choose_pair_encoding("bi", tiny_model, ["contradiction", "entailment", "neutral"], tok)
    no_segments = copy.copy(tok)
    no_segments.model_input_names = ["input_ids", "attention_mask"]
    assert choose_pair_encoding("auto", embedding_model, ["0", "1"], no_segments) == "cross"
    with pytest.raises(InputError, match="marks no segments"):
        choose_pair_encoding("bi", embedding_model, ["0", "1"], no_segments)


def _pair_config(tmp_path, tiny_config, model: str) -> dict:
    cfg = copy.deepcopy(tiny_config)
    rows = {k: [(a, b, "1" if y == "same" else "0") for a, b, y in _pair_rows(n, s)]
            for k, n, s in (("train", 64, 1), ("dev", 32, 2), ("test", 32, 3))}
    cfg["data"].update({k: str(write_csv(tmp_path / f"p_{k}.csv", r, ("text", "text_b", "label"))) for k, r in rows.items()},
                       text_pair_column="text_b")
    cfg["model"]["name"] = model
    cfg["train"].update(max_steps=6)
    return cfg


def test_a_bi_encoder_run_trains_saves_loads_exports_and_serves_the_same_answers(tmp_path, tiny_config, embedding_model):
    from lmtune.export.onnx import export_run
    run = lmtune.train(_pair_config(tmp_path, tiny_config, embedding_model))
    assert isinstance(run.model, BiEncoderPairModel) and float(run.model.classifier.initialized) == 1.0
    assert "Sentence pairs: **bi-encoder**" in (run.run_dir / "report.md").read_text()
    assert run.metrics["test"]["n"] == 32
    export_run(run.run_dir)
    rows = run.predict(PAIRS)
    for other in (lmtune.load(run.run_dir), lmtune.load(run.run_dir, backend="onnx")):
        again = other.predict(PAIRS)
        assert [r["label"] for r in again] == [r["label"] for r in rows]
        assert np.allclose([r["score"] for r in again], [r["score"] for r in rows], atol=1e-4)
    explained = run.explain(PAIRS[:2])[0]["explanations"][0]  # integrated gradients through both encodings
    assert explained["method"] == "ig" and len(explained["attributions"]) >= 7
    swapped = run.predict([(b, a) for a, b in PAIRS])
    assert np.allclose([r["score"] for r in swapped], [r["score"] for r in rows], atol=1e-5)
    # a cross run of the same data still reads the pair as one input
    cross = _pair_config(tmp_path, tiny_config, embedding_model)
    cross["data"]["pair_encoding"], cross["run_name"] = "cross", "cross"
    assert not isinstance(lmtune.train(cross).model, BiEncoderPairModel)


def test_bi_encoder_regression_and_lora(tmp_path, tiny_config, embedding_model):
    cfg = copy.deepcopy(tiny_config)
    data = {k: str(write_csv(tmp_path / f"r_{k}.csv", _regression_rows(n, s), ("text", "text_b", "score")))
            for k, n, s in (("train", 96, 1), ("dev", 80, 2), ("test", 40, 3))}
    cfg.update(task="regression", run_name="reg")
    cfg["model"]["name"] = embedding_model
    cfg["data"].update(data, text_pair_column="text_b", label_column="score", pair_encoding="bi")
    cfg["train"].update(max_steps=6)
    run = lmtune.train(cfg)
    assert isinstance(run.model, BiEncoderPairModel) and run.metrics["test"]["interval_level"] == 0.9
    low, high = lmtune.load(run.run_dir).predict([PAIRS[0]])[0]["interval"]
    assert low < high
    lora = _pair_config(tmp_path, tiny_config, embedding_model)
    lora["peft"], lora["run_name"] = {"method": "lora"}, "lora"
    run = lmtune.train(lora)
    assert run.predict(PAIRS)[0]["label"] == lmtune.load(run.run_dir).predict(PAIRS)[0]["label"]
    assert np.allclose([r["score"] for r in run.predict(PAIRS)], [r["score"] for r in lmtune.load(run.run_dir).predict(PAIRS)],
                       atol=1e-5)
