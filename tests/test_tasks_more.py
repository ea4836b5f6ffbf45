"""Sentence pairs, regression with conformal intervals, and long texts as windows."""
from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

import lmtune
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.pairs import pair_findings
from lmtune.data.readers import Example
from lmtune.errors import InputError
from lmtune.tasks import get_task
from lmtune.tasks.base import Splits, encode_examples
from lmtune.tasks.regression import RegressionExample, conformal_quantile
from lmtune.tasks.windows import pool, spans, spread, training_subset
from tests.conftest import FILL, NEG, POS, toy_rows, write_csv


def _pair_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Pairs whose label says whether both texts have the same sentiment word polarity."""
    rows, rng = toy_rows(2 * n, seed), random.Random(seed)
    out = []
    for i in range(n):
        (a, la), (b, lb) = rows[2 * i], rows[2 * i + rng.choice((1, 2)) if 2 * i + 2 < len(rows) else 2 * i + 1]
        out.append((a, b, "same" if la == lb else "diff"))
    return out


def _regression_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """A score = number of positive words in the pair (0..2) plus a little noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        texts, score = [], 0.0
        for _ in range(2):
            pos = rng.random() < 0.5
            words = [rng.choice(FILL) for _ in range(rng.randint(2, 8))]
            words.insert(rng.randint(0, len(words)), rng.choice(POS if pos else NEG))
            texts.append(" ".join(words))
            score += pos
        out.append((texts[0], texts[1], f"{score + rng.gauss(0, 0.1):.3f}"))
    return out


@pytest.fixture
def regression_config(tmp_path, tiny_config):
    cfg = copy.deepcopy(tiny_config)
    header = ("text", "text_b", "score")
    data = {k: str(write_csv(tmp_path / f"r_{k}.csv", _regression_rows(n, s), header))
            for k, n, s in (("train", 160, 1), ("dev", 80, 2), ("test", 80, 3))}
    cfg.update(task="regression", run_name="reg")
    cfg["data"].update(data, text_pair_column="text_b", label_column="score")
    cfg["train"].update(epochs=8)
    return cfg


