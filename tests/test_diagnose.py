"""Controllable output and data diagnostics: label-noise search, abstention thresholds,
out-of-scope handling, re-sampling."""
from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest

import lmtune
from lmtune.cli import main
from lmtune.data.splits import resample_indices
from lmtune.evaluate.abstain import abstention_metrics, choose_threshold
from tests.conftest import toy_rows, write_csv


def _flip(rows, every):
    flipped = set(range(3, len(rows), every))
    return [(t, ("neg" if y == "pos" else "pos") if i in flipped else y) for i, (t, y) in enumerate(rows)], flipped


def test_label_noise_search_finds_flipped_labels_and_stays_quiet_on_clean_data(tiny_config, pretrained_tiny, tmp_path, capsys):
    rows = toy_rows(96, 1)
    noisy, flipped = _flip(rows, 8)  # 12 of 96 flipped
    cfg = copy.deepcopy(tiny_config)
    cfg["data"].update(train=str(write_csv(tmp_path / "noisy.csv", noisy)), label_noise_folds=3, drop_label_noise=True)
    cfg["model"]["name"] = pretrained_tiny  # confident learning needs fold models that learn the task
    cfg["train"].update(calibrate=False, epochs=4)
    run = lmtune.train(cfg)
    flagged = [json.loads(line) for line in (run.run_dir / "label_noise.jsonl").read_text().splitlines()]
    lines = {int(r["source"].rsplit(":", 1)[1]) - 2 for r in flagged}  # line 2 holds row 0
    assert len(lines & flipped) >= 0.7 * len(flipped), (sorted(lines), sorted(flipped))
    assert len(lines & flipped) >= 0.7 * len(lines)
    assert all(r["suggested"] != r["label"] for r in flagged)
    audit = {f["check"]: f for f in json.loads((run.run_dir / "audit.json").read_text())}
    assert audit["label_noise"]["severity"] in ("warning", "critical")
    assert run.metrics["train"]["truncation"]["train"]["examples"] == 96 - len(flagged)  # dropped before training
    # clean data: the same search through `lmtune audit` flags (almost) nothing
    clean_cfg = tmp_path / "clean.yaml"
    clean_cfg.write_text(json.dumps({"data": {"train": str(write_csv(tmp_path / "clean.csv", rows)), "dev": cfg["data"]["dev"],
                                              "max_length": 32, "label_noise_folds": 3},
                                     "model": {"name": cfg["model"]["name"]}, "train": cfg["train"]}))
    assert main(["audit", str(clean_cfg)]) == 0
    found = {f["check"]: f for f in json.loads(capsys.readouterr().out)}
    assert len(found.get("label_noise", {"candidates": []})["candidates"]) <= 2


