"""One prediction everywhere: the saved model/ gives lmtune's probabilities in transformers.pipeline
and in ONNX Runtime (the calibration temperature folded into the weights), calibration applied only
when it lowers the held-out dev ECE, the model card's Hub conventions, and `lmtune push`'s local
target and errors."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import lmtune
from lmtune.evaluate.calibration import choose_temperature, ece, fit_temperature, softmax

TEXTS = ["the food was great", "awful service really", "good bad", "the lovely awful movie", "fine but ugly", "sad happy day"]


def _cfg(tiny_config: dict, **train) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update({"epochs": 2, **train})
    return cfg


def _noisy_rows(n: int, seed: int, share: float = 0.15) -> list[tuple[str, str]]:
    """The toy task with a share of labels flipped: a model cannot be sure of everything, so its
    probabilities stay off 0 and 1 and the temperature has something to change."""
    import random

    from tests.conftest import toy_rows
    rng = random.Random(seed + 100)
    return [(t, {"pos": "neg", "neg": "pos"}[y] if rng.random() < share else y) for t, y in toy_rows(n, seed)]


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, tiny_model):
    """A run whose calibration was applied (its temperature is folded into model/), exported to ONNX."""
    from tests.conftest import write_csv
    d = tmp_path_factory.mktemp("parity")
    data = {k: str(write_csv(d / f"{k}.csv", _noisy_rows(n, seed))) for k, n, seed in (("train", 160, 1), ("dev", 160, 2),
                                                                                       ("test", 32, 3))}
    run = lmtune.train({"output_dir": str(d / "runs"), "run_name": "t", "data": {**data, "max_length": 32},
                        "model": {"name": tiny_model},
                        "train": {"epochs": 8, "batch_size": 16, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}})
    from lmtune.export.onnx import export_run
    export_run(run.run_dir)
    return run


def _pipeline_probs(model_dir, texts) -> list[dict[str, float]]:
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(model_dir), top_k=None)
    return [{r["label"]: r["score"] for r in rows} for rows in clf(texts)]


def test_pipeline_lmtune_and_onnx_give_the_same_probabilities(calibrated_run):
    run = calibrated_run
    state = json.loads((run.run_dir / "model" / "lmtune.json").read_text())["task_state"]
    assert run.task.calibration["applied"] and abs(state["temperature"] - 1) > 0.05  # a temperature that matters
    assert state["folded_temperature"] == state["temperature"]
    theirs = _pipeline_probs(run.run_dir / "model", TEXTS)
    ours = lmtune.load(run.run_dir).predict(TEXTS)
    onnx = lmtune.load(run.run_dir, backend="onnx").predict(TEXTS)
    in_memory = run.predict(TEXTS)  # the Run train returned: raw weights, temperature applied by lmtune
    assert sum(0.05 < p["probabilities"]["pos"] < 0.95 for p in ours) >= 3  # off 0 and 1: the check can fail  # not all saturated: the check can fail
    for t, o, x, m in zip(theirs, ours, onnx, in_memory):
        for label in ("neg", "pos"):
            assert abs(t[label] - o["probabilities"][label]) < 1e-4
            assert abs(x["probabilities"][label] - o["probabilities"][label]) < 1e-4
            assert abs(m["probabilities"][label] - o["probabilities"][label]) < 1e-4


def test_a_run_saved_before_folding_still_applies_its_temperature(calibrated_run, tmp_path):
    """Old lmtune.json: a temperature, no folded_temperature, raw weights. lmtune applies T once."""
    from safetensors.torch import load_file, save_file
    old = tmp_path / "old"
    shutil.copytree(calibrated_run.run_dir, old)
    meta = json.loads((old / "model" / "lmtune.json").read_text())
    t = meta["task_state"].pop("folded_temperature")
    (old / "model" / "lmtune.json").write_text(json.dumps(meta))
    weights = load_file(old / "model" / "model.safetensors")
    for k in ("classifier.weight", "classifier.bias"):
        weights[k] = weights[k] * t  # the raw layer, as runs saved it before
    save_file(weights, old / "model" / "model.safetensors", metadata={"format": "pt"})
    expected = lmtune.load(calibrated_run.run_dir).predict(TEXTS)
    got = lmtune.load(old).predict(TEXTS)
    for e, g in zip(expected, got):
        assert g["probabilities"]["pos"] == pytest.approx(e["probabilities"]["pos"], abs=1e-5)
    raw = _pipeline_probs(old / "model", TEXTS)  # and the pipeline on it is what the issue saw: uncalibrated
    assert max(abs(r["pos"] - e["probabilities"]["pos"]) for r, e in zip(raw, expected)) > 1e-3


def test_temperature_scaling_that_worsens_held_out_ece_is_skipped():
    """A model right 95% of the time with confidence 0.95, and five confidently wrong answers: the NLL
    fit flattens every probability to cover those five (the issue's temperature 160), which worsens
    the ECE on the half it was not fitted on; choose_temperature keeps the raw softmax."""
    n, wrong = 200, 10
    gold = np.zeros(n, dtype=int)
    logits = np.tile([np.log(0.95 / 0.05), 0.0], (n, 1))
    logits[:wrong] = [40.0, 0.0]
    gold[:wrong] = 1  # confidently wrong
    c = choose_temperature(logits, gold, fit_temperature, lambda z, y: ece(softmax(z), y))
    assert fit_temperature(logits, gold) > 5  # what the old code applied
    assert not c["applied"] and c["temperature"] == 1.0 and c["dev_ece_after"] > c["dev_ece_before"]
    assert c["decision"] == f"skipped: would worsen dev ECE {c['dev_ece_before']:.3f} -> {c['dev_ece_after']:.3f}"
    # an overconfident model (right 70% of the time at confidence 0.99) is calibrated
    rng = np.random.default_rng(0)
    gold = (rng.random(400) > 0.7).astype(int)
    c = choose_temperature(np.tile([4.6, 0.0], (400, 1)), gold, fit_temperature, lambda z, y: ece(softmax(z), y))
    assert c["applied"] and c["temperature"] > 1 and c["dev_ece_after"] < c["dev_ece_before"]


def test_a_run_whose_calibration_would_worsen_dev_ece_skips_it_and_says_so(tiny_config, monkeypatch):
    """Forced: the temperature fit returns 50 (everything near 0.5 on a model that is mostly right), so
    the held-out ECE worsens; the run keeps the raw softmax, saves T = 1, and results.json and
    report.md say calibration was skipped."""
    import lmtune.tasks.classification as cls
    monkeypatch.setattr(cls, "fit_temperature", lambda logits, gold: 50.0)
    run = lmtune.train(_cfg(tiny_config, epochs=8))
    results = json.loads((run.run_dir / "results.json").read_text())
    c = results["task_report"]["calibration"]
    assert not c["applied"] and c["dev_ece_after"] > c["dev_ece_before"]
    assert c["decision"].startswith("skipped: would worsen dev ECE")
    assert f"Calibration: {c['decision']}" in (run.run_dir / "report.md").read_text()
    state = json.loads((run.run_dir / "model" / "lmtune.json").read_text())["task_state"]
    assert state["temperature"] == 1.0 and state["folded_temperature"] == 1.0
    # nothing folded, nothing applied: the pipeline and lmtune still agree
    theirs = _pipeline_probs(run.run_dir / "model", TEXTS)
    for t, o in zip(theirs, lmtune.load(run.run_dir).predict(TEXTS)):
        assert abs(t["pos"] - o["probabilities"]["pos"]) < 1e-4


def test_fold_is_checked_and_undone_exactly(calibrated_run):
    """folded() leaves the model bit-identical afterwards, and a fold that cannot scale the logits
    (no output layer of the right shape) changes nothing."""
    from lmtune.fold import folded, text_probe
    run = lmtune.load(calibrated_run.run_dir)
    run.task.set_folded(1.0)  # pretend the weights are raw: folding must now divide by T
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    probe = text_probe(run.tokenizer, run.model)
    with torch.no_grad():
        raw = run.model(**probe).logits
    with folded(run.model, run.task, probe) as layer:
        assert layer == "classifier" and run.task.folded_temperature == run.task.temperature
        with torch.no_grad():
            assert torch.allclose(run.model(**probe).logits, raw / run.task.temperature, atol=1e-5)
    assert run.task.folded_temperature == 1.0
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