def test_regression_on_pairs_learns_and_returns_intervals(regression_config, tmp_path, capsys, monkeypatch):
    run = lmtune.train(regression_config)
    test = run.metrics["test"]
    assert test["spearman"] > 0.6, test
    assert 0.75 <= test["interval_coverage"] <= 1.0 and test["interval_level"] == 0.9
    row = lmtune.load(run.run_dir).predict([("a great day", "the food was lovely")])[0]
    low, high = row["interval"]
    assert low < row["value"] < high and row["interval_level"] == 0.9
    report = (run.run_dir / "report.md").read_text()
    assert "Prediction intervals: split conformal" in report and (run.run_dir / "regression.png").is_file()
    # the CLI: --text with --pair; a single text is refused for a pair model
    assert main(["predict", str(run.run_dir), "--text", "a great day", "--pair", "awful service"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(out) >= {"value", "interval", "text_pair"}
    assert main(["predict", str(run.run_dir), "--text", "a great day"]) == 2
    assert "reads sentence pairs" in capsys.readouterr().err
    # over HTTP: pairs in the request and the OpenAPI schema; a missing pairs list is a 422
    from lmtune.serve.app import ServeSettings, create_app
    key = "k3y-" + "x" * 40
    monkeypatch.setenv("LMTUNE_API_KEYS", key)
    client = TestClient(create_app(ServeSettings(run_dir=str(run.run_dir), backend="torch")),
                        headers={"Authorization": f"Bearer {key}"})
    r = client.post("/v1/predict", json={"texts": ["a great day"], "pairs": ["lovely food"]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["interval"] and "text_pair" not in r.json()["predictions"][0]
    assert client.post("/v1/predict", json={"texts": ["a great day"]}).status_code == 422
    assert "pairs" in client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]["properties"]


def test_a_regression_target_that_is_not_a_number_is_a_line_error(regression_config, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", [("a", "b", "1.5"), ("c", "d", "high")], ("text", "text_b", "score"))
    cfg = copy.deepcopy(regression_config)
    cfg["data"]["train"] = str(bad)
    with pytest.raises(InputError, match=r"bad.csv: line 3: 'score' holds 'high'; regression needs a finite number"):
        lmtune.train(cfg)
    assert not (tmp_path / "runs" / "reg").exists()


def test_conformal_intervals_cover_the_level_on_a_synthetic_problem():
    rng = np.random.default_rng(0)
    task = get_task("regression")
    for level in (0.8, 0.9, 0.95):
        covered = []
        for seed in range(20):
            r = np.random.default_rng(seed)  # residuals with heavy tails: a Gaussian interval would be wrong
            radius = conformal_quantile(r.standard_t(3, size=500), level)  # from 500 dev residuals
            covered.append(np.mean(np.abs(r.standard_t(3, size=2000)) <= radius))  # coverage on 2,000 test rows
        assert abs(np.mean(covered) - level) <= 0.03, (level, np.mean(covered))
    task.level = 0.9
    gold = rng.normal(size=400)
    enc = type("E", (), {"examples": [RegressionExample("x", None, "", target=float(g)) for g in gold]})()
    task.fit_intervals([np.array([g + e]) for g, e in zip(gold, rng.normal(scale=0.5, size=400))], enc, ["value"])
    assert 0.7 < task.radius < 1.0  # about 1.645 x 0.5
    assert conformal_quantile(np.ones(5), 0.9) == float("inf")  # too few dev rows for the level: no false promise


def test_pair_inputs_reach_the_model_as_pairs(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = get_task("classification")
    cfg = build_config({"data": {"text_pair_column": "b"}})
    enc = encode_examples(task, [Example("a good day", "pos", "f:2", "an awful night")], tok, cfg, ["neg", "pos"])
    f = enc.features[0]
    assert tok.decode(f["input_ids"]) == "[CLS] a good day [SEP] an awful night [SEP]"
    assert f["token_type_ids"] == [0] * 5 + [1] * 4
    batch = task.collate(enc.features, tok)
    assert batch["token_type_ids"].tolist() == [f["token_type_ids"]]


def test_swapped_pair_leakage_and_identical_pairs_are_found():
    train = [Example("a b", "1", "t:2", "c d"), Example("same", "1", "t:3", "same")]
    test = [Example("c d", "1", "x:2", "a b"), Example("e", "0", "x:3", "f")]
    found = {f["check"]: f for f in pair_findings(Splits(train, [], test, ["0", "1"]))}
    assert "1 test pair(s) also in train, 1 of them only in the other order" in found["pair_leak_test"]["detail"]
    assert found["pair_leak_test"]["severity"] == "critical" and found["pair_leak_test"]["examples"] == ["x:2"]
    assert found["identical_pairs"]["examples"] == ["t:3"]


def test_pair_classification_trains_symmetric_and_attacks_edit_either_text(tmp_path, tiny_config):
    cfg = copy.deepcopy(tiny_config)
    header = ("text", "text_b", "label")
    cfg["data"].update({k: str(write_csv(tmp_path / f"p_{k}.csv", _pair_rows(n, s), header))
                        for k, n, s in (("train", 64, 1), ("dev", 32, 2), ("test", 32, 3))},
                       text_pair_column="text_b", symmetric_pairs=True)
    cfg["train"].update(max_steps=6)
    cfg["attack"] = {"methods": ["typo"], "rate": 0.5}
    run = lmtune.train(cfg)
    assert json.loads((run.run_dir / "splits.json").read_text())["sizes"]["train"] == 128  # each pair in both orders
    # predicted in both orders, logits averaged: the answer does not depend on the order, also after loading
    pairs = [("the food was good", "the day was lovely"), ("a terrible film", "what a great idea"), ("same", "same")]

    def logits(model, rows):
        enc = model.encode(model._from_texts(rows))
        return enc, model.task.split_outputs(model.outputs(enc), enc, model.labels)[0]

    from lmtune.export.onnx import export_run
    export_run(run.run_dir)
    for model in (run, lmtune.load(run.run_dir), lmtune.load(run.run_dir, backend="onnx")):
        enc, ab = logits(model, pairs)
        assert [f.get("swapped", False) for f in enc.features] == [False, True, False, True, False]  # (A, A) once
        assert np.allclose(ab, logits(model, [(b, a) for a, b in pairs])[1], atol=1e-5)
    run.task.symmetric = False  # one order only: the same model's logits do depend on the order
    assert not np.allclose(logits(run, pairs)[1], logits(run, [(b, a) for a, b in pairs])[1], atol=1e-5)
    attacked = json.loads((run.run_dir / "robustness.json").read_text())
    assert attacked["attacks"]["typo"]["avg_words_changed"] >= 1
    ex = Example("the food was good", "same", "f:2", "the day was lovely")
    w = ex.edit_view()
    w.words = [x.upper() for x in w.words]
    back = ex.with_words(w)
    assert (back.text, back.text_pair) == ("THE FOOD WAS GOOD", "THE DAY WAS LOVELY")


def test_windows_cover_every_token_once_plus_overlaps():
    for n, body, overlap in ((0, 10, 2), (7, 10, 2), (10, 10, 2), (11, 10, 2), (95, 10, 3), (1000, 62, 15)):
        cuts = spans(n, body, overlap)
        seen = np.zeros(n, int)
        for s, e in cuts:
            assert e - s <= body
            seen[s:e] += 1
        assert (seen >= 1).all() and (seen <= 2).all()
        for (_, e0), (s1, e1) in zip(cuts, cuts[1:]):
            assert e0 - s1 == overlap or e1 == n  # consecutive windows share exactly `overlap` tokens (the last may share more)
    assert spread(10, 3) == [0, 4, 9] and spread(2, 8) == [0, 1]


def test_window_pooling_is_order_invariant_and_training_caps_windows():
    feats = [{"example": 0, "window": 0}, {"example": 0, "window": 1}, {"example": 1, "window": 0}, {"example": 0, "window": 2}]
    outs = [np.array([1.0, 0.0]), np.array([3.0, 2.0]), np.array([5.0, 5.0]), np.array([2.0, 4.0])]
    for how in ("mean", "max"):
        a = pool(outs, feats, 2, how)
        order = [2, 0, 3, 1]
        b = pool([outs[i] for i in order], [feats[i] for i in order], 2, how)
        assert all(np.allclose(x, y) for x, y in zip(a, b))
    assert np.allclose(pool(outs, feats, 2, "mean")[0], [2.0, 2.0]) and np.allclose(pool(outs, feats, 2, "max")[0], [3.0, 4.0])
    long = [{"example": 0, "window": w} for w in range(10)] * 2  # one text, re-sampled twice
    assert len(training_subset(long, 4)) == 8


def test_long_texts_as_windows_end_to_end(tmp_path, tiny_config):
    """The sentiment word sits at the end of a long text: truncation never sees it, windows do."""
    rng = random.Random(0)

    def rows(n):
        out = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            filler = " ".join(rng.choice(FILL) for _ in range(rng.randint(18, 24)))
            out.append((f"{filler} {rng.choice(POS if label == 'pos' else NEG)}", label))
        return out
    cfg = copy.deepcopy(tiny_config)
    cfg["data"].update({k: str(write_csv(tmp_path / f"l_{k}.csv", rows(n))) for k, n in (("train", 96), ("dev", 32), ("test", 32))},
                       max_length=16, long_text="windows", max_windows=8)
    cfg["train"].update(epochs=8)
    run = lmtune.train(cfg)
    audit = {f["check"]: f for f in json.loads((run.run_dir / "audit.json").read_text())}
    assert "32 of 32 test text(s) are longer than the 16-token window" in audit["long_texts_test"]["detail"]
    assert run.metrics["test"]["accuracy"] >= 0.8, run.metrics["test"]
    truncated = lmtune.train({**copy.deepcopy(cfg), "run_name": "trunc", "data": {**cfg["data"], "long_text": "truncate"}})
    assert truncated.metrics["test"]["accuracy"] <= 0.7
    loaded = lmtune.load(run.run_dir)
    texts = [r[0] for r in rows(8)]
    assert [p["label"] for p in loaded.predict(texts)] == [p["label"] for p in run.predict(texts)]


def test_regression_and_windows_through_the_onnx_export(regression_config, tmp_path, tiny_config):
    from lmtune.export.onnx import export_run
    cfg = copy.deepcopy(regression_config)
    cfg["train"].update(epochs=2)
    run = lmtune.train(cfg)
    export_run(run.run_dir)
    pairs = [("a great day", "lovely food"), ("awful service", "the day was sad")]
    torch_rows, onnx_rows = run.predict(pairs), lmtune.load(run.run_dir, backend="onnx").predict(pairs)
    for a, b in zip(torch_rows, onnx_rows):
        assert abs(a["value"] - b["value"]) < 1e-3 and b["interval_level"] == 0.9
    long_cfg = copy.deepcopy(tiny_config)
    long_cfg["data"].update(max_length=12, long_text="windows")
    long_cfg["train"].update(max_steps=4)
    long_cfg["run_name"] = "win"
    run = lmtune.train(long_cfg)
    export_run(run.run_dir)
    text = " ".join(["the movie was quite long"] * 12) + " but great"
    a, b = run.predict([text])[0], lmtune.load(run.run_dir, backend="onnx").predict([text])[0]
    assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-3


def test_interval_bands_follow_the_models_precision_and_width_abstention_picks_the_wide_ones():
    """Errors grow with the predicted value: one width for all would over-cover the low end and
    under-cover the high end; bands of predicted values keep coverage in each."""
    r = np.random.default_rng(0)
    task = get_task("regression")
    task.level, task.max_width = 0.9, 2.0

    def split(n):
        pred = r.uniform(0, 5, n)
        gold = pred + r.normal(size=n) * (0.1 + 0.4 * pred)
        enc = type("E", (), {"examples": [RegressionExample("x", None, "", target=float(g)) for g in gold]})()
        return [np.array([p]) for p in pred], enc, pred, gold
    outs, enc, _, _ = split(2000)
    assert task.fit_intervals(outs, enc, ["value"])["bands"] == 5
    assert task.radii == sorted(task.radii) and task.radii[-1] > 3 * task.radii[0]
    outs, enc, pred, gold = split(20000)
    m = task.evaluate(outs, enc, ["value"])
    assert abs(m["interval_coverage"] - 0.9) <= 0.02
    band, inside = np.searchsorted(task.edges, pred, side="right"), np.abs(pred - gold) <= task._radii(pred)
    for b in range(5):  # coverage holds within each band ...
        assert abs(inside[band == b].mean() - 0.9) <= 0.04, b
    one_width = np.abs(pred - gold) <= task.radius  # ... where one width for all over-covers the precise end
    assert one_width[band == 0].mean() > 0.98 and one_width[band == 4].mean() < 0.85
    rows = task.predictions(outs[:200], type("E", (), {"examples": enc.examples[:200]})(), ["value"])
    wide = [row.get("abstained", False) for row in rows]
    widths = [row["interval"][1] - row["interval"][0] for row in rows]
    assert any(wide) and not all(wide) and all(w > 2.0 for w, a in zip(widths, wide) if a)