def _synthetic(n=4000, seed=0):
    """Confidences where higher means more often right, and out-of-scope rows with lower ones."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < conf
    oos = rng.uniform(size=n) < 0.2
    conf[oos] = rng.uniform(0.2, 0.8, oos.sum())
    correct[oos] = False
    return conf, np.ones(n, bool), correct, oos


@pytest.mark.parametrize("target,value", [("precision", 0.9), ("coverage", 0.7), ("false_accept", 0.1), ("accuracy_loss", 0.02)])
def test_abstention_threshold_meets_its_target_on_dev(target, value):
    conf, ins, correct, oos = _synthetic()
    t = choose_threshold(conf, ins, correct, oos, target, value)
    m = abstention_metrics(conf, ins, correct, oos, t["threshold"])
    assert t["met"]
    if target == "precision":
        assert m["selective_accuracy"] >= value
        looser = abstention_metrics(conf, ins, correct, oos, np.nextafter(t["threshold"], 0) - 1e-3)
        assert looser["selective_accuracy"] < value or looser["coverage"] == m["coverage"]  # most coverage that meets it
    elif target == "coverage":
        assert value <= m["coverage"] < value + 0.01
    elif target == "accuracy_loss":
        everything = abstention_metrics(conf, ins, correct, oos, -1.0)
        assert everything["in_scope_accuracy"] - value <= m["in_scope_accuracy"]
        stricter = abstention_metrics(conf, ins, correct, oos, np.nextafter(t["threshold"], 2) + 1e-3)
        assert everything["in_scope_accuracy"] - stricter["in_scope_accuracy"] > value  # the most refusal that stays within it
    else:
        assert 1 - m["oos_recall"] <= value and m["oos_recall"] >= 0.85
    # and it generalizes to fresh data drawn the same way
    m2 = abstention_metrics(*_synthetic(seed=1), t["threshold"])
    key = {"precision": "selective_accuracy", "coverage": "coverage"}.get(target)
    if key:
        assert abs(m2[key] - m[key]) < 0.03
    correct[conf.argmax()] = False  # the most confident answer is wrong: precision 1.0 cannot be reached
    unreachable = choose_threshold(conf, ins, correct, oos, "precision", 1.0)
    assert not unreachable["met"] and abstention_metrics(conf, ins, correct, oos, unreachable["threshold"])["coverage"] == 0


def _oos_rows(n, seed):
    """Toy sentiment rows plus out-of-scope rows (no sentiment word at all)."""
    import random
    rng = random.Random(seed)
    filler = ["the", "train", "leaves", "at", "noon", "from", "platform", "two", "weather", "tomorrow"]
    return [(" ".join(rng.choice(filler) for _ in range(rng.randint(3, 9))), "oos") for _ in range(n)]


def test_run_with_a_threshold_abstains_and_reports_out_of_scope(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["dev"] = str(write_csv(tmp_path / "dev_oos.csv", toy_rows(32, 2) + _oos_rows(16, 5)))
    cfg["data"]["test"] = str(write_csv(tmp_path / "test_oos.csv", toy_rows(32, 3) + _oos_rows(16, 6)))
    cfg["abstain"] = {"target": "false_accept", "value": 0.25, "oos_label": "oos"}
    run = lmtune.train(cfg)
    assert run.labels == ["neg", "pos"]  # out-of-scope rows only in dev/test: not a class
    dev = run.metrics["dev"]
    assert dev["oos_recall"] >= 0.75  # the target, on the data it was chosen on
    assert dev["no_abstention"]["oos_recall"] == 0.0 and dev["coverage"] < 1.0
    assert "Abstention / out-of-scope" in (run.run_dir / "report.md").read_text()
    assert (run.run_dir / "coverage.png").is_file()
    loaded = lmtune.load(run.run_dir)
    assert loaded.task.threshold == pytest.approx(run.task.threshold)
    rows = loaded.predict([t for t, _ in _oos_rows(16, 6)] + ["the food was great"])
    abstained = [r for r in rows if r.get("abstained")]
    assert abstained and all(r["label"] == "oos" and r["top_label"] in ("pos", "neg") for r in abstained)
    assert len(abstained) / 16 >= 0.5
    # re-tuning for another target needs no retraining
    t = loaded.tune_abstention(cfg["data"]["dev"], "coverage", 0.9)
    assert t["dev_coverage"] >= 0.9 and loaded.evaluate(cfg["data"]["dev"])["coverage"] >= 0.9


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean():
    from scipy.spatial.distance import mahalanobis

    from lmtune.tasks.classification import mahalanobis_score
    rng = np.random.default_rng(0)
    feats, means = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
    a = rng.normal(size=(5, 5))
    precision = a @ a.T + np.eye(5)
    want = [-min(mahalanobis(f, m, precision) ** 2 for m in means) for f in feats]
    np.testing.assert_allclose(mahalanobis_score(feats, means, precision), want, rtol=1e-9)


def test_mahalanobis_abstention_refuses_out_of_scope_and_survives_save_load_and_onnx(tiny_config, pretrained_tiny, tmp_path):
    from lmtune.export.onnx import export_run
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["name"] = pretrained_tiny
    cfg["data"]["dev"] = str(write_csv(tmp_path / "dev_oos.csv", toy_rows(32, 2) + _oos_rows(16, 5)))
    cfg["data"]["test"] = str(write_csv(tmp_path / "test_oos.csv", toy_rows(32, 3) + _oos_rows(16, 6)))
    cfg["abstain"] = {"target": "false_accept", "value": 0.25, "oos_label": "oos", "score": "mahalanobis"}
    cfg["train"]["epochs"] = 4
    run = lmtune.train(cfg)
    means, precision = run.task.ood["means"], run.task.ood["precision"]
    assert means.shape == (2, run.model.config.hidden_size) and precision.shape == (means.shape[1],) * 2
    dev = run.metrics["dev"]
    assert dev["oos_recall"] >= 0.75 and dev["no_abstention"]["oos_recall"] == 0.0
    assert "Mahalanobis" in (run.run_dir / "report.md").read_text()
    texts = [t for t, _ in _oos_rows(16, 6)] + [t for t, _ in toy_rows(16, 7)]
    first = run.predict(texts)
    assert sum(r.get("abstained", False) for r in first[:16]) >= 8  # out-of-scope rows mostly refused
    loaded = lmtune.load(run.run_dir)
    np.testing.assert_allclose(loaded.task.ood["precision"], precision)
    assert [r["label"] for r in loaded.predict(texts)] == [r["label"] for r in first]
    export_run(run.run_dir)
    onnx = lmtune.load(run.run_dir, backend="onnx")
    assert [r["label"] for r in onnx.predict(texts)] == [r["label"] for r in first]


def test_explicit_out_of_scope_class(tiny_config, pretrained_tiny, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["name"] = pretrained_tiny
    cfg["data"]["train"] = str(write_csv(tmp_path / "train_oos.csv", toy_rows(96, 1) + _oos_rows(48, 4)))
    cfg["data"]["dev"] = str(write_csv(tmp_path / "dev_oos.csv", toy_rows(32, 2) + _oos_rows(16, 5)))
    cfg["data"]["test"] = str(write_csv(tmp_path / "test_oos.csv", toy_rows(32, 3) + _oos_rows(16, 6)))
    cfg["abstain"] = {"oos_label": "oos"}
    run = lmtune.train(cfg)
    assert "oos" in run.labels
    test = run.metrics["test"]
    assert test["oos_recall"] >= 0.8 and test["in_scope_accuracy"] >= 0.8, test


def test_resampling_balances_classes_and_is_seeded():
    labels = ["a"] * 90 + ["b"] * 10
    over = resample_indices(labels, "oversample", 1)
    assert Counter(labels[i] for i in over) == {"a": 90, "b": 90}
    assert set(over) == set(range(100))  # every example kept
    under = resample_indices(labels, "undersample", 1)
    assert Counter(labels[i] for i in under) == {"a": 10, "b": 10}
    assert over == resample_indices(labels, "oversample", 1) and under != resample_indices(labels, "undersample", 2)


def test_classification_only_options_are_refused_for_ner(tmp_path, tiny_model):
    train = tmp_path / "t.conll"
    train.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\nsmiles O\n")
    for section, values in (("abstain", {"score": "mahalanobis"}), ("data", {"train": str(train), "resample": "oversample"})):
        cfg = {"task": "ner", "data": {"train": str(train)}, "model": {"name": tiny_model}, section: values}
        with pytest.raises(lmtune.InputError, match=f"{section}.{next(k for k in values if k != 'train')}"):
            lmtune.train(cfg)
