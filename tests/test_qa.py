"""Extractive QA: windows, offsets back to the original characters, decoding over windows, scoring."""
from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

import lmtune
from lmtune.config import DEFAULT_MODEL, build_config
from lmtune.models import resolve_model
from lmtune.tasks import get_task
from lmtune.tasks.qa import QAExample, em_f1
from tests.conftest import FILL

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["car", "house", "bird", "door", "cup", "shirt"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))  # uncased, strips accents


def _one_hot_outputs(enc, starts_ends: dict[int, tuple[int, int]]) -> list[np.ndarray]:
    """Model outputs that point at the given (start, end) token of the given features, [CLS] elsewhere."""
    outs = []
    for k, f in enumerate(enc.features):
        o = np.full((2, f["length"]), -10.0)
        s, e = starts_ends.get(k, (0, 0))
        o[0, s], o[1, e] = 10.0, 10.0
        outs.append(o)
    return outs


@pytest.mark.parametrize("context,answer", [
    ("Le Café de Flore est à Paris, près de Saint-Germain.", "Café de Flore"),
    ("The ÉCOLE Normale was founded in 1794 by the Convention.", "ÉCOLE Normale"),
    ("价格是１２３元，在北京的王府井大街。", "１２３元"),
    ("他在２０１８年加入了Ｂｅｒｔ团队，负责研究。", "Ｂｅｒｔ团队"),
])
def test_offsets_map_back_to_exactly_the_gold_substring(tok, context, answer):
    task = get_task("qa")
    start = context.index(answer)
    ex = QAExample("where?", "answer", "f:1", context=context, answers=[{"text": answer, "start": start}])
    enc = task.encode([ex], tok, 64)
    f = enc.features[0]
    assert (f["start"], f["end"]) != (0, 0)
    row = task.predictions(_one_hot_outputs(enc, {0: (f["start"], f["end"])}), enc, [])[0]
    assert row["answer"] == answer and (row["start"], row["end"]) == (start, start + len(answer))


def test_an_answer_crossing_a_window_boundary_is_still_found(tok):
    task = get_task("qa")
    words = [random.Random(i).choice(FILL) for i in range(120)]
    context = " ".join(words[:60]) + " the answer is here " + " ".join(words[60:])
    answer = "the answer is here"
    ex = QAExample("what?", "answer", "f:1", context=context, answers=[{"text": answer, "start": context.index(answer)}])
    enc = task.encode([ex], tok, 48, overlap=16)
    holders = [k for k, f in enumerate(enc.features) if (f["start"], f["end"]) != (0, 0)]
    assert len(enc.features) > 3 and holders  # several windows; at least one holds the whole answer
    for k, f in enumerate(enc.features):  # a window that cuts the answer is taught "not here"
        inside = [o for o in f["offsets"] if o is not None]
        cut = inside[0][0] > context.index(answer) or inside[-1][1] < context.index(answer) + len(answer)
        assert (k in holders) != cut
    k = holders[-1]
    row = task.predictions(_one_hot_outputs(enc, {k: (enc.features[k]["start"], enc.features[k]["end"])}), enc, [])[0]
    assert row["answer"] == answer


def test_decoding_never_returns_an_invalid_span(tok):
    task = get_task("qa")
    rng = np.random.default_rng(0)
    exs = [QAExample("what is it?", None, "", context=" ".join(random.Random(i).choice(FILL) for _ in range(80)))
           for i in range(10)]
    enc = task.encode(exs, tok, 40, overlap=10)
    outs = [rng.normal(size=(2, f["length"])) * 5 for f in enc.features]
    for row, ex in zip(task.predictions(outs, enc, []), exs):
        s, e = row["start"], row["end"]
        assert 0 <= s < e <= len(ex.context) and row["answer"] == ex.context[s:e]
        assert len(tok(row["answer"], add_special_tokens=False)["input_ids"]) <= 30


def test_scorer_matches_hand_computed_cases():
    assert em_f1("The Eiffel Tower!", ["eiffel tower"], False) == (1.0, 1.0)  # case, article, punctuation
    em, f1 = em_f1("in the Eiffel Tower", ["Eiffel Tower in Paris"], False)
    assert em == 0.0 and f1 == pytest.approx(2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))  # in, eiffel, tower common
    assert em_f1("red", ["blue", "red"], False) == (1.0, 1.0)  # best gold answer
    em, f1 = em_f1("北京王府井", ["王府井大街"], True)  # CMRC: longest common substring 王府井 (3 chars)
    assert em == 0.0 and f1 == pytest.approx(2 * (3 / 5) * (3 / 5) / (6 / 5))
    assert em_f1("１２３元。", ["１２３元"], True) == (1.0, 1.0)  # punctuation removed
    assert em_f1("", [], False) == (1.0, 1.0) and em_f1("x", [], False) == (0.0, 0.0)  # no-answer questions


def _qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        facts = {t: rng.choice(COLORS) for t in rng.sample(THINGS, 1)}  # one colour in the context: learnable by a tiny model
        parts = [f"the {t} is {c}" for t, c in facts.items()]
        rng.shuffle(parts)
        context = " and ".join(parts) + " " + " ".join(rng.choice(FILL) for _ in range(rng.randint(0, 8)))
        thing = rng.choice(list(facts))
        ans = facts[thing]
        start = context.index(f"the {thing} is ") + len(f"the {thing} is ")
        rows.append({"id": f"q{i}", "question": f"what color is the {thing}?", "context": context,
                     "answers": {"text": [ans], "answer_start": [start]}})
    return rows


