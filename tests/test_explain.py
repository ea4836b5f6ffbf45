"""Explanations (Integrated Gradients, occlusion, faithfulness), slices and counterfactual swaps."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.data.readers import Example
from lmtune.explain import Segmented
from lmtune.robust.text import word_spans
from lmtune.fairness import SwapList, slice_metrics
from lmtune.serve.app import ServeSettings, create_app
from tests.conftest import NEG, POS, toy_rows, write_csv

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _train(d, pretrained_tiny, rows, name, **data):
    return lmtune.train({"output_dir": str(d), "run_name": name,
                         "data": {"train": str(write_csv(d / f"{name}_train.csv", rows[0], rows[2])),
                                  "dev": str(write_csv(d / f"{name}_dev.csv", rows[1], rows[2])),
                                  "test": str(write_csv(d / f"{name}_test.csv", rows[1], rows[2])), "max_length": 32, **data},
                         "model": {"name": pretrained_tiny},
                         "train": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}})


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrained_tiny):
    d = tmp_path_factory.mktemp("explain")
    return _train(d, pretrained_tiny, (toy_rows(96, 1), toy_rows(48, 2), ("text", "label")), "cls")


def _keyword_top_share(rows: list[dict]) -> float:
    """How often the sentiment keyword (the only word that carries the label) gets the highest attribution."""
    hits = []
    for r in rows:
        words = r["explanations"][0]["attributions"]
        best = max(words, key=lambda wa: wa[1])[0]
        hits.append(best in POS + NEG)
    return float(np.mean(hits))


def test_integrated_gradients_points_at_the_word_the_model_uses(run):
    texts = [t for t, _ in toy_rows(40, 7)]
    rows = run.explain(texts)
    assert [w for w, _ in rows[0]["explanations"][0]["attributions"]] == texts[0].split()
    assert all(r["explanations"][0]["label"] == r["label"] and r["explanations"][0]["method"] == "ig" for r in rows)
    assert _keyword_top_share(rows) >= 0.8
    other = "neg" if rows[0]["label"] == "pos" else "pos"  # a chosen label is explained instead of the predicted one
    flipped = run.explain(texts[:1], label=other)[0]["explanations"][0]
    assert flipped["label"] == other
    with pytest.raises(lmtune.InputError, match="not a class"):
        run.explain(texts[:1], label="nope")


def test_occlusion_on_the_onnx_backend(run, capsys):
    assert main(["export", str(run.run_dir), "--sample", "16"]) == 0
    capsys.readouterr()
    onnx = lmtune.load(run.run_dir, backend="onnx")
    rows = onnx.explain([t for t, _ in toy_rows(30, 8)])
    assert {r["explanations"][0]["method"] for r in rows} == {"occlusion"}
    assert _keyword_top_share(rows) >= 0.8
    with pytest.raises(lmtune.InputError, match="gradients"):
        onnx.explain(["good food"], method="ig")


def test_explain_report_measures_faithfulness_and_renders(run, capsys):
    assert main(["explain", str(run.run_dir), "--max-examples", "40", "--steps", "16"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run.run_dir / "explain.json").read_text())
    f = result["faithfulness"]
    assert f["n"] == 40 and {"ig", "random", "attention"} <= set(f)
    assert f["ig"]["comprehensiveness"] > f["random"]["comprehensiveness"]
    assert f["ig"]["sufficiency"] < f["random"]["sufficiency"]
    # the words that drive each class are its keywords
    assert {w for w, _, _ in result["class_words"]["pos"][:3]} <= set(POS)
    report = (run.run_dir / "report.md").read_text()
    assert "## Explanations" in report and "(explanations.png)" in report and (run.run_dir / "explanations.png").stat().st_size > 0
    assert "comprehensiveness" in out
    assert main(["predict", str(run.run_dir), "--text", "great food", "--explain"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["explanations"][0]["attributions"][0][0] == "great"


def test_words_of_pairs_and_chinese():
    seg = Segmented.of(Example("Is it open?", None, "", "When does it open"))
    assert seg.words == ["Is", "it", "open", "?", "When", "does", "it", "open"]
    assert seg.keep({0, 2, 4}) == ("Is open", "When")
    assert seg.keep(set(range(8)) - {3}) == ("Is it open", "When does it open")
    text = "我喜欢这部电影"
    words = [text[a:b] for a, b in word_spans(text)]
    assert "".join(words) == text and 1 < len(words) < len(text)  # jieba words, not characters
    zh = Segmented.of(Example(text, None, ""))
    assert zh.keep(set(range(len(words)))) == (text,)  # Chinese words join without spaces


def test_swap_lists_keep_case_and_name_the_groups(tmp_path):
    en = SwapList.named("en")
    assert en.swap("He thanked his Mother.") == ("She thanked her Father.", {"male", "female"})
    assert en.swap("the hero wins")[1] == set()  # whole words only: "he" inside "hero" is not swapped
    zh = SwapList.named("zh")
    assert zh.swap("他们说他很好") == ("她们说她很好", {"male"})
    good = write_csv(tmp_path / "swap.csv", [("young", "old")], header=("young", "old"))
    assert SwapList.named(str(good)).swap("a young man") == ("a old man", {"young"})
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\nonly-one\n")
    with pytest.raises(lmtune.InputError, match="line 3"):
        SwapList.named(str(bad))


def test_counterfactual_swaps_find_a_planted_gender_bias(tmp_path, pretrained_tiny, capsys):
    """A model trained where 'he' always goes with positive and 'she' with negative changes its mind
    when the pronoun is swapped; the share of changed predictions says so."""
    rng = random.Random(0)

    def rows(n):
        out = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            words = ["he" if label == "pos" else "she", "said", "the", rng.choice(["food", "movie", "day"]), "was", "ok"]
            out.append((" ".join(words), label))
        return out

    r = _train(tmp_path, pretrained_tiny, (rows(96), rows(32), ("text", "label")), "biased")
    assert main(["fairness", str(r.run_dir), "--swap", "en"]) == 0
    result = json.loads((r.run_dir / "fairness.json").read_text())["counterfactual"]
    assert result["with_terms"] == 32 and result["changed"] >= 0.9
    assert set(result["per_group"]) == {"male", "female"} and result["mean_shift"] < -0.5
    assert result["shown"] and "Counterfactual swaps" in capsys.readouterr().out
    assert "## Counterfactual swaps" in (r.run_dir / "report.md").read_text()


def test_slice_metrics_flag_the_slice_that_is_worse():
    rows = [{"gold": "a", "label": "a"} for _ in range(200)] + [{"gold": "a", "label": "a" if i % 2 else "b"} for i in range(60)]
    slices = {"region": ["north"] * 200 + ["south"] * 60}
    result = slice_metrics(rows, slices, seed=0)
    table = {t["value"]: t for t in result["columns"]["region"]}
    assert table["south"]["accuracy"] == 0.5 and table["south"]["worse"] and table["south"]["ci"][1] < 0
    assert not table["north"]["worse"] and table["north"]["ci"][0] > 0
    assert result["overall"] == pytest.approx(230 / 260, abs=1e-4)


def test_training_with_slice_columns(tmp_path, pretrained_tiny):
    rows = [(t, lab, "web" if i % 3 else "phone") for i, (t, lab) in enumerate(toy_rows(96, 1))]
    held = [(t, lab, "web" if i % 3 else "phone") for i, (t, lab) in enumerate(toy_rows(48, 2))]
    r = _train(tmp_path, pretrained_tiny, (rows, held, ("text", "label", "channel")), "sliced", slice_columns=["channel"])
    results = json.loads((r.run_dir / "results.json").read_text())
    table = {t["value"]: t for t in results["slices"]["columns"]["channel"]}
    assert set(table) == {"web", "phone"} and table["web"]["n"] + table["phone"]["n"] == 48
    assert "## Slices" in (r.run_dir / "report.md").read_text()
    with pytest.raises(lmtune.InputError, match="no value in column 'region'"):
        _train(tmp_path, pretrained_tiny, (rows, held, ("text", "label", "channel")), "missing", slice_columns=["region"])
    assert not (tmp_path / "missing").exists()  # failed before training: no run directory left behind


def test_explanations_over_http_are_authenticated_and_rate_limited(run, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    with TestClient(create_app(ServeSettings(run_dir=str(run.run_dir), backend="torch", explain_per_minute=2))) as c:
        body = {"texts": ["the food was great"]}
        assert c.post("/v1/predict?explain=true", json=body).status_code == 401
        ok = c.post("/v1/predict?explain=true", json=body, headers=AUTH)
        assert ok.status_code == 200
        e = ok.json()["predictions"][0]["explanations"][0]
        assert [w for w, _ in e["attributions"]] == ["the", "food", "was", "great"] and e["method"] == "ig"
        plain = c.post("/v1/predict", json=body, headers=AUTH).json()["predictions"][0]
        assert plain.get("explanations") is None  # only when asked for
        assert c.post("/v1/predict?explain=true", json=body, headers=AUTH).status_code == 200
        limited = c.post("/v1/predict?explain=true", json=body, headers=AUTH)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert c.post("/v1/predict", json=body, headers=AUTH).status_code == 200  # plain predictions are not limited
        assert "explanations" in json.dumps(c.get("/openapi.json").json())


def test_ner_explains_each_entity(tmp_path, tiny_model):
    sents = "\n\n".join(["Peter B-PER\nlives O\nin O\nParis B-LOC", "Anna B-PER\nvisits O\nRome B-LOC"] * 20)
    (tmp_path / "train.conll").write_text(sents + "\n")
    r = lmtune.train({"task": "ner", "output_dir": str(tmp_path), "run_name": "ner",
                      "data": {"train": str(tmp_path / "train.conll"), "dev": str(tmp_path / "train.conll"), "max_length": 32},
                      "model": {"name": tiny_model},
                      "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1, "calibrate": False}})
    row = r.explain(["Peter lives in Paris"])[0]
    found = {(e["entity"], e["label"]): e for e in row["explanations"]}
    assert set(found) == {("Peter", "PER"), ("Paris", "LOC")}
    for (entity, _), e in found.items():
        assert [w for w, _ in e["attributions"]] == ["Peter", "lives", "in", "Paris"]
        assert max(e["attributions"], key=lambda wa: abs(wa[1]))[0] == entity  # an entity is mostly its own word
    assert [e["entity"] for e in r.explain(["Peter lives in Paris"], label="LOC")[0]["explanations"]] == ["Paris"]
    with pytest.raises(lmtune.InputError, match="need Integrated Gradients"):
        r.explain(["Peter lives in Paris"], method="occlusion")
    result = r.explain_report(str(tmp_path / "train.conll"), max_examples=10)
    assert result["faithfulness"] is None and result["examples"]["entities"]
    assert "per entity" in (r.run_dir / "report.md").read_text()
