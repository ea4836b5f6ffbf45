"""lmtune distill: a trained run teaches a (truncated) student through the task's soft-target loss; the student
is an ordinary run, compared in its report with the teacher and with itself trained on hard labels alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmtune
from lmtune.cli import main
from lmtune.distill import distill
from tests.conftest import toy_rows, write_csv

TRAIN = {"epochs": 6, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("distill-data")
    files = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3))}
    # texts alone: what the teacher labels softly beyond the train split
    files["unlabeled"] = str(write_csv(d / "unlabeled.csv", [(t,) for t, _ in toy_rows(48, 7)], header=("text",)))
    return files


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model, data):
    """A tiny teacher that is confidently right on the toy task."""
    d = tmp_path_factory.mktemp("teacher")
    run = lmtune.train({"output_dir": str(d), "run_name": "teacher", "model": {"name": tiny_model},
                        "data": {k: data[k] for k in ("train", "dev", "test")} | {"max_length": 32}, "train": TRAIN})
    assert run.metrics["test"]["accuracy"] >= 0.9
    return run


def test_the_loss_mixes_the_teachers_soft_targets_with_the_hard_labels():
    from lmtune.tasks import get_task
    task = get_task("classification")
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    teacher_log = torch.log_softmax(torch.tensor([[3.0, -2.0], [-1.0, 2.0], [0.0, 0.0]]) / 2.0, -1)
    batch = {"labels": torch.tensor([0, 1, -100]), "soft_targets": teacher_log}  # the last row is unlabeled
    out = type("Out", (), {"logits": logits})()
    assert task.loss(out, batch) == pytest.approx(float(F.cross_entropy(logits, batch["labels"], reduction="sum",
                                                                        ignore_index=-100)))  # no distillation asked
    task.distill_with(2.0, 0.25)
    student_log = torch.log_softmax(logits / 2.0, -1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # per row, the unlabeled one included
    ce = F.cross_entropy(logits[:2], batch["labels"][:2], reduction="sum")
    expected = 0.25 * 4.0 * kl.sum() + 0.75 * ce
    assert float(task.loss(out, batch)) == pytest.approx(float(expected), rel=1e-5)
    # a row without soft targets (NaN) adds only its hard term
    nan_row = teacher_log.clone()
    nan_row[0] = float("nan")
    assert float(task.loss(out, {**batch, "soft_targets": nan_row})) == pytest.approx(
        float(0.25 * 4.0 * kl[1:].sum() + 0.75 * ce), rel=1e-5)


def test_distill_into_a_truncated_student_with_unlabeled_text_is_an_ordinary_run(tmp_path, teacher, tiny_model, data, capsys):
    out = tmp_path / "runs"
    assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--student-layers", "1", "--unlabeled",
                 data["unlabeled"], "--output_dir", str(out), "--run_name", "student", "--train.epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "cost ratio (student / teacher)" in printed and "hard_only" in printed
    run_dir = out / "student"
    base = json.loads((run_dir / "base_model" / "config.json").read_text())
    assert base["num_hidden_layers"] == 1 and (run_dir / "base_model" / "model.safetensors").is_file()
    student = lmtune.load(run_dir)
    assert student.model.config.num_hidden_layers == 1
    # the teacher's own split: the same dev and test rows, the unlabeled rows added to train
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["sizes"] == {"train": 96 + 48, "dev": 32, "test": 32} and splits["distill"]["unlabeled_rows"] == 48
    d = json.loads((run_dir / "results.json").read_text())["distill"]
    assert d["teacher"]["kind"] == "single" and d["student"]["kind"] == "truncated" and d["student"]["layers"] == "1"
    assert d["teacher"]["parameters"] > d["student"]["parameters"] and d["unlabeled_rows"] == 48
    assert d["cost_ratio"] == pytest.approx(d["student"]["seconds_per_1000"] / d["teacher"]["seconds_per_1000"])
    assert 0 < d["student"]["model_seconds_per_1000"] <= d["student"]["seconds_per_1000"] and d["model_cost_ratio"] > 0
    assert d["teacher"]["accuracy"] == pytest.approx(teacher.metrics["test"]["accuracy"])
    assert d["student"]["accuracy"] == pytest.approx(student.metrics["test"]["accuracy"])
    hard = lmtune.load(d["hard_only"]["run_dir"])  # the same truncated student, hard labels only
    assert hard.model.config.num_hidden_layers == 1 and d["hard_only"]["accuracy"] == pytest.approx(hard.metrics["test"]["accuracy"])
    report = (run_dir / "report.md").read_text()
    assert "## Distillation (teacher, student, student on hard labels alone)" in report and "Cost ratio" in report
    # evaluate, predict and export work on it as on any run
    assert main(["evaluate", str(run_dir), "--data", data["test"]]) == 0
    assert main(["predict", str(run_dir), "--input", data["test"], "--output", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 32
    assert main(["export", str(run_dir)]) == 0
    assert json.loads((run_dir / "export" / "export.json").read_text())["onnx_fp32"]["max_abs_logit_diff"] < 1e-3
    from fastapi.testclient import TestClient

    from lmtune.ui.app import UiSettings, create_ui  # the dashboard lists and shows it like any run
    ui = TestClient(create_ui(UiSettings(runs_dir=str(out), workdir=str(tmp_path))), base_url="http://127.0.0.1:7860")
    assert "student" in {r["run"] for r in ui.get("/api/runs").json()} and ui.get("/run/student").status_code == 200


def test_with_alpha_1_the_student_learns_from_the_soft_targets_alone(tmp_path, teacher, tiny_model):
    """No weight on the hard labels, and the train file's labels flipped: a student that learns the task learned it
    through the soft term (dropped, it learns nothing; trained on the hard labels, the opposite)."""
    flipped = write_csv(tmp_path / "flipped.csv", [(t, "neg" if y == "pos" else "pos") for t, y in toy_rows(96, 1)])
    d = distill(teacher.run_dir, student=tiny_model, alpha=1.0, compare=False,
                overrides={"output_dir": str(tmp_path), "run_name": "soft-only", "data.train": str(flipped)})
    assert d["teacher"]["accuracy"] >= 0.9 and d["student"]["accuracy"] >= 0.85 and "hard_only" not in d
    student = lmtune.load(tmp_path / "soft-only")
    texts = [t for t, _ in toy_rows(16, 9)]
    agree = [a["label"] == b["label"] for a, b in zip(student.predict(texts), teacher.predict(texts))]
    assert sum(agree) >= 14


def test_an_ensemble_teacher_teaches_its_averaged_probabilities(tmp_path, teacher, tiny_model, data):
    from lmtune.distill import with_soft_targets
    from lmtune.search.combine import ensemble
    other = lmtune.train({"output_dir": str(tmp_path), "run_name": "other", "model": {"name": tiny_model},
                          "data": {k: data[k] for k in ("train", "dev", "test")} | {"max_length": 32},
                          "train": {**TRAIN, "epochs": 1, "seed": 2}})
    ensemble([str(teacher.run_dir), str(other.run_dir)], tmp_path / "ens", dev=None)  # not recalibrated: temperature 1
    ens = lmtune.load(tmp_path / "ens")
    texts = ["the food was good", "really awful day"]
    taught = with_soft_targets(ens, ens.task.from_texts(texts), 1.0)
    for ex, p in zip(taught, ens.predict(texts)):  # at T 1 the soft targets are the averaged probabilities
        assert [float(torch.tensor(s).exp()) for s in ex.soft_targets] == pytest.approx(list(p["probabilities"].values()), abs=1e-4)
    d = distill(tmp_path / "ens", student=tiny_model, student_layers=1, compare=False,
                               overrides={"output_dir": str(tmp_path), "run_name": "from-ensemble", "train.epochs": 1})
    assert d["teacher"]["kind"] == "ensemble" and d["teacher"]["layers"] == "2 x 2"
    assert (Path(d["student"]["run_dir"]) / "model" / "lmtune.json").is_file()


def test_bad_unlabeled_rows_and_student_layers_are_refused_before_anything_is_written(tmp_path, teacher, tiny_model, capsys):
    bad = write_csv(tmp_path / "u.csv", [("a fine text", "a"), ("", "b"), ("another", "c")], header=("text", "note"))
    out = tmp_path / "runs"
    common = ["--output_dir", str(out), "--run_name", "s"]
    assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--unlabeled", str(bad), *common]) == 2
    assert f"{bad}: line 3: empty value in column 'text'" in capsys.readouterr().err
    for n in ("0", "3"):
        assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--student-layers", n, *common]) == 2
        assert f"--student-layers {n}: {tiny_model} has 2 encoder layers; give a number from 1 to 2" in capsys.readouterr().err
    assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--alpha", "1.5", *common]) == 2
    assert "--alpha 1.5" in capsys.readouterr().err
    assert not (out / "s").exists()


def test_the_multilabel_loss_is_a_per_label_kl_to_the_teachers_sigmoid_and_skips_missing_targets():
    from lmtune.tasks import get_task
    task = get_task("multilabel")
    task.distill_with(2.0, 0.5)
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    teacher = torch.tensor([[4.0, -4.0, 1.0], [-2.0, 2.0, 0.0]]) / 2.0  # the teacher's logits / T
    labels = torch.tensor([[1.0, 0.0, 1.0], [float("nan")] * 3])  # the second row is unlabeled
    out = type("Out", (), {"logits": logits})()
    p, q = torch.sigmoid(teacher), torch.sigmoid(logits / 2.0)
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))  # Bernoulli KL, per label
    hard = F.binary_cross_entropy_with_logits(logits[:1], labels[:1], reduction="sum")
    got = task.loss(out, {"labels": labels, "soft_targets": teacher})
    assert float(got) == pytest.approx(float(0.5 * 4.0 * kl.sum() + 0.5 * hard), rel=1e-5)
    matched = task.loss(type("Out", (), {"logits": teacher * 2.0})(), {"labels": labels, "soft_targets": teacher})
    assert float(matched) == pytest.approx(float(0.5 * F.binary_cross_entropy_with_logits(teacher[:1] * 2.0, labels[:1],
                                                                                        reduction="sum")), abs=1e-5)


def test_a_multilabel_teacher_distils_into_an_ordinary_multilabel_run(tmp_path, tiny_model):
    from tests.test_multilabel import toy_rows as label_sets
    from tests.test_multilabel import write_sep
    data = {k: write_sep(tmp_path / f"{k}.csv", label_sets(n, s)) for k, n, s in (("train", 64, 1), ("dev", 24, 2), ("test", 24, 3))}
    unlabeled = write_csv(tmp_path / "u.csv", [(t,) for t, _ in label_sets(16, 4)], header=("text",))
    teacher = lmtune.train({"task": "multilabel", "output_dir": str(tmp_path), "run_name": "ml-teacher", "model": {"name": tiny_model},
                            "data": {**data, "label_column": "tags", "label_separator": "|", "max_length": 32},
                            "train": {**TRAIN, "epochs": 2}})
    d = distill(teacher.run_dir, student=tiny_model, student_layers=1, unlabeled=str(unlabeled), compare=False,
                overrides={"output_dir": str(tmp_path), "run_name": "ml-student", "train.epochs": 1})
    assert d["metric"] == "macro_f1" and d["unlabeled_rows"] == 16 and d["student"]["macro_f1"] is not None
    student = lmtune.load(tmp_path / "ml-student")
    assert student.task.name == "multilabel" and isinstance(student.predict(["pizza and a cheap waiter"])[0]["labels"], list)
    assert "## Distillation" in (tmp_path / "ml-student" / "report.md").read_text()
