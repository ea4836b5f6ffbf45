"""bench/suite.py's machinery without training anything: RESULTS.md rendered from a hand-made results document,
the paired bootstrap on a known difference and on none, and resumed units that skip their cached work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import suite  # noqa: E402


def side(scores: list[float], train_s: list[float], **extra) -> dict:
    return {**harness.summary(scores), "scores": scores, "train_s": train_s, **extra}


def hand_made() -> dict:
    return {"bench": "suite", "order": 90, "title": "t", "script": "bench/suite.py", "command": "python bench/suite.py",
            "commit": "abc1234", "date": "2027-01-01", "machine": "2 CPU cores", "status": "full",
            "settings": {"seeds": [1, 2, 3], "grid": [1e-5, 2e-5], "limit": 0, "resamples": 2000, "ceiling": True, "usual": True},
            "sets": {"mrpc": {"title": "MRPC", "metric": "accuracy", "sizes": {"train": 3669, "dev": 407, "test": 1725},
                              "lmtune": side([0.80, 0.82, 0.81], [100.0, 110.0, 105.0], loop_s=[120.0, 130.0, 125.0]),
                              "tuned": side([0.78, 0.79, 0.77], [150.0, 160.0, 155.0], lr=2e-5, grid_cost_s=300.0),
                              "specialist": side([0.75, 0.76, 0.74], [90.0, 95.0, 92.0]),
                              "untrained": {"score": 0.7183},
                              "ceiling": side([0.84], [900.0], train_rows=3669, epochs=10),
                              "bootstrap": {"diff": 0.03, "low": 0.01, "high": 0.05, "win": True, "loss": False}},
                     "sst2": {"title": "SST-2 (4k sample)", "metric": "accuracy", "sizes": {"train": 3600, "dev": 400, "test": 872},
                              "lmtune": side([0.83, 0.84, 0.82], [50.0, 51.0, 52.0]),
                              "tuned": side([0.84, 0.83, 0.85], [60.0, 61.0, 59.0], lr=5e-5, grid_cost_s=240.0),
                              "usual": side([0.79, 0.80, 0.78], [20.0, 21.0, 19.0]),
                              "bootstrap": {"diff": -0.01, "low": -0.03, "high": 0.01, "win": False, "loss": False}}}}


def test_results_md_is_rendered_from_the_json_alone(tmp_path):
    doc = suite.finish(hand_made())
    md = suite.render_markdown(doc)
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| SST-2 (4k sample) (3,600 / 400 / 872)", "| MRPC (3,669 / 407 / 1,725)"]  # ORDER
    sst2, mrpc = rows
    assert "0.8300 ± 0.0100" in sst2 and "0.8400 ± 0.0100 (5e-05)" in sst2 and "| 240 |" in sst2
    assert "no (within noise)" in sst2 and "SetFit: bench/fewshot.py" in sst2 and "| not run |" in sst2  # no ceiling
    assert "+0.0300 [+0.0100, +0.0500]" in mrpc and "| yes |" in mrpc and "105 / 155" in mrpc
    assert "CrossEncoder 0.7500 ± 0.0100; untrained cosine 0.7183" in mrpc and "0.8400 (10 epochs, 3,669 train)" in mrpc
    assert "none known" in mrpc and "SMOKE" not in md
    assert doc["headline"]["lmtune"] == "1 of 2" and doc["sections"][1]["table"]["rows"] == suite.table_rows(doc)
    # the command line renders the same file from the JSON
    (tmp_path / "suite.json").write_text(json.dumps(doc), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--render", "--out", str(tmp_path / "suite.json"),
                    "--md", str(tmp_path / "RESULTS.md")], check=True, cwd=ROOT, capture_output=True)
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == md


def test_smoke_and_empty_documents_say_they_are_not_figures():
    smoke = suite.finish({**hand_made(), "status": "smoke"})
    assert "SMOKE RUN, NOT FIGURES" in suite.render_markdown(smoke) and smoke["headline"]["lmtune"] == "not measured"
    empty = suite.finish({**hand_made(), "status": "placeholder", "sets": {}})
    md = suite.render_markdown(empty)
    assert "NOT RUN YET" in md and md.count("| not run |") >= 1


def test_the_bootstrap_interval_excludes_zero_for_a_real_difference_and_not_for_none():
    rng = np.random.default_rng(0)
    gold = list(rng.integers(0, 2, 800))
    better = [[g if rng.random() < 0.9 else 1 - g for g in gold] for _ in range(3)]
    worse = [[g if rng.random() < 0.7 else 1 - g for g in gold] for _ in range(3)]
    same = [[g if rng.random() < 0.8 else 1 - g for g in gold] for _ in range(3)]
    same_too = [[g if rng.random() < 0.8 else 1 - g for g in gold] for _ in range(3)]
    accuracy = harness.METRICS["accuracy"]
    win = harness.paired_bootstrap(accuracy, gold, better, worse, n_resamples=1000)
    assert win["win"] and win["low"] > 0 and 0.15 < win["diff"] < 0.25 and win["low"] < win["diff"] < win["high"]
    null = harness.paired_bootstrap(accuracy, gold, same, same_too, n_resamples=1000)
    assert not null["win"] and not null["loss"] and null["low"] < 0 < null["high"]
    loss = harness.paired_bootstrap(accuracy, gold, worse, better, n_resamples=1000)
    assert loss["loss"] and not loss["win"]


def test_the_recomputed_metrics_bootstrap_too():
    rng = np.random.default_rng(1)
    gold = list(rng.normal(size=300))
    close = [[g + rng.normal(scale=0.3) for g in gold]]
    far = [[g + rng.normal(scale=2.0) for g in gold]]
    result = harness.paired_bootstrap(harness.METRICS["spearman"], gold, close, far, n_resamples=300)
    assert result["win"] and result["diff"] > 0.3
    # count-based F1 equals seqeval's own strict score
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    g = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["I-MISC", "O"]]
    p = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"], ["I-MISC", "B-MISC"]]
    assert harness.METRICS["entity_f1"].score(g, p, {}) == f1_score(g, p, mode="strict", scheme=IOB2)
    from sklearn.metrics import f1_score as sk_f1
    labels = ["a", "b", "c"]
    gl, pl = [["a"], ["b", "c"], [], ["a", "c"]], [["a"], ["c"], ["b"], []]
    hot = lambda rows: [[lab in r for lab in labels] for r in rows]  # noqa: E731
    assert np.isclose(harness.METRICS["macro_f1"].score(gl, pl, {"labels": labels}),
                      sk_f1(hot(gl), hot(pl), average="macro", zero_division=0))


def test_a_resumed_run_skips_cached_units_and_refits_a_lost_model(tmp_path):
    calls = []

    def fit(folder: Path) -> dict:
        calls.append(folder)
        (folder / "model").mkdir(exist_ok=True)
        return {"train_s": 1.0, "dev": 0.5, "model": str(folder / "model")}

    folder = suite.unit_dir(tmp_path, "sst2", "tuned", 2e-5, 1)
    first = suite.fit_unit(folder, fit)
    assert suite.fit_unit(folder, fit) == first and len(calls) == 1  # cached: not trained again
    predicted = []
    result = suite.test_unit(folder, lambda m: predicted.append(m) or ["1", "0"], lambda p: 0.5)
    assert result == {"score": 0.5, "pred": ["1", "0"]} and not (folder / "model").exists()  # model freed after its test
    assert suite.test_unit(folder, lambda m: predicted.append(m) or [], lambda p: 0.0) == result and len(predicted) == 1
    assert suite.fit_unit(folder, fit) == first and len(calls) == 1  # tested: the missing model is not needed
    other = suite.unit_dir(tmp_path, "sst2", "tuned", 5e-5, 1)
    suite.fit_unit(other, fit)
    import shutil
    shutil.rmtree(other / "model")  # fitted, never tested, model lost (e.g. removed after the lr choice): refit
    suite.fit_unit(other, fit)
    assert len(calls) == 3


def test_the_peer_lr_is_chosen_on_dev_and_ties_go_to_the_first():
    assert suite.choose_lr({1e-5: {"dev": 0.7}, 2e-5: {"dev": 0.8}, 5e-5: {"dev": 0.8}, 1e-4: {"dev": 0.6}}) == 2e-5


def test_answer_span_finds_the_answer_tokens_in_a_window_and_cls_where_it_is_cut_off():
    from transformers import AutoTokenizer

    from lmtune.config import DEFAULT_MODEL
    from lmtune.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    context = "The tower was built in 1889 by Gustave Eiffel for the world fair in Paris."
    start = context.index("Gustave Eiffel")
    enc = tok(["Who built it?"], [context], truncation="only_second", max_length=64, return_offsets_mapping=True)
    sp, ep = harness.answer_span(enc.sequence_ids(0), enc["offset_mapping"][0], start, start + len("Gustave Eiffel"))
    assert tok.decode(enc["input_ids"][0][sp:ep + 1]) == "gustave eiffel"
    cut = tok(["Who built it?"], [context], truncation="only_second", max_length=12, return_offsets_mapping=True)
    assert harness.answer_span(cut.sequence_ids(0), cut["offset_mapping"][0], start, start + 14) == (0, 0)
