"""Relation extraction: entity markers, direction, the official score, save/reload."""
from __future__ import annotations

import copy
import json
import random

import pytest
from transformers import AutoTokenizer

import lmtune
from lmtune.config import build_config
from lmtune.errors import InputError
from lmtune.tasks import get_task
from lmtune.tasks.relation import MARKERS, RelationExample, official_scores
from tests.conftest import FILL

THINGS = ["box", "lamp", "river", "wheel", "engine", "letter", "seed", "cloud"]


def _rows(n: int, seed: int) -> list[dict]:
    """The relation is told by the word between the entities; its direction by which entity comes first."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(THINGS, 2)
        kind = i % 3
        middle = {0: "contains", 1: "causes", 2: rng.choice(FILL)}[kind]
        rel = {0: "Content-Container", 1: "Cause-Effect", 2: "Other"}[kind]
        flipped = rng.random() < 0.5 and kind != 2
        first, second = ("e2", "e1") if flipped else ("e1", "e2")
        text = f"the <{first}>{a}</{first}> {middle} the <{second}>{b}</{second}> {rng.choice(FILL)}"
        label = rel if kind == 2 else f"{rel}({'e2,e1' if flipped else 'e1,e2'})"
        out.append({"text": text, "label": label})
    return out


@pytest.fixture
def relation_config(tmp_path, tiny_config):
    cfg = copy.deepcopy(tiny_config)
    for name, n, seed in (("train", 240, 1), ("dev", 60, 2), ("test", 60, 3)):
        path = tmp_path / f"re_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
        cfg["data"][name] = str(path)
    cfg.update(task="relation", run_name="re")
    cfg["train"].update(epochs=8)
    return cfg


def test_relation_trains_keeps_direction_and_markers_survive_reload(relation_config):
    run = lmtune.train(relation_config)
    test = run.metrics["test"]
    assert test["official_macro_f1"] > 0.8, test
    assert set(test["per_relation"]) == {"Cause-Effect", "Content-Container"}  # Other left out
    loaded = lmtune.load(run.run_dir)
    tok = loaded.tokenizer
    assert all(len(tok.tokenize(m)) == 1 for m in MARKERS)  # the markers are single tokens after reload
    assert loaded.model.get_input_embeddings().num_embeddings == len(tok)
    rows = loaded.predict(["the <e1>box</e1> contains the <e2>seed</e2> felt", "the <e2>box</e2> contains the <e1>seed</e1> felt"])
    assert [r["label"] for r in rows] == ["Content-Container(e1,e2)", "Content-Container(e2,e1)"]
    assert rows == run.predict(["the <e1>box</e1> contains the <e2>seed</e2> felt",
                                "the <e2>box</e2> contains the <e1>seed</e1> felt"])
    report = (run.run_dir / "report.md").read_text()
    assert "official macro-F1" in report and "'Other' left out" in report
    with pytest.raises(InputError, match="needs one <e1>"):
        loaded.predict(["no entities here"])


def test_official_score_by_hand():
    gold = ["A(e1,e2)", "A(e1,e2)", "A(e2,e1)", "B(e1,e2)", "Other", "Other"]
    pred = ["A(e1,e2)", "A(e2,e1)", "A(e2,e1)", "Other", "B(e1,e2)", "Other"]
    s = official_scores(gold, pred, "Other")
    # A: 2 right of 3 predicted A (one with the wrong direction) and 3 gold A -> P = R = 2/3
    assert s["per_relation"]["A"]["precision"] == pytest.approx(2 / 3) and s["per_relation"]["A"]["recall"] == pytest.approx(2 / 3)
    # B: 0 right -> F1 0; macro over A and B only
    assert s["official_macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_head_and_tail_columns_spans_and_errors(tmp_path, tiny_config):
    task = get_task("relation")
    cfg = build_config({"task": "relation"})
    path = tmp_path / "finre.jsonl"
    path.write_text(json.dumps({"text": "东方航空将与上航合并", "head": "东方航空", "tail": "上航", "label": "合并"}) + "\n"
                    + json.dumps({"text": "A bought B.", "head": [0, 1], "tail": [9, 10], "label": "buy"}) + "\n"
                    + json.dumps({"text": "A bought B.", "head": "C", "tail": "B", "label": "buy"}) + "\n")
    with pytest.raises(InputError, match=r"finre.jsonl: line 3: entity 'C' \('head'\) does not occur in the text"):
        task.read_file(str(path), cfg)
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    zh, en = task.read_file(str(path), cfg)
    assert zh.marked() == "<e1>东方航空</e1>将与<e2>上航</e2>合并" and en.marked() == "<e1>A</e1> bought <e2>B</e2>."


def test_a_long_sentence_is_cut_around_the_entities_never_through_a_marker(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    task = get_task("relation")
    filler = " ".join(["word"] * 60)
    ex = RelationExample(f"{filler} cat ate fish {filler}", None, "", e1=(len(filler) + 1, len(filler) + 4),
                         e2=(len(filler) + 9, len(filler) + 13))
    far = RelationExample(f"cat {filler} {filler} fish", None, "", e1=(0, 3), e2=(len(filler) * 2 + 6, len(filler) * 2 + 10))
    enc = task.encode([ex, far], tok, 24, None)
    for f in enc.features:
        words = tok.convert_ids_to_tokens(f["input_ids"])
        assert len(words) <= 24 and all(m in words for m in MARKERS), words
        assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert enc.stats["truncated"] == 2


def test_attacks_keep_the_entities(relation_config):
    ex = get_task("relation").read_file(relation_config["data"]["dev"], build_config(relation_config))[0]
    w = ex.edit_view()
    w.words = [x if p else x.upper() for x, p in zip(w.words, w.protected)]
    back = ex.with_words(w)
    assert back.text[back.e1[0]:back.e1[1]] == ex.text[ex.e1[0]:ex.e1[1]]
    assert back.text[back.e2[0]:back.e2[1]] == ex.text[ex.e2[0]:ex.e2[1]]
    assert back.text != ex.text


def test_relation_through_the_onnx_export(relation_config):
    from lmtune.export.onnx import export_run
    cfg = copy.deepcopy(relation_config)
    cfg["train"].update(epochs=1)
    run = lmtune.train(cfg)
    export_run(run.run_dir)
    texts = ["the <e1>box</e1> contains the <e2>seed</e2> felt", "the <e2>lamp</e2> causes the <e1>cloud</e1> a"]
    for a, b in zip(run.predict(texts), lmtune.load(run.run_dir, backend="onnx").predict(texts)):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-3
