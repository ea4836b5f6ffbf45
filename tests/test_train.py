"""The training engine on a tiny random BERT: learning, accumulation, early stopping, resume, checkpoints."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.config import TrainConfig
from lmtune.training.batching import epoch_batches, eval_batches
from lmtune.training.checkpoint import Checkpoints, TrainState
from lmtune.training.optim import param_groups
from tests.conftest import toy_rows, write_csv


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_learns_the_toy_task_and_writes_the_run_dir(tiny_config):
    run = lmtune.train(tiny_config)
    losses = [json.loads(line)["train_loss"] for line in (run.run_dir / "history.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert run.metrics["test"]["accuracy"] >= 0.9
    for name in ("config.yaml", "metrics.json", "report.md", "learning_curve.png", "confusion_matrix_test.png",
                 "predictions/test.jsonl", "train.log", "model/model.safetensors", "model/config.json"):
        assert (run.run_dir / name).is_file(), name
    report = (run.run_dir / "report.md").read_text()
    assert "| test |" in report and "![learning curve](learning_curve.png)" in report
    m = run.metrics["test"]
    assert set(m["per_class"]) == {"neg", "pos"} and 0 <= m["macro_f1"] <= 1
    pred = json.loads((run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()[0])
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-4 and pred["label"] in ("neg", "pos")


def test_saved_model_loads_in_plain_transformers_with_identical_logits(tiny_config):
    run = lmtune.train({**tiny_config, "train": {**tiny_config["train"], "epochs": 1}})
    plain = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run.run_dir / "model")
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    texts = ["the food was great", "awful service really"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = run.model.eval()(**enc).logits
        theirs = plain(**enc).logits
    assert torch.equal(ours, theirs)
    reloaded = lmtune.load(run.run_dir).predict(texts)
    probs = torch.softmax(theirs / run.task.temperature, -1)  # probabilities are temperature-calibrated
    for row, p in zip(reloaded, probs):
        assert row["label"] == plain.config.id2label[int(p.argmax())]
        assert abs(row["probabilities"]["pos"] - float(p[1])) < 1e-5


def test_grad_accumulation_is_normalized_over_the_whole_batch(tiny_config):
    # batch of 6 split into 4 micro-batches of sizes 2, 2, 1, 1: the summed-then-divided loss must
    # give exactly the gradient of the whole batch (a per-micro-batch mean would not)
    base = copy.deepcopy(tiny_config)
    base["model"]["dropout"] = 0.0
    base["train"].update(max_steps=1, batch_size=6, warmup_ratio=0.0, max_grad_norm=0.0)
    a = lmtune.train({**base, "run_name": "a"})
    b = lmtune.train({**base, "run_name": "b", "train": {**base["train"], "grad_accum": 4}})
    wa, wb = _weights(a.model), _weights(b.model)
    # Adam's first step moves each weight by about lr * sign(grad): a mis-weighted micro-batch flips
    # signs (differences of ~2 * lr = 2e-2); summation-order rounding stays far below 1e-5
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    before = AutoModelForSequenceClassification.from_pretrained(tiny_config["model"]["name"], num_labels=2)
    assert any((wa[k] - v).abs().max() > 0 for k, v in before.state_dict().items() if k in wa and "classifier" not in k)


def test_early_stopping_fires_and_best_checkpoint_is_restored(tiny_config, tmp_path):
    # dev labels are the opposite of what train teaches: the dev metric peaks early, then falls
    flipped = [(t, "neg" if y == "pos" else "pos") for t, y in toy_rows(32, 2)]
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["dev"] = str(write_csv(tmp_path / "flipped.csv", flipped))
    cfg["train"].update(epochs=20, eval_every=2, patience=2, metric="loss", calibrate=False)
    run = lmtune.train(cfg)
    tr = run.metrics["train"]
    assert tr["stop_reason"].startswith("early stopping")
    assert tr["steps"] < 20 * 12
    evals = [json.loads(x) for x in (run.run_dir / "history.jsonl").read_text().splitlines() if "dev_loss" in x]
    assert tr["best_step"] == min(evals, key=lambda h: h["dev_loss"])["step"]
    assert evals[-1]["step"] == tr["steps"] and evals[-1]["step"] > tr["best_step"]
    # the final model is the best checkpoint, and its dev loss is the best one seen
    assert abs(run.metrics["dev"]["loss"] - tr["best_metric"]) < 1e-5
    best = load_file(run.run_dir / "checkpoints" / f"step-{tr['best_step']:06d}" / "model.safetensors")
    assert all(torch.equal(best[k], v) for k, v in run.model.state_dict().items() if k in best)


class _Crash(Exception):
    pass


def test_resume_mid_epoch_gives_the_same_weights(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=20, eval_every=4, grad_accum=2)  # 12 batches/epoch: crosses an epoch
    full = lmtune.train({**cfg, "run_name": "full"})

    def crash_at_7(state):
        if state.step == 7:
            raise _Crash()

    with pytest.raises(_Crash):
        lmtune.train({**cfg, "run_name": "cut"}, callbacks=(crash_at_7,))
    assert not (full.run_dir.parent / "cut" / "model").exists()  # no half-written model
    resumed = lmtune.train({**cfg, "run_name": "cut"}, resume=True)
    part = resumed.metrics["train"]["resumed"]
    assert part["from_step"] == 4 and part["steps_this_part"] == 16 and part["seconds_this_part"] > 0
    hist = [json.loads(x) for x in (resumed.run_dir / "history.jsonl").read_text().splitlines()]
    # the live file (events.jsonl) restarts from the checkpoint's history: no rows of the crashed part twice
    assert [json.loads(x) for x in (resumed.run_dir / "events.jsonl").read_text().splitlines()] == hist
    step_times = [h["seconds"] for h in hist if "seconds" in h]
    assert len(step_times) == 20  # the first part's steps count too
    assert resumed.metrics["train"]["seconds_per_epoch"] == pytest.approx(sum(step_times) / 20 * 12)
    assert full.metrics["train"]["resumed"] is None
    a, b = _weights(full.model), _weights(resumed.model)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert resumed.metrics["train"]["steps"] == 20
    assert full.metrics["dev"]["accuracy"] == resumed.metrics["dev"]["accuracy"]


def _crash_at(step: int):
    def callback(state):
        if state.step == step:
            raise _Crash()
    return callback


def test_resume_with_a_changed_config_is_refused(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=4, eval_every=2)
    with pytest.raises(_Crash):
        lmtune.train(cfg, callbacks=(_crash_at(3),))
    with pytest.raises(lmtune.InputError, match=r"config differs .*train\.lr"):
        lmtune.train({**cfg, "train": {**cfg["train"], "lr": 1e-5}}, resume=True)
    with pytest.raises(lmtune.InputError, match="already exists"):
        lmtune.train(cfg)


def test_resume_never_rewrites_a_finished_run(tiny_config):
    """Defect 5: a finished run A and a newer run killed before its first checkpoint; --resume must
    not pick A (it used to re-finalize it and rewrite its metrics.json)."""
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=4, eval_every=2)
    done = lmtune.train({**cfg, "run_name": "a"})
    metrics = (done.run_dir / "metrics.json").read_bytes()
    with pytest.raises(_Crash):
        lmtune.train({**cfg, "run_name": "b"}, callbacks=(_crash_at(1),))
    assert not (done.run_dir.parent / "b").exists()  # nothing to resume: its half-written dir is removed
    with pytest.raises(lmtune.InputError, match=r"no unfinished run .*finished"):
        lmtune.train({**cfg, "run_name": None}, resume=True)
    with pytest.raises(lmtune.InputError, match=r"is a finished run"):
        lmtune.train(cfg, resume=str(done.run_dir))
    assert (done.run_dir / "metrics.json").read_bytes() == metrics
    # an unfinished run is resumed, and only that one
    with pytest.raises(_Crash):
        lmtune.train({**cfg, "run_name": "c"}, callbacks=(_crash_at(3),))
    resumed = lmtune.train({**cfg, "run_name": None}, resume=True)
    assert resumed.run_dir.name == "c" and resumed.metrics["train"]["steps"] == 4
    assert (done.run_dir / "metrics.json").read_bytes() == metrics


def test_dev_is_predicted_once_after_training(tiny_config, monkeypatch):
    from lmtune.recipe import context
    calls = []
    real = context.predict_outputs

    def counting(model, features, collate, unbatch, device, desc, *a, **k):
        calls.append(desc)
        return real(model, features, collate, unbatch, device, desc, *a, **k)

    monkeypatch.setattr(context, "predict_outputs", counting)
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=4, eval_every=2)
    lmtune.train(cfg)
    assert calls.count("eval dev") == 2 + 1  # two evaluations in the loop, one pass for calibration + metrics
    assert calls.count("eval test") == 1


def test_runs_started_in_the_same_second_get_distinct_directories(tiny_config, monkeypatch):
    from lmtune.api import as_config
    from lmtune.artifacts import resolve_run_dir
    cfg = as_config({**tiny_config, "run_name": None})
    first, second = resolve_run_dir(cfg, False), resolve_run_dir(cfg, False)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)


def test_crash_during_checkpoint_save_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = Checkpoints(tmp_path / "ck")
    ck.save(model, opt, sched, TrainState(step=3), is_best=True)
    saved = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save

    def exploding_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        ck.save(model, opt, sched, TrainState(step=6), is_best=True)
    monkeypatch.undo()
    assert ck.pointer() == {"last": "step-000003", "best": "step-000003"}
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")] == ["step-000003"]
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    state = ck.load_state(fresh, torch.optim.AdamW(fresh.parameters()),
                          torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(fresh.parameters()), lambda s: 1.0))
    assert state.step == 3
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_param_groups_skip_decay_on_bias_and_norm_and_decay_lr_by_layer(tiny_model):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    cfg = TrainConfig(lr=1e-3, head_lr=1e-2, layer_lr_decay=0.5, weight_decay=0.1)
    groups = param_groups(model, cfg)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert where[id(named["bert.encoder.layer.0.attention.output.LayerNorm.weight"])]["weight_decay"] == 0
    assert where[id(named["bert.encoder.layer.1.intermediate.dense.bias"])]["weight_decay"] == 0
    assert where[id(named["bert.encoder.layer.1.intermediate.dense.weight"])]["weight_decay"] == 0.1
    assert where[id(named["classifier.weight"])]["lr"] == 1e-2
    assert where[id(named["bert.pooler.dense.weight"])]["lr"] == 1e-3
    assert where[id(named["bert.encoder.layer.1.output.dense.weight"])]["lr"] == 5e-4
    assert where[id(named["bert.encoder.layer.0.output.dense.weight"])]["lr"] == 2.5e-4
    assert where[id(named["bert.embeddings.word_embeddings.weight"])]["lr"] == 1.25e-4
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_freezing_keeps_weights_fixed(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["model"].update(freeze_embeddings=True, freeze_layers=1)
    cfg["train"].update(max_steps=3)
    run = lmtune.train(cfg)
    before = AutoModelForSequenceClassification.from_pretrained(cfg["model"]["name"], num_labels=2).state_dict()
    after = run.model.state_dict()
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(before["bert.encoder.layer.0.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"])
    assert not torch.equal(before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"])
    assert run.metrics["train"]["trainable_params"] < run.metrics["train"]["total_params"]


def test_truncation_is_counted(tiny_config, tmp_path):
    long_rows = [(" ".join(["good"] * 50), "pos"), (" ".join(["bad"] * 50), "neg")] + toy_rows(40, 5)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["train"] = str(write_csv(tmp_path / "long.csv", long_rows))
    cfg["data"]["max_length"] = 16
    cfg["train"].update(max_steps=2)
    run = lmtune.train(cfg)
    assert run.metrics["train"]["truncation"]["train"]["truncated"] >= 2
    assert "truncated to max_length 16: train" in (run.run_dir / "report.md").read_text()


def test_epoch_batches_cover_every_example_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=500).tolist()
    grouped = epoch_batches(lengths, 16, seed=1, epoch=0)
    plain = epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(500))
    assert epoch_batches(lengths, 16, seed=1, epoch=0) == grouped
    assert epoch_batches(lengths, 16, seed=1, epoch=1) != grouped

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded(grouped) < 0.7 * padded(plain)
    ev = eval_batches(lengths, tokens_per_batch=512)
    assert sorted(i for b in ev for i in b) == list(range(500))
    assert all(max(lengths[i] for i in b) * len(b) <= 512 for b in ev if len(b) > 1)


def test_temperature_scaling_lowers_ece_on_an_overconfident_model():
    from lmtune.evaluate.calibration import ece, fit_temperature, softmax
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, size=2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), gold] += 1.0  # informative but noisy...
    logits *= 6.0  # ...and far too confident
    t = fit_temperature(logits, gold)
    assert t > 2.0
    assert ece(softmax(logits, t), gold) < 0.5 * ece(softmax(logits), gold)
    assert (softmax(logits, t).argmax(-1) == logits.argmax(-1)).all()  # labels never change


def test_ece_matches_its_definition_and_the_noise_band_separates_calibrated_from_overconfident():
    from lmtune.evaluate.calibration import ece, ece_noise
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, size=900)
    probs = np.stack([conf, 1 - conf], 1)
    gold = np.where(rng.random(900) < conf, 0, 1)  # right with probability = confidence: calibrated
    edges = np.linspace(0, 1, 16)
    by_hand = sum(((conf > lo) & (conf <= hi)).mean() * abs((gold[(conf > lo) & (conf <= hi)] == 0).mean() - conf[(conf > lo) & (conf <= hi)].mean())
                  for lo, hi in zip(edges[:-1], edges[1:]) if ((conf > lo) & (conf <= hi)).any())
    assert abs(ece(probs, gold) - by_hand) < 1e-12
    mean, p95 = ece_noise(probs)
    assert 0.005 < mean < p95 < 0.08  # a calibrated model still scores above 0 on 900 examples
    assert ece(probs, gold) <= p95
    overconfident = np.where(rng.random(900) < conf - 0.2, 0, 1)  # 20 points less accurate than it claims
    assert ece(probs, overconfident) > 2 * p95


def test_run_saves_the_temperature_and_predict_uses_it(tiny_config):
    # 6 epochs: overconfident enough that the temperature lowers the held-out dev ECE, so it is applied
    run = lmtune.train({**tiny_config, "train": {**tiny_config["train"], "epochs": 6}})
    t = run.task.temperature
    state = json.loads((run.run_dir / "model" / "lmtune.json").read_text())["task_state"]
    assert t != 1.0 and run.task.calibration["applied"] and state["temperature"] == pytest.approx(t)
    assert (run.run_dir / "reliability.png").is_file() and "ECE before" in (run.run_dir / "report.md").read_text()
    loaded = lmtune.load(run.run_dir)
    assert loaded.task.temperature == pytest.approx(t)
    plain = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run.run_dir / "model")
    with torch.no_grad():
        logits = plain(**tok(["the food was great"], return_tensors="pt")).logits[0]
        raw = run.model.eval()(**tok(["the food was great"], return_tensors="pt")).logits[0]
    # the temperature is folded into the saved weights: plain transformers' softmax is the calibrated one
    assert torch.allclose(logits, raw / t, atol=1e-4)
    expected = torch.softmax(logits, -1)
    got = loaded.predict(["the food was great"])[0]["probabilities"]
    assert got["pos"] == pytest.approx(float(expected[1]), abs=1e-5)


def _hist(losses, dev, metric="accuracy", every=5):
    h = [{"step": i + 1, "train_loss": v, "grad_norm": 1.0} for i, v in enumerate(losses)]
    h += [{"step": (k + 1) * every, f"dev_{metric}": v} for k, v in enumerate(dev)]
    return sorted(h, key=lambda r: r["step"])


def test_fit_diagnosis_names_each_pathology_and_stays_quiet_on_a_healthy_curve():
    from lmtune.diagnose import diagnose
    falling = list(np.linspace(1.0, 0.1, 40))
    kinds = lambda findings: {f["kind"] for f in findings}  # noqa: E731
    assert kinds(diagnose(_hist(falling, [0.6, 0.7, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9]), "accuracy", 0.5)) == set()
    assert "overfitting" in kinds(diagnose(_hist(falling, [0.6, 0.8, 0.9, 0.85, 0.8, 0.78, 0.75, 0.7]), "accuracy"))
    assert "underfitting" in kinds(diagnose(_hist([0.69] * 40, [0.5] * 8), "accuracy", 0.5))
    assert "divergence" in kinds(diagnose(_hist(falling[:20] + [float("nan")], [0.6, 0.7]), "accuracy"))
    spiky = falling[:25] + [5.0] + falling[26:]
    assert "loss_spikes" in kinds(diagnose(_hist(spiky, [0.6, 0.7, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9]), "accuracy"))
    assert "oscillation" in kinds(diagnose(_hist(falling, [0.6, 0.8, 0.6, 0.8, 0.6, 0.8, 0.6, 0.8]), "accuracy"))
    for f in diagnose(_hist([0.69] * 40, [0.5] * 8), "accuracy", 0.5):
        assert f["advice"] and f["evidence"]


def test_a_far_too_high_learning_rate_is_diagnosed_and_the_run_ends_cleanly(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(lr=1e4, head_lr=1e4, epochs=3, max_grad_norm=0.0, warmup_ratio=0.0, calibrate=False, eval_every=1)
    try:
        run = lmtune.train(cfg)
    except lmtune.InputError as e:  # diverged before any good checkpoint: a clear error with the fix
        assert "diverged" in str(e) and "lower train.lr" in str(e)
        return
    assert "non-finite" in run.metrics["train"]["stop_reason"]
    kinds = {f["kind"] for f in run.metrics["diagnosis"]}
    assert "divergence" in kinds, run.metrics["diagnosis"]
    assert any("Lower train.lr" in f["advice"] for f in run.metrics["diagnosis"])
    assert "## Fit diagnosis" in (run.run_dir / "report.md").read_text()
    probs = run.predict(["the food was great"])[0]["probabilities"]
    assert all(np.isfinite(v) for v in probs.values()), (probs, run.metrics["train"]["stop_reason"])


def test_class_weights_and_focal_loss(tmp_path):
    from types import SimpleNamespace

    from lmtune.config import build_config
    from lmtune.tasks import get_task
    rows = [("good " + str(i), "pos") for i in range(30)] + [("bad " + str(i), "neg") for i in range(10)]
    train = str(write_csv(tmp_path / "imb.csv", rows))
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.4]])
    batch = {"labels": torch.tensor([0, 1, 1])}
    out = SimpleNamespace(logits=logits)
    plain = get_task("classification")
    plain.read(build_config({"data": {"train": train}}))
    assert plain.loss(out, batch).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item())
    weighted = get_task("classification")
    splits = weighted.read(build_config({"data": {"train": train}, "train": {"class_weights": "auto"}}))
    w = splits.info["class_weights"]
    assert w["neg"] == pytest.approx(3 * w["pos"], rel=1e-3)  # 10 vs 30 examples in the file, split stratified
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert weighted.loss(out, batch).item() == pytest.approx((ce * torch.tensor([w["neg"], w["pos"], w["pos"]])).sum().item(), rel=1e-4)
    focal = get_task("classification")
    focal.read(build_config({"data": {"train": train}, "train": {"focal_gamma": 2.0}}))
    p = torch.exp(-ce)
    assert focal.loss(out, batch).item() == pytest.approx((ce * (1 - p) ** 2).sum().item(), rel=1e-5)
    assert focal.loss(out, batch).item() < plain.loss(out, batch).item()
