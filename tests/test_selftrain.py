"""Self-training on data.unlabeled (lmtune.selftrain): the threshold and the class balance from arrays, the
rounds' keep-or-stop rule on fake models, and tiny runs: pseudo_labels.jsonl and the report, a teacher no
student can beat, a threshold that test labels cannot move, a SetFit teacher's student that keeps setfit (pseudo-labels
are not labels), and bad input refused before anything is written."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

import lmtune
from lmtune.config import build_config
from lmtune.data.readers import Example
from lmtune.errors import InputError
from lmtune.selftrain import Model, SelfTrainConfig, choose_threshold, rounds, select
from tests.conftest import toy_rows, write_csv


# ---- the threshold and the selection ----------------------------------------------------------------
def test_the_threshold_is_the_lowest_whose_dev_predictions_reach_the_target():
    conf = np.array([0.95, 0.9, 0.85, 0.75, 0.65, 0.55])
    correct = np.array([True, True, True, True, False, False])
    # at 0.5: 4 of 6 right; at 0.6: 4 of 5 (0.8); at 0.7: 4 of 4
    chosen = choose_threshold(conf, correct, [0.9, 0.5, 0.7, 0.6], target=0.85)
    assert chosen["threshold"] == 0.7 and chosen["dev_precision"] == 1.0 and chosen["dev_examples"] == 4
    assert choose_threshold(conf, correct, [0.5, 0.6, 0.9], target=0.8)["threshold"] == 0.6
    assert [r["threshold"] for r in chosen["grid"]] == [0.5, 0.6, 0.7, 0.9]  # every value's precision is kept
    nothing = choose_threshold(conf, ~correct, [0.5, 0.9], target=0.8)
    assert nothing["threshold"] is None and nothing["dev_examples"] == 0


def test_a_class_the_teacher_over_predicts_takes_only_its_train_share():
    pred = np.array([0] * 8 + [1] * 2)
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.5, 0.91, 0.92])
    balanced = select(pred, conf, 0.9, np.array([10.0, 10.0]), "train")
    # 9 texts pass; each class may take ceil(9 * 0.5) = 5: class 0 its 5 most confident, class 1 both of its
    assert sorted(pred[balanced].tolist()) == [0] * 5 + [1] * 2 and 7 not in balanced
    assert list(conf[balanced]) == sorted(conf[balanced], reverse=True)  # the most confident first
    assert len(select(pred, conf, 0.9, np.array([10.0, 10.0]), "none")) == 9
    assert sorted(pred[select(pred, conf, 0.9, np.array([10.0, 10.0]), "none", max_per_class=1)].tolist()) == [0, 1]
    capped = select(pred, conf, 0.9, np.array([10.0, 10.0]), "train", max_per_round=4)
    assert sorted(pred[capped].tolist()) == [0, 0, 1, 1]  # 4 shared out: 2 each


# ---- the rounds on fake models ----------------------------------------------------------------------
class FakeHooks:
    """Models whose dev metric is given per round; every pool text is predicted 'pos' with confidence 0.95."""

    def __init__(self, devs: list[float]):
        self.devs, self.trained, self.dropped, self.predicted = devs, [], [], []

    def dev_predictions(self, model):
        return np.array([1, 1, 0, 0]), np.array([0.96, 0.97, 0.6, 0.7]), np.array([1, 1, 0, 1])

    def predict(self, model, examples):
        self.predicted.append([ex.source for ex in examples])
        return np.ones(len(examples), dtype=int), np.full(len(examples), 0.95)

    def train(self, round_no, pseudo, teacher):
        self.trained.append([(ex.source, ex.label) for ex in pseudo])
        return Model(round_no, self.devs[round_no])

    def drop(self, model):
        self.dropped.append(model.round)


def test_rounds_keep_a_student_that_improves_dev_and_stop_at_the_first_that_does_not():
    pool = [Example(f"text {i}", None, f"u.csv:{i + 2}") for i in range(6)]
    opts = SelfTrainConfig(rounds=5, thresholds=[0.5, 0.9], target_precision=0.9, balance="none", max_per_round=2)
    hooks = FakeHooks([0.70, 0.80, 0.75, 0.9, 0.9, 0.9])
    best, section, rows = rounds(Model(0, 0.70), pool, ["neg", "pos"], np.array([5.0, 5.0]), opts, "accuracy", hooks)
    assert best.round == 1 and section["final_round"] == 1 and section["pseudo_labels_kept"] == 2
    assert [r["kept"] for r in section["rounds"]] == [True, True, False]  # round 3 never runs
    assert section["stop_reason"] == "round 2: dev accuracy did not improve (0.7500, best 0.8000)"
    assert section["rounds"][1]["threshold"] == 0.9 and section["rounds"][1]["per_class"] == {"pos": 2}
    # round 2's student trains on round 1's pseudo-labels plus its own; the pool shrinks by what was kept
    assert hooks.trained[1][:2] == hooks.trained[0] and len(hooks.trained[1]) == 4
    assert not set(hooks.predicted[1]) & {s for s, _ in hooks.trained[0]}
    assert hooks.dropped == [0, 2]  # the superseded teacher, then the student that did not improve
    assert [(r["round"], r["kept"]) for r in rows] == [(1, True), (1, True), (2, False), (2, False)]
    assert all(r["confidence"] == 0.95 and r["label"] == "pos" and r["source"].startswith("u.csv:") for r in rows)


def test_loss_like_metrics_improve_downwards_and_an_unreachable_target_stops_the_rounds():
    pool = [Example(f"text {i}", None, f"u.csv:{i + 2}") for i in range(4)]
    opts = SelfTrainConfig(rounds=1, thresholds=[0.9], target_precision=0.9)
    best, section, _ = rounds(Model(0, 0.5), pool, ["neg", "pos"], np.array([5.0, 5.0]), opts, "loss", FakeHooks([0.5, 0.4]))
    assert best.round == 1 and section["stop_reason"] == "reached selftrain.rounds (1)"
    strict = SelfTrainConfig(rounds=3, thresholds=[0.5], target_precision=1.0)  # dev precision at 0.5 is 3 of 4
    best, section, rows = rounds(Model(0, 0.5), pool, ["neg", "pos"], np.array([5.0, 5.0]), strict, "accuracy",
                                 FakeHooks([0.5]))
    assert best.round == 0 and not rows and "no threshold in selftrain.thresholds reaches dev precision 1.0" in section["stop_reason"]


# ---- tiny runs --------------------------------------------------------------------------------------
@pytest.fixture
def st_config(tiny_config, tmp_path) -> dict:
    """A weak teacher (16 labeled rows) and 300 unlabeled texts (their labels are ignored)."""
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["train"] = str(write_csv(tmp_path / "few.csv", toy_rows(16, 1)))
    cfg["data"]["unlabeled"] = str(write_csv(tmp_path / "unlabeled.csv", toy_rows(300, 4)))
    cfg["train"]["epochs"] = 15
    cfg["selftrain"] = {"rounds": 2, "target_precision": 0.8}
    return cfg


def test_a_run_with_unlabeled_text_records_its_pseudo_labels_and_reports_them_per_class(st_config):
    run = lmtune.train(st_config)
    rows = [json.loads(line) for line in (run.run_dir / "pseudo_labels.jsonl").read_text().splitlines()]
    section = json.loads((run.run_dir / "results.json").read_text())["selftrain"]
    trained = [r for r in section["rounds"] if r.get("per_class")]
    assert rows and trained and section["labels_ignored"] == 300
    assert {r["round"] for r in rows} == {r["round"] for r in trained}
    for r in rows:
        assert r["label"] in ("neg", "pos") and 0.5 <= r["confidence"] <= 1 and r["source"].startswith(st_config["data"]["unlabeled"])
        line = int(r["source"].rsplit(":", 1)[1])
        assert 2 <= line <= 301 and isinstance(r["kept"], bool)
        assert r["confidence"] >= section["rounds"][r["round"]]["threshold"]  # only texts above the round's threshold
    assert len(rows) == sum(r["pseudo_labels"] for r in section["rounds"])
    assert len({r["source"] for r in rows}) == len(rows)  # a text is pseudo-labeled once
    # the run's model is the best round's: its dev metric is the run's, and the run saved it
    final = section["rounds"][section["final_round"]]
    assert final["kept"] and run.metrics["dev"]["accuracy"] == pytest.approx(final["dev"])
    assert lmtune.load(run.run_dir).evaluate(st_config["data"]["dev"])["accuracy"] == pytest.approx(final["dev"])
    report = (run.run_dir / "report.md").read_text()
    assert "## Self-training" in report and "### Pseudo-labels per class and round" in report
    first = trained[0]
    for label in ("neg", "pos"):
        assert f"| {label} | {first['per_class'].get(label, 0)} |" in report


@pytest.mark.parametrize("reinit", [True, False])
def test_rounds_stop_when_the_student_cannot_beat_the_teacher_on_dev(tiny_config, tmp_path, reinit):
    cfg = copy.deepcopy(tiny_config)  # 96 labeled rows, 10 epochs: a teacher already right on every dev example
    cfg["data"]["unlabeled"] = str(write_csv(tmp_path / "unlabeled.csv", toy_rows(40, 4)))
    cfg["selftrain"] = {"rounds": 3, "reinit": reinit}
    run = lmtune.train(cfg)
    section = json.loads((run.run_dir / "results.json").read_text())["selftrain"]
    assert section["rounds"][0]["dev"] == 1.0
    assert [r["round"] for r in section["rounds"]] == [0, 1] and not section["rounds"][1]["kept"]
    assert section["stop_reason"].startswith("round 1: dev accuracy did not improve")
    assert section["final_round"] == 0 and section["pseudo_labels_kept"] == 0
    assert run.metrics["train"]["steps"] == 120  # the teacher's own run (96 rows / 8 x 10 epochs) is the model
    rows = [json.loads(line) for line in (run.run_dir / "pseudo_labels.jsonl").read_text().splitlines()]
    assert rows and all(r["round"] == 1 and not r["kept"] for r in rows)
    assert not (run.run_dir / "selftrain" / "round-1" / "checkpoints").exists()  # the dropped student's are removed
    # the student's first dev evaluation: from the pretrained weights it starts over, from the teacher's it is right
    events = (run.run_dir / "selftrain" / "round-1" / "events.jsonl").read_text().splitlines()
    first = next(e["dev_accuracy"] for e in map(json.loads, events) if "dev_accuracy" in e)
    assert (first < 1.0) if reinit else (first == 1.0)


def test_test_labels_cannot_move_the_threshold_or_the_pseudo_labels(st_config, tmp_path):
    cfg = copy.deepcopy(st_config)
    cfg["train"]["epochs"] = 8
    cfg["selftrain"]["rounds"] = 1
    first = lmtune.train({**cfg, "run_name": "a"})
    rows = toy_rows(32, 3)
    shuffled = [r[1] for r in rows]
    random.Random(0).shuffle(shuffled)
    cfg["data"]["test"] = str(write_csv(tmp_path / "test_shuffled.csv", [(t, lab) for (t, _), lab in zip(rows, shuffled)]))
    second = lmtune.train({**cfg, "run_name": "b"})
    a, b = (json.loads((r.run_dir / "results.json").read_text())["selftrain"] for r in (first, second))
    assert a["rounds"][1]["threshold"] is not None and a["rounds"] == b["rounds"]
    assert (first.run_dir / "pseudo_labels.jsonl").read_text() == (second.run_dir / "pseudo_labels.jsonl").read_text()
    gold = [[json.loads(line)["gold"] for line in r.run_dir.joinpath("predictions", "test.jsonl").read_text().splitlines()]
            for r in (first, second)]
    assert gold[0] != gold[1]  # the test split the two runs saw did differ


@pytest.mark.slow
def test_a_student_keeps_the_fewshot_method_its_run_decided_on_the_gold_labels(tmp_path):
    """4 gold labels per class make auto pick setfit (fewshot.max_per_class 4); the pseudo-labels take the student's
    classes past 4, yet the student trains with setfit too: pseudo-labels are not labels. Its pairs are sampled
    from labels plus pseudo-labels."""
    from lmtune.config import DEFAULT_MODEL
    from lmtune.models import resolve_model
    from tests.test_fewshot import topic_rows
    data = {name: str(write_csv(tmp_path / f"{name}.csv", topic_rows(n, seed)))
            for name, n, seed in (("train", 4, 1), ("dev", 8, 2), ("unlabeled", 15, 4))}
    run = lmtune.train({"output_dir": str(tmp_path / "runs"), "run_name": "st", "model": {"name": resolve_model(DEFAULT_MODEL)},
                        "data": {**data, "max_length": 32}, "fewshot": {"max_per_class": 4, "iterations": 2},
                        "selftrain": {"rounds": 1, "thresholds": [0.5], "target_precision": 0.5},  # every text above: pseudo-labels
                        "train": {"epochs": 1, "batch_size": 16, "progress": "none", "seed": 1}})
    teacher = json.loads((run.run_dir / "fewshot.json").read_text())
    assert teacher["method"] == "setfit" and teacher["median_per_class"] == 4
    section = json.loads((run.run_dir / "results.json").read_text())["selftrain"]
    pseudo = section["rounds"][1]["pseudo_labels"]
    assert pseudo >= 10  # the student's train split: 8 labels + pseudo-labels, its median class above 4
    student = json.loads((run.run_dir / "selftrain" / "round-1" / "fewshot.json").read_text())
    assert student["method"] == "setfit" and student["median_per_class"] == 4  # the gold split's counts decided it
    assert student["pseudo_labels"] == pseudo and "pseudo-labels" in student["why"]
    assert student["pairs"] == 2 * 2 * (8 + pseudo)  # SetFit's pairs: from labels and pseudo-labels
    from lmtune.analyses.fewshot import section as fewshot_section
    assert f"adds {pseudo} pseudo-labels, which the rule does not count" in fewshot_section(student)


# ---- refusals ---------------------------------------------------------------------------------------
def test_an_unlabeled_file_without_the_text_column_is_refused_with_its_line_and_nothing_written(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    bad = write_csv(tmp_path / "unlabeled.csv", [("a good day",)], header=("sentence",))
    cfg["data"]["unlabeled"] = str(bad)
    with pytest.raises(InputError, match=rf"{bad}: line 2: no column 'text' \(columns are: 'sentence'\)\. "
                                         "Rename the column or set data.text_column"):
        lmtune.train(cfg)
    assert not (Path(cfg["output_dir"]) / cfg["run_name"]).exists()  # nothing written


def test_a_task_without_self_training_and_bad_options_are_refused(tmp_path, tiny_model):
    from tests.test_multilabel import toy_rows as ml_rows
    from tests.test_multilabel import write_sep
    unlabeled = write_csv(tmp_path / "u.csv", [("a good day",)], header=("text",))
    cfg = {"task": "multilabel", "output_dir": str(tmp_path / "runs"), "run_name": "ml", "model": {"name": tiny_model},
           "data": {"train": write_sep(tmp_path / "train.csv", ml_rows(40, 1)), "label_column": "tags",
                    "label_separator": "|", "unlabeled": str(unlabeled)}, "train": {"progress": "none"}}
    with pytest.raises(InputError, match="data.unlabeled: the multilabel task does not support self training"):
        lmtune.train(cfg)
    assert not (tmp_path / "runs" / "ml").exists()
    with pytest.raises(InputError, match="selftrain.reinit false continues from the teacher's weights.*peft.method none"):
        build_config({"peft": {"method": "lora"}, "selftrain": {"reinit": False}})
    with pytest.raises(InputError, match=r"selftrain.thresholds must be confidences in \(0, 1\]"):
        build_config({"selftrain": {"thresholds": [0.5, 1.5]}})
