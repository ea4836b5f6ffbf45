"""Hyperparameter search, cross-validation, ensembles and soups on the tiny random BERT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.serve.app import ServeSettings, create_app
from tests.conftest import toy_rows, write_csv

ROOT = Path(__file__).resolve().parent.parent
SPACE = {"train.lr": [1e-3, 1e-2, "log"], "train.epochs": [1, 3]}


def _config(tmp_path: Path, tiny_model: str, **extra) -> dict:
    data = {"train": str(write_csv(tmp_path / "train.csv", toy_rows(96, 1))),
            "test": str(write_csv(tmp_path / "test.csv", toy_rows(32, 3))), "max_length": 32}
    return {"output_dir": str(tmp_path / "runs"), "data": data, "model": {"name": tiny_model},
            "train": {"batch_size": 8, "head_lr": 3e-3, "progress": "none", "seed": 1}, **extra}


def test_tune_runs_trials_as_run_dirs_prunes_and_summarises(tmp_path, tiny_model, capsys):
    cfg = _config(tmp_path, tiny_model, run_name="study", tune={"space": SPACE, "startup_trials": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(tmp_path / "c.yaml"), "--trials", "5", "--soup"]) == 0
    out = json.loads(capsys.readouterr().out)
    study = tmp_path / "runs" / "study"
    result = json.loads((study / "study.json").read_text())
    assert result["complete"] + result["pruned"] == 5 and len({t["number"] for t in result["trials"]}) == 5
    assert out["best_trial"] == result["best"]["number"]
    best = result["best"]
    assert best["dev"] == max(t["dev"] for t in result["trials"] if t["state"] == "complete")
    assert lmtune.load(best["run_dir"]).metrics["dev"]["accuracy"] == best["dev"]  # an ordinary run dir
    for t in result["trials"]:  # the values tried are the ones trained with
        used = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        assert used["train"]["lr"] == t["params"]["train.lr"] and used["train"]["epochs"] == t["params"]["train.epochs"]
    assert (study / "history.png").stat().st_size > 1000 and "| trial | state |" in (study / "study.md").read_text()
    assert yaml.safe_load((study / "best.yaml").read_text())["train"]["lr"] == best["params"]["train.lr"]
    soup = result["soup"]
    assert soup["members"][0] == best["run_dir"] and soup["dev"]["accuracy"] >= best["dev"]  # greedy: never below the best
    # the study resumes: asking for more trials adds them, numbered on
    assert main(["tune", str(tmp_path / "c.yaml"), "--trials", "6"]) == 0
    assert len(json.loads((study / "study.json").read_text())["trials"]) == 6


def test_default_space_leaves_epochs_to_the_pruner(tiny_model):
    from lmtune.config import build_config
    from lmtune.search.tune import default_space
    space = default_space(build_config({"model": {"name": tiny_model}, "data": {"train": "x.csv"}}))
    assert "train.epochs" not in space and {"train.lr", "train.batch_size"} <= set(space)


def test_pruning_stops_a_bad_trial_early(tmp_path, pretrained_tiny):
    from lmtune.config import build_config
    from lmtune.search.tune import tune
    # trial 0 (enqueued, good) sets the bar; trial 1 (lr far too small to learn) is stopped at its first report
    space = {"train.lr": [1e-7, 1e-2, "log"], "train.head_lr": [1e-7, 1e-2, "log"]}
    cfg = build_config(_config(tmp_path, pretrained_tiny, run_name="s", tune={"space": space},
                               train={"epochs": 4, "batch_size": 8, "progress": "none", "seed": 1}))
    import optuna
    from lmtune.search.tune import _storage, study_dir
    study_dir(cfg).mkdir(parents=True)
    study = optuna.create_study(storage=_storage(cfg, study_dir(cfg)), study_name="s", direction="maximize")
    study.enqueue_trial({"train.lr": 3e-3, "train.head_lr": 3e-3})
    study.enqueue_trial({"train.lr": 1e-7, "train.head_lr": 1e-7})
    result = tune(cfg, 2)
    states = {t["number"]: t["state"] for t in result["trials"]}
    assert states == {0: "complete", 1: "pruned"}
    pruned = next(t for t in result["trials"] if t["number"] == 1)
    assert pruned["examples_seen"] < 4 * 72  # stopped before its 4 epochs
    assert not (Path(pruned["run_dir"]) / "checkpoints").exists()


def test_two_workers_share_one_study_without_duplicating_trials(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, run_name="shared", tune={"space": SPACE, "startup_trials": 2, "pruner": "none"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-m", "lmtune", "tune", str(tmp_path / "c.yaml"), "--trials", "12"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outs]
    study = tmp_path / "runs" / "shared"
    result = json.loads((study / "study.json").read_text())
    done = [t for t in result["trials"] if t["state"] in ("complete", "pruned")]
    assert len(done) == 12 and len({t["run_dir"] for t in done}) == 12
    assert sorted(p.name for p in study.glob("trial-*") if (p / "model" / "lmtune.json").is_file()) == \
        sorted(Path(t["run_dir"]).name for t in done)
    logs = "".join(o[1] for o in outs)
    assert sum("tune: trial" in line and "dev accuracy" in line for line in logs.splitlines()) == 12
    assert all("tune: trial" in o[1] for o in outs), "each worker ran trials"


def test_cv_folds_oof_predictions_and_ensemble(tmp_path, tiny_model, capsys):
    cfg = _config(tmp_path, tiny_model, run_name="cv", train={"epochs": 4, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3,
                                                               "progress": "none", "seed": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3"]) == 0
    assert "3-fold cross-validation" in capsys.readouterr().out
    root = tmp_path / "runs" / "cv"
    r = json.loads((root / "cv.json").read_text())
    assert len(r["folds"]) == 3 and set(r["mean"]["dev"]) >= {"accuracy"} and r["std"]["test"]["accuracy"] >= 0
    oof = [json.loads(line) for line in (root / "oof.jsonl").read_text().splitlines()]
    assert sorted(o["index"] for o in oof) == list(range(r["examples"]))  # every example predicted once, by the fold that held it out
    assert {o["fold"] for o in oof} == {1, 2, 3} and all("probabilities" in o for o in oof)
    seeds = [yaml.safe_load((Path(f["run_dir"]) / "config.yaml").read_text())["train"]["seed"] for f in r["folds"]]
    assert seeds == [1, 2, 3]  # each member its own seed (the split itself is seeded by train.seed)
    e = r["ensemble"]
    assert not e["recalibrated"]  # folds share no dev split none of them trained on
    run = lmtune.load(e["run_dir"])
    preds = run.predict(["the food was good", "really awful day"])
    assert [p["label"] for p in preds] and abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4
    assert run.evaluate(cfg["data"]["test"])["accuracy"] == pytest.approx(e["test"]["accuracy"])


def test_a_stopped_cv_resumes_keeping_its_finished_folds(tmp_path, tiny_model, capsys, monkeypatch):
    import lmtune.search.combine as combine
    cfg = _config(tmp_path, tiny_model, run_name="cv", train={"epochs": 2, "batch_size": 8, "lr": 3e-3, "head_lr": 3e-3,
                                                               "progress": "none", "seed": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    real, trained = combine.train_splits, []

    def stop_at_fold_3(fold_cfg, *a, **kw):
        if fold_cfg.run_name == "fold-3":
            (tmp_path / "runs" / "cv" / "fold-3").mkdir()  # as a process killed before the fold's first checkpoint leaves it
            raise KeyboardInterrupt
        trained.append(fold_cfg.run_name)
        return real(fold_cfg, *a, **kw)
    monkeypatch.setattr(combine, "train_splits", stop_at_fold_3)
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3"]) == 130  # stopped (Ctrl-C) at fold 3
    root = tmp_path / "runs" / "cv"
    assert trained == ["fold-1", "fold-2"] and not (root / "cv.json").exists()
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3"]) == 2  # not without --resume
    assert "add --resume to continue" in capsys.readouterr().err
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "4", "--resume"]) == 2  # other folds: refused
    assert "started with other folds (folds, held_out differ" in capsys.readouterr().err
    kept = (root / "fold-1" / "model").stat().st_mtime_ns

    monkeypatch.setattr(combine, "train_splits", lambda fold_cfg, *a, **kw: trained.append(fold_cfg.run_name) or real(fold_cfg, *a, **kw))
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3", "--resume"]) == 0
    assert trained == ["fold-1", "fold-2", "fold-3"]  # only the stopped fold trained again
    assert (root / "fold-1" / "model").stat().st_mtime_ns == kept
    r = json.loads((root / "cv.json").read_text())
    oof = [json.loads(line) for line in (root / "oof.jsonl").read_text().splitlines()]
    assert len(r["folds"]) == 3 and sorted(o["index"] for o in oof) == list(range(r["examples"]))
    assert lmtune.load(r["ensemble"]["run_dir"]).predict(["the food was good"])[0]["label"]
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3", "--resume"]) == 2  # a finished cv is never rewritten
    assert "is a finished cv" in capsys.readouterr().err


def test_a_new_cv_that_fails_before_any_fold_leaves_nothing(tmp_path, tiny_model, capsys):
    cfg = _config(tmp_path, tiny_model, run_name="cv")
    cfg["model"]["name"] = str(tmp_path / "no-such-model")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["cv", str(tmp_path / "c.yaml"), "--folds", "3"]) == 2
    assert not (tmp_path / "runs" / "cv").exists()


def test_grouped_cv_keeps_groups_in_one_fold(tmp_path, tiny_model):
    from lmtune.config import build_config
    from lmtune.search.combine import _groups, fold_indices
    from lmtune.tasks import get_task
    rows = [(t, y, f"user{i // 4}") for i, (t, y) in enumerate(toy_rows(96, 1))]
    cfg = _config(tmp_path, tiny_model)
    cfg["data"]["train"] = str(write_csv(tmp_path / "g.csv", rows, header=("text", "label", "user")))
    cfg["data"]["group_column"] = "user"
    c = build_config(cfg)
    splits = get_task("classification").read(c)
    pool = splits.train + splits.dev
    groups = _groups(c, pool)
    for fit, held in fold_indices([ex.label for ex in pool], groups, 3, 1):
        assert not {groups[i] for i in fit} & {groups[i] for i in held}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("members")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3))}
    return [lmtune.train({"output_dir": str(d / "runs"), "run_name": f"m{lr}", "data": {**data, "max_length": 32},
                          "model": {"name": tiny_model}, "abstain": {"target": "coverage", "value": 0.9},
                          "train": {"epochs": 6, "batch_size": 8, "lr": lr, "head_lr": lr, "progress": "none", "seed": 1}})
            for lr in (3e-3, 2e-3)]


def test_ensemble_averages_recalibrates_and_serves(tmp_path, two_runs):
    out = tmp_path / "ens"
    assert main(["ensemble", *[str(r.run_dir) for r in two_runs], "--out", str(out), "--weights", "dev"]) == 0
    summary = json.loads((out / "ensemble.json").read_text())
    assert summary["recalibrated"] and summary["abstention_refitted"] and abs(sum(summary["weights"]) - 1) < 1e-6
    run = lmtune.load(out)
    texts = ["the food was good", "really awful day"]
    members = [r.predict(texts) for r in two_runs]
    got = run.predict(texts)
    assert all(abs(sum(g["probabilities"].values()) - 1) < 1e-4 for g in got)
    # with uniform weights and temperature 1 the ensemble's probabilities are the mean of the members'
    uni = tmp_path / "uni"
    from lmtune.search.combine import ensemble
    ensemble([str(r.run_dir) for r in two_runs], uni, dev=None)
    u = lmtune.load(uni)
    u.task.set_state({**u.task.state(), "temperature": 1.0, "threshold": None})
    for i, p in enumerate(u.predict(texts)):
        for lab, v in p["probabilities"].items():
            assert v == pytest.approx((members[0][i]["probabilities"][lab] + members[1][i]["probabilities"][lab]) / 2, abs=1e-4)
    client = TestClient(create_app(ServeSettings(run_dir=str(out), backend="torch", no_auth=True)))
    with client:
        r = client.post("/v1/predict", json={"texts": texts})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    from lmtune.ui.app import UiSettings, create_ui  # the dashboard lists, shows and predicts with it like any run
    ui = TestClient(create_ui(UiSettings(runs_dir=str(tmp_path), workdir=str(tmp_path))), base_url="http://127.0.0.1:7860")
    assert "ens" in {r["run"] for r in ui.get("/api/runs").json()} and ui.get("/run/ens").status_code == 200
    r = ui.post("/api/run/ens/predict", json={"text": texts[0]}, headers={"X-Lmtune-UI": "1"})
    assert r.status_code == 200 and r.json()["label"] == got[0]["label"]


def test_exporting_an_ensemble_exports_each_member_and_runs_on_onnxruntime(tmp_path, two_runs, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", *[str(r.run_dir) for r in two_runs], "--out", str(out), "--weights", "dev"]) == 0
    assert main(["export", str(out), "--prune", "magnitude:0.3"]) == 2  # prune the members, not the ensemble
    assert not (out / "export").exists()
    assert main(["export", str(out)]) == 0
    report = json.loads((out / "export" / "export.json").read_text())
    assert all((Path(r.run_dir) / "export" / "model.onnx").is_file() for r in two_runs)
    assert set(report["members"]) == {str(Path(r.run_dir).resolve()) for r in two_runs}
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-3 and report["onnx_fp32"]["dev"]["accuracy"] == report["pytorch"]["dev"]["accuracy"]
    texts = ["the food was good", "really awful day", "an ordinary afternoon"]
    on_torch, on_onnx = lmtune.load(out).predict(texts), lmtune.load(out, backend="onnx").predict(texts)
    for a, b in zip(on_torch, on_onnx):
        assert a["label"] == b["label"]
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-4 for k in a["probabilities"])


def test_ensemble_and_soup_refuse_mismatched_members(tmp_path, two_runs, tiny_model, capsys):
    other = write_csv(tmp_path / "o.csv", [(t, "x" if y == "pos" else "y") for t, y in toy_rows(64, 5)])
    odd = lmtune.train({"output_dir": str(tmp_path / "runs"), "data": {"train": str(other), "max_length": 32},
                        "model": {"name": tiny_model}, "train": {"epochs": 1, "batch_size": 8, "progress": "none"}})
    assert main(["ensemble", str(two_runs[0].run_dir), str(odd.run_dir), "--out", str(tmp_path / "e")]) == 2
    assert "must share the task and the labels" in capsys.readouterr().err
    assert main(["soup", str(two_runs[0].run_dir), str(odd.run_dir), "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_soup_uniform_and_greedy_make_ordinary_runs(tmp_path, two_runs):
    from lmtune.search.combine import soup
    g = soup([str(r.run_dir) for r in two_runs], tmp_path / "greedy", greedy=True)
    best = max(two_runs, key=lambda r: r.metrics["dev"]["accuracy"])
    assert g["members"][0] == str(best.run_dir) and g["dev"]["accuracy"] >= best.metrics["dev"]["accuracy"]
    u = soup([str(r.run_dir) for r in two_runs], tmp_path / "uniform")
    run = lmtune.load(tmp_path / "uniform")
    sd = [r.model.state_dict() for r in two_runs]
    # the soup's own temperature is folded into its saved output layer (lmtune.fold): multiplied back, the
    # layer is the average of the members' raw layers
    w = run.model.state_dict()["classifier.weight"] * run.task.folded_temperature
    assert w.cpu().allclose((sd[0]["classifier.weight"].cpu() + sd[1]["classifier.weight"].cpu()) / 2, atol=1e-5)
    assert len(u["members"]) == 2 and run.predict(["the food was good"])[0]["label"] in ("pos", "neg", "abstain")
    assert (tmp_path / "uniform" / "metrics.json").is_file() and (tmp_path / "uniform" / "splits.json").is_file()
