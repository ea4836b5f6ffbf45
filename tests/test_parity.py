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


# ---- the model card ---------------------------------------------------------------------------

def test_the_card_takes_the_license_from_the_base_models_card():
    from lmtune.card import base_license
    assert base_license("sentence-transformers/all-MiniLM-L6-v2") == ("apache-2.0", None)  # the packaged copy's README
    assert base_license("/no/such/folder") == (None, None)


@pytest.fixture
def dataset_run(tmp_path, tiny_model, tiny_config):
    """A run from a `datasets` DatasetDict saved with save_to_disk (reviews/{train,validation,test}),
    on a base model whose own card says license: mit."""
    datasets = pytest.importorskip("datasets")
    from tests.conftest import toy_rows
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# a tiny base model\n")
    splits = {name: datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
              for name, rows in (("train", toy_rows(96, 1)), ("validation", toy_rows(32, 2)), ("test", toy_rows(32, 3)))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "reviews"))
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["name"] = str(base)
    cfg["data"].update(train=str(tmp_path / "reviews" / "train"), dev=str(tmp_path / "reviews" / "validation"),
                       test=str(tmp_path / "reviews" / "test"))
    cfg["train"].update(epochs=1, max_steps=6)
    return lmtune.train(cfg)


def test_model_card_load_finds_license_dataset_names_metric_ids_and_usage(dataset_run):
    from huggingface_hub import ModelCard
    card = ModelCard.load(dataset_run.run_dir / "model" / "README.md")
    assert card.data.license == "mit"
    results = card.data.eval_results
    assert {r.dataset_name for r in results} == {"reviews"} and {r.dataset_type for r in results} == {"reviews"}
    assert {r.dataset_split for r in results} == {"test", "dev"}
    shown = {(r.dataset_split, r.metric_type, (r.metric_args or {}).get("average")): r.metric_value for r in results}
    metrics = json.loads((dataset_run.run_dir / "metrics.json").read_text())
    assert shown[("test", "accuracy", None)] == metrics["test"]["accuracy"]
    assert shown[("test", "f1", "macro")] == metrics["test"]["macro_f1"]  # a Hub metric id, the averaging in args
    assert {r.metric_type for r in results} <= {"accuracy", "f1"}
    assert "## How to use" in card.text
    assert 'pipeline("text-classification", model="path/to/model", top_k=None)' in card.text
    assert "lmtune.load(" in card.text and "run.predict(" in card.text
    decision = json.loads((dataset_run.run_dir / "results.json").read_text())["task_report"]["calibration"]["decision"]
    assert f"Calibration: {decision} (2-fold cross-validation on dev" in card.text


# ---- push -------------------------------------------------------------------------------------

def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_a_folder_writes_the_hub_layout_and_dry_run_lists_it(calibrated_run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from lmtune.cli import main
    model = calibrated_run.run_dir / "model"
    before = _files(model)
    assert main(["push", str(calibrated_run.run_dir), "org/reviews", "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    names = sorted(line.split()[-1] for line in listed[:-1])
    assert names == sorted(before) and "would be uploaded to org/reviews (dry run: nothing written)" in listed[-1]
    out = tmp_path / "repo"
    assert main(["push", str(calibrated_run.run_dir), "org/reviews", "--to", str(out)]) == 0
    written = _files(out)
    assert sorted(written) == sorted(before)  # exactly model/'s files: the repo's layout
    assert all(written[k] == v for k, v in before.items() if k not in ("README.md", "lmtune.json"))
    card = ModelCard.load(out / "README.md")  # rendered again with the repo id in its snippets
    assert 'model="org/reviews"' in card.text and 'snapshot_download("org/reviews"' in card.text
    assert _files(model) == before  # the run itself is unchanged
    # what --to wrote loads in transformers.pipeline with lmtune's probabilities
    theirs = _pipeline_probs(out, TEXTS[:2])
    for t, o in zip(theirs, lmtune.load(calibrated_run.run_dir).predict(TEXTS[:2])):
        assert abs(t["pos"] - o["probabilities"]["pos"]) < 1e-4
    assert main(["push", str(calibrated_run.run_dir), "--to", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def _push_cli(run_dir, env: dict, *args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]), **env}
    full = {k: v for k, v in full.items() if v is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", "lmtune", "push", str(run_dir), "org/reviews", *args],
                          env=full, capture_output=True, text=True, timeout=300, check=False)


def test_push_offline_is_an_error_with_exit_2_and_no_traceback(calibrated_run):
    r = _push_cli(calibrated_run.run_dir, {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: push org/reviews: huggingface_hub is in offline mode") and "--to DIR" in r.stderr


@pytest.fixture
def fake_hub_endpoint():
    """A local HTTP server standing in for the Hub's endpoint that answers every request with the
    status in `status` (the test sets it): the real huggingface_hub client meets a real HTTP error."""
    import http.server
    import threading
    status = {"code": 401}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = json.dumps({"error": "refused by the test server"}).encode()
            self.send_response(status["code"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", status
    server.shutdown()


def test_push_http_errors_and_a_missing_token_are_errors_with_exit_2(calibrated_run, fake_hub_endpoint, tmp_path):
    url, status = fake_hub_endpoint
    # no token anywhere (no HF_TOKEN, an empty HF_HOME): the Hub answers 401
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": None}
    r = _push_cli(calibrated_run.run_dir, env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: push org/reviews: no valid Hugging Face token") and "HF_TOKEN" in r.stderr
    status["code"] = 500
    r = _push_cli(calibrated_run.run_dir, {**env, "HF_TOKEN": "hf_test"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: push org/reviews: the Hub answered 500")
    r = _push_cli(calibrated_run.run_dir, {**env, "HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot reach the Hugging Face Hub" in r.stderr