def test_qa_trains_end_to_end_predicts_serves_and_exports(tmp_path, tiny_config, capsys):
    from lmtune.cli import main
    from lmtune.export.onnx import export_run
    cfg = copy.deepcopy(tiny_config)
    for name, n, seed in (("train", 160, 1), ("dev", 40, 2), ("test", 40, 3)):
        rows = _qa_rows(n, seed)
        if name == "train":  # a wrong offset that can be re-located, and an answer not in its context
            rows[0]["answers"]["answer_start"] = [0]
            rows[1]["answers"] = {"text": ["purple"], "answer_start": [3]}
        path = tmp_path / f"qa_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg["data"][name] = str(path)
    cfg.update(task="qa", run_name="qa")
    cfg["data"]["max_length"] = 48
    cfg["train"].update(epochs=6, lr=1e-3, head_lr=1e-3)
    run = lmtune.train(cfg)
    assert run.metrics["test"]["f1"] > 0.6, run.metrics["test"]
    audit = {f["check"]: f for f in json.loads((run.run_dir / "audit.json").read_text())}
    assert "1 re-located to the nearest occurrence of their text, 1 skipped" in audit["answer_offsets"]["detail"]
    assert json.loads((run.run_dir / "splits.json").read_text())["sizes"]["train"] == 159  # the unusable question is out
    q, ctx = "what color is the bird?", "the bird is green and it felt quite good"
    row = lmtune.load(run.run_dir).predict([(q, ctx)])[0]
    assert row["answer"] == ctx[row["start"]:row["end"]]
    assert main(["predict", str(run.run_dir), "--text", q, "--pair", ctx]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == row["answer"]
    export_run(run.run_dir)
    assert lmtune.load(run.run_dir, backend="onnx").predict([(q, ctx)])[0]["answer"] == row["answer"]


def test_squad_json_with_a_bad_offset_is_relocated(tmp_path):
    task = get_task("qa")
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France. Paris is big.",
                                                    "qas": [{"id": "a", "question": "where?", "answers": [
                                                        {"text": "France", "answer_start": 2}, {"text": "Paris", "answer_start": 20}]}]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    ex, = task.read_file(str(path), build_config({"task": "qa"}))
    assert ex.answers == [{"text": "France", "start": 12}, {"text": "Paris", "start": 20}] and ex.source.endswith(":a")


def _qa_file(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("answers,message", [
    ({"text": ["France"], "answer_start": ["12"]}, r'line 2: answer_start must be an integer .*got "12"'),
    ([{"text": "France", "answer_start": "12"}], r'line 2: answer_start must be an integer .*got "12"'),
    ({"text": ["France"], "answer_start": [True]}, r"line 2: answer_start must be an integer .*got true"),
    ({"text": ["France", "Paris"], "answer_start": [12]}, r"line 2: answers has 2 text\(s\) but 1 answer_start value\(s\)"),
    ({"text": ["France"], "answer_start": [12, 0]}, r"line 2: answers has 1 text\(s\) but 2 answer_start value\(s\)"),
])
def test_bad_answer_starts_are_errors_with_the_line(tmp_path, answers, message):
    """issue 46 #10: a string answer_start was re-located silently; text and start lists of different lengths
    were zipped without a word."""
    ctx = "Paris is in France."
    path = _qa_file(tmp_path / "q.jsonl", [{"question": "where?", "context": ctx, "answers": {"text": ["Paris"], "answer_start": [0]}},
                                            {"question": "where?", "context": ctx, "answers": answers}])
    with pytest.raises(lmtune.errors.InputError, match=message):
        get_task("qa").read_file(path, build_config({"task": "qa"}))


def test_dev_answers_not_in_their_context_are_scored_as_misses(tmp_path, tok):
    """issue 46 #10: dev questions whose answer text is not in the context were dropped with a warning, so EM/F1
    left them out; like the official SQuAD script, every question is scored (a miss unless predicted)."""
    ctx = "the car is red and it felt quite good"
    good = {"question": "what color is the car?", "context": ctx, "answers": {"text": ["red"], "answer_start": [11]}}
    lost = {"question": "what color is the car?", "context": ctx, "answers": {"text": ["purple"], "answer_start": [3]}}
    train = _qa_file(tmp_path / "train.jsonl", [good] * 6 + [lost])
    dev = _qa_file(tmp_path / "dev.jsonl", [good, lost])
    task = get_task("qa")
    splits = task.read(build_config({"task": "qa", "data": {"train": train, "dev": dev}}))
    assert len(splits.train) == 6  # train cannot learn a span that is not there: that question leaves train
    assert len(splits.dev) == 2 and splits.dev[1].answers == [{"text": "purple", "start": -1}]
    finding, = task.audit_findings(splits)
    assert "1 skipped (their text is not in the context), 1 in dev/test scored as given" in finding["detail"]
    enc = task.encode(splits.dev, tok, 32)
    assert [(f["start"], f["end"]) for f in enc.features][1] == (0, 0)  # its loss target: no span here
    targets = {k: (f["start"], f["end"]) for k, f in enumerate(enc.features) if f["example"] == 0}
    outs = _one_hot_outputs(enc, {**targets, 1: targets[0]})  # the model answers "red" to both questions
    m = task.evaluate(outs, enc, [])
    assert m["n"] == 2 and m["exact_match"] == 0.5 and m["f1"] == 0.5
    assert [r["gold"] for r in task.predictions(outs, enc, [])] == [["red"], ["purple"]]
