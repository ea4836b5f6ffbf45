"""Active learning (lmtune label): the query strategies on constructed cases, the batch files, the Label Studio
round trip, the import's grown train file and retrain, and the learning curve."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import lmtune
from lmtune import active
from lmtune.active import strategies
from lmtune.active.files import labeling_config_path, read_labeled
from lmtune.active.strategies import PoolView
from lmtune.artifacts import RunDir
from lmtune.cli import main
from lmtune.errors import InputError
from lmtune.tasks.base import LabelScores
from tests.conftest import toy_rows, write_csv


def view(probs, exclusive=True, **kw) -> PoolView:
    return PoolView(LabelScores(np.asarray(probs, dtype=np.float64), exclusive), **kw)


def picked(picks) -> list[int]:
    return [i for i, _ in picks]


# ---- strategies --------------------------------------------------------------------------------
def test_entropy_and_margin_pick_the_uncertain_rows():
    probs = [[0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05], [0.5, 0.49, 0.01]]
    assert picked(strategies.entropy(view(probs), 2)) == [1, 3]
    assert picked(strategies.margin(view(probs), 2)) == [1, 3]  # the smallest gap between the two best first
    assert picked(strategies.margin(view(probs), 1)) == [1]


def test_the_multilabel_forms_score_each_labels_decision():
    probs = [[0.99, 0.01], [0.5, 0.02], [0.97, 0.75]]
    assert picked(strategies.entropy(view(probs, exclusive=False), 1)) == [1]
    pool = PoolView(LabelScores(np.array(probs), False, thresholds=np.array([0.5, 0.6])))
    assert picked(strategies.margin(pool, 2)) == [1, 2]  # both sit on a threshold


def test_coreset_picks_the_points_far_from_the_labeled_ones_and_from_each_other():
    labeled = np.zeros((3, 2), np.float32)
    pool_x = np.array([[0.1, 0], [10, 0], [10.2, 0], [0, 5], [0.2, 0.1]], np.float32)
    pool = view(np.full((5, 2), 0.5), embed_pool=lambda: pool_x, embed_labeled=lambda: labeled)
    picks = strategies.coreset(pool, 2)
    assert picked(picks) == [2, 3]  # the farthest, then the farthest from it and the labeled rows (not its neighbour 1)
    assert picks[0][1] == pytest.approx(10.2, rel=1e-4)


def test_random_is_seeded():
    probs = np.full((50, 2), 0.5)
    assert picked(strategies.random(view(probs, seed=3), 10)) == picked(strategies.random(view(probs, seed=3), 10))
    assert picked(strategies.random(view(probs, seed=3), 10)) != picked(strategies.random(view(probs, seed=4), 10))


def test_badge_picks_uncertain_and_diverse_rows():
    rng = np.random.default_rng(0)
    h = np.concatenate([np.tile([[5.0, 5.0, 0, 0]], (5, 1)), rng.normal(size=(3, 4))]).astype(np.float32)
    uncertain = PoolView(LabelScores(np.full((8, 2), 0.5), True), seed=0, penultimate=lambda: h)
    picks = picked(strategies.badge(uncertain, 4))
    assert picks[0] in range(5)  # the longest gradient first
    assert sorted(picks[1:]) == [5, 6, 7]  # then not the copies of it (entropy would take all five)
    certain = np.array([[1.0, 0.0]] * 6 + [[0.5, 0.5]] * 4)  # a zero gradient: nothing to learn from these
    h = rng.normal(size=(10, 4)).astype(np.float32)
    picks = picked(strategies.badge(PoolView(LabelScores(certain, True), seed=0, penultimate=lambda: h), 4))
    assert sum(i < 6 for i in picks) <= 1  # the certain rows all sit at the origin: one point at most


# ---- the loop on a run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_model) -> dict:
    d = tmp_path_factory.mktemp("active")
    train = write_csv(d / "train.csv", toy_rows(40, 1))
    pool = write_csv(d / "pool.csv", [(t,) for t, _ in toy_rows(30, 7)], header=("text",))
    cfg = {"output_dir": str(d / "runs"), "run_name": "seed", "data": {"train": str(train), "max_length": 32},
           "model": {"name": tiny_model}, "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}}
    run = lmtune.train(cfg)
    return {"dir": d, "run": Path(run.run_dir), "train": train, "pool": pool, "train_bytes": train.read_bytes()}


def test_a_batch_has_the_pool_lines_suggestions_and_is_recorded(loop):
    rec = active.query(loop["run"], loop["pool"], 5, "entropy", "csv")
    rows = list(csv.DictReader(open(rec["file"], encoding="utf-8")))
    pool_lines = open(loop["pool"], encoding="utf-8").read().splitlines()
    assert len(rows) == 5
    for r in rows:
        assert pool_lines[int(r["line"]) - 1] == r["text"]  # the pool file's own line
        assert r["suggestion"] in ("neg", "pos") and 0.5 <= float(r["confidence"]) <= 1 and r["label"] == ""
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    state = json.loads(RunDir(loop["run"]).active.read_text())
    assert state["batches"][0]["strategy"] == "entropy" and len(state["batches"][0]["sources"]) == 5
    assert state["curve"][0]["run"] == "seed" and state["curve"][0]["labels"] > 0
    again = active.query(loop["run"], loop["pool"], 5, "coreset", "jsonl")  # the rows asked before are not asked again
    assert not {r["source"] for r in again["rows"]} & {r["source"] for r in rec["rows"]}
    badge = active.query(loop["run"], loop["pool"], 3, "badge", "csv", seed=1)
    assert len({r["source"] for r in badge["rows"]}) == 3
    assert "## Active learning" in RunDir(loop["run"]).report.read_text()


def annotate(tasks_path: Path, labels: dict[int, str]) -> None:
    """What Label Studio's JSON export gives for the tasks: each annotated task with annotations[].result."""
    tasks = json.loads(tasks_path.read_text())
    for i, t in enumerate(tasks):
        t["id"] = i + 1
        if i in labels:
            t["annotations"] = [{"id": 100 + i, "was_cancelled": False, "result": [
                {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [labels[i]]}}]}]
    tasks_path.write_text(json.dumps(tasks, indent=2))


def test_label_studio_export_round_trips_into_train_rows_and_retrains(loop, capsys):
    rec = active.query(loop["run"], loop["pool"], 4, "margin", "label-studio")
    path = Path(rec["file"])
    tasks = json.loads(path.read_text())
    pred = tasks[0]["predictions"][0]
    assert pred["result"][0]["type"] == "choices" and pred["result"][0]["value"]["choices"][0] in ("neg", "pos")
    assert {"text", "line"} <= set(tasks[0]["data"]) and 0 <= pred["score"] <= 1
    xml = labeling_config_path(path).read_text()
    assert '<Choices name="label" toName="text"' in xml and '<Choice value="pos"/>' in xml and 'value="$text"' in xml
    answers = {0: "pos", 1: "neg", 2: "pos"}  # the fourth task left unannotated
    annotate(path, answers)
    assert main(["label", str(loop["run"]), "--import", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 labeled rows (1 not labeled" in out
    state = json.loads(RunDir(loop["run"]).active.read_text())
    imp = state["imports"][-1]
    grown = list(csv.DictReader(open(imp["train_file"], encoding="utf-8")))
    assert {(r["text"], r["label"]) for r in grown[-3:]} == {(tasks[i]["data"]["text"], lab) for i, lab in answers.items()}
    assert loop["train"].read_bytes() == loop["train_bytes"]  # the user's train file is untouched
    new_run = Path(imp["run_dir"])
    assert new_run.name == "seed-al1" and RunDir(new_run).finished()
    new_state = json.loads(RunDir(new_run).active.read_text())
    assert [p["run"] for p in new_state["curve"]] == ["seed", "seed-al1"]
    assert new_state["curve"][1]["labels"] == new_state["curve"][0]["labels"] + 3  # the dev rows stay where they were
    assert RunDir(new_run).active_curve.is_file() and "active_curve.png" in RunDir(new_run).report.read_text()
    asked = {s for b in new_state["batches"] for s in b["sources"]}
    nxt = active.query(new_run, loop["pool"], 3, "random", "csv")  # the loop goes on from the retrained run
    assert not {active.loop._key(r["source"]) for r in nxt["rows"]} & asked


def _label_studio_export(tasks: list[dict], answers: dict[int, list[tuple[bool, str]]]) -> list[dict]:
    """What Label Studio's JSON export gives for imported tasks, field for field as its docs show an annotated task
    ("Label Studio JSON format of annotated tasks", docs/source/includes/task_format.md): the task's id, project and
    timestamps, its data and predictions as imported, and per annotation its id, result items (each with its own id),
    was_cancelled, ground_truth, lead_time, result_count, task and completed_by. answers: task index -> the
    annotations in the order made, (cancelled, label)."""
    out = []
    for i, t in enumerate(tasks):
        task_id = 101 + i
        pred = t["predictions"][0]["result"][0]
        annotations = [{"id": 1000 + 10 * i + k,
                        "result": [] if cancelled else [{"from_name": pred["from_name"], "id": f"r{i}x{k}", "to_name": pred["to_name"],
                                                         "type": "choices", "value": {"choices": [label]}, "origin": "manual"}],
                        "was_cancelled": cancelled, "ground_truth": False, "created_at": f"2024-05-0{k + 1}T10:00:00.000000Z",
                        "updated_at": f"2024-05-0{k + 1}T10:00:00.000000Z", "lead_time": 3.5, "result_count": 0,
                        "task": task_id, "completed_by": 1}
                       for k, (cancelled, label) in enumerate(answers.get(i, []))]
        out.append({"id": task_id, "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-02T10:00:00.000000Z",
                    "project": 7, "data": t["data"], "annotations": annotations,
                    "predictions": [{**p, "created_ago": "3 hours"} for p in t["predictions"]], "drafts": []})
    return out


def test_label_studio_tasks_match_their_labeling_config_and_a_documented_export_imports(loop, tmp_path):
    """Label Studio's documented contract ("Import pre-annotated data"): a JSON array of tasks, each with `data`
    holding what the labeling config's object tags read ($text) and `predictions`, each a `model_version`, a `score`
    and `result` items whose from_name / to_name name the config's control and object tags, whose type is the control
    tag's (choices) and whose value.choices are among its <Choice> values. Then the project's export (the annotated
    task format) comes back: the last submitted, not cancelled annotation of each task counts."""
    import xml.etree.ElementTree as ET
    rec = active.query(loop["run"], loop["pool"], 3, "entropy", "label-studio")
    path = Path(rec["file"])
    tasks = json.loads(path.read_text())
    view = ET.fromstring(labeling_config_path(path).read_text())
    objects = {e.get("name"): e.get("value") for e in view if e.tag == "Text"}
    controls = {e.get("name"): e for e in view if e.tag == "Choices"}
    assert view.tag == "View" and objects["text"] == "$text" and len(controls) == 1
    assert isinstance(tasks, list) and len(tasks) == 3
    for t in tasks:
        assert {v[1:] for v in objects.values()} <= set(t["data"]) and isinstance(t["data"]["text"], str)
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in t["data"].values())  # plain JSON values
        (pred,) = t["predictions"]
        assert isinstance(pred["model_version"], str) and 0 <= pred["score"] <= 1
        (item,) = pred["result"]
        control = controls[item["from_name"]]
        assert item["to_name"] == control.get("toName") and item["to_name"] in objects
        assert item["type"] == control.tag.lower()
        assert control.get("choice") == "single" and len(item["value"]["choices"]) == 1
        assert set(item["value"]["choices"]) <= {c.get("value") for c in control if c.tag == "Choice"}
    suggested = [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks]
    flip = {"pos": "neg", "neg": "pos"}
    # task 0: the pre-annotation accepted; task 1: skipped once, then labeled, then corrected (the last counts);
    # task 2: only skipped (not labeled yet)
    export = tmp_path / "project-7-at-2024-05-02.json"
    export.write_text(json.dumps(_label_studio_export(tasks, {0: [(False, suggested[0])],
                                                              1: [(True, ""), (False, suggested[1]), (False, flip[suggested[1]])],
                                                              2: [(True, "")]}), indent=2), encoding="utf-8")
    items, skipped = read_labeled(export, ["neg", "pos"], exclusive=True)
    assert [(it.text, it.labels) for it in items] == [(tasks[0]["data"]["text"], [suggested[0]]),
                                                      (tasks[1]["data"]["text"], [flip[suggested[1]]])]
    assert skipped == 1 and items[1].where.startswith(f"{export}: line ")
    record = active.import_labeled(loop["run"], export, train_out=tmp_path / "grown.csv", train=False)
    assert (record["rows"], record["skipped"]) == (2, 1)
    grown = list(csv.DictReader(open(tmp_path / "grown.csv", encoding="utf-8")))
    assert [(r["text"], r["label"]) for r in grown[-2:]] == [(it.text, it.labels[0]) for it in items]


def test_bad_import_rows_name_their_line_and_nothing_is_written(loop, tmp_path, capsys):
    bad = write_csv(tmp_path / "bad.csv", [("fine text", "pos"), ("other text", "meh")])
    with pytest.raises(InputError, match=r"bad.csv: line 3: label 'meh' is not one of the run's labels"):
        active.import_labeled(loop["run"], bad, train=False)
    ls = tmp_path / "export.json"
    ls.write_text('[\n  {"data": {"text": "a"}, "annotations": [{"result": []}]},\n  {"data": {"text": "b"},\n'
                  '   "annotations": [{"result": [{"type": "choices", "value": {"choices": ["nope"]}}]}]}\n]\n')
    with pytest.raises(InputError, match=r"export.json: line 2: 0 labels"):
        read_labeled(ls, ["neg", "pos"], exclusive=True)
    ls.write_text(ls.read_text().replace('"result": []', '"result": [{"type": "choices", "value": {"choices": ["pos"]}}]'))
    with pytest.raises(InputError, match=r"export.json: line 3: label 'nope'"):
        read_labeled(ls, ["neg", "pos"], exclusive=True)
    before = active.read_state(loop["run"])["imports"]
    assert main(["label", str(loop["run"]), "--import", str(bad)]) == 2
    assert "line 3" in capsys.readouterr().err
    assert active.read_state(loop["run"])["imports"] == before


def test_import_never_overwrites_a_file_and_no_train_prints_the_command(loop, tmp_path, capsys):
    good = write_csv(tmp_path / "good.csv", [("a brand new lovely text", "pos")])
    with pytest.raises(InputError, match="never overwrites"):
        active.import_labeled(loop["run"], good, train_out=loop["train"], train=False)
    assert loop["train"].read_bytes() == loop["train_bytes"]
    out = tmp_path / "grown.csv"
    assert main(["label", str(loop["run"]), "--import", str(good), "--train-out", str(out), "--no-train"]) == 0
    printed = capsys.readouterr().out
    train_rows = json.loads(RunDir(loop["run"]).splits.read_text())["sizes"]["train"]
    assert "retrain: lmtune train " in printed and out.read_text().count("\n") == 1 + train_rows + 1  # header, train split, new
    config = printed.split("retrain: lmtune train ")[1].strip()
    import yaml
    data = yaml.safe_load(Path(config).read_text())["data"]
    assert data["train"] == str(out.resolve()) and Path(data["dev"]).is_file()


def test_cold_start_picks_representatives_and_suggests_by_label_names(tmp_path, capsys):
    rows = [("the food was lovely and great",), ("awful broken service, terrible",), ("great superb happy day",),
            ("horrible sad ugly movie",), ("wonderful lovely fine",), ("bad poor awful",)]
    pool = write_csv(tmp_path / "pool.csv", rows, header=("text",))
    out = tmp_path / "first.csv"
    assert main(["label", "--cold", "--pool", str(pool), "--batch", "3", "--labels", "positive,negative",
                 "--out", str(out)]) == 0
    batch = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(batch) == 3 and len({r["line"] for r in batch}) == 3
    assert all(r["suggestion"] in ("positive", "negative") for r in batch)
    assert json.loads((tmp_path / "first.csv.active.json").read_text())["strategy"] == "kmeans"
    for r in batch:
        r["label"] = r["suggestion"]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(batch[0]))
        w.writeheader()
        w.writerows(batch)
    assert main(["label", "--import", str(out), "--train-out", str(tmp_path / "train.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "train.csv", encoding="utf-8")))) == 3


# ---- the dashboard's labeling page -----------------------------------------------------------------
def test_the_labeling_routes_are_guarded_and_save_corrections(loop, monkeypatch):
    from fastapi.testclient import TestClient

    from lmtune.ui.app import UiSettings, create_ui
    rec = active.query(loop["run"], loop["pool"], 3, "entropy", "csv")
    name = loop["run"].name
    settings = dict(runs_dir=str(loop["dir"] / "runs"), workdir=str(loop["dir"]))
    guarded = TestClient(create_ui(UiSettings(token="ui-token-0123456789abcdef", **settings)), base_url="http://127.0.0.1:7860")
    assert guarded.get(f"/run/{name}/label").status_code == 401
    assert guarded.post(f"/api/run/{name}/label", json={"batch": rec["index"], "labels": {"1": ["pos"]}},
                        headers={"X-Lmtune-UI": "1"}).status_code == 401
    c = TestClient(create_ui(UiSettings(**settings)), base_url="http://127.0.0.1:7860")
    page = c.get(f"/run/{name}/label")
    assert page.status_code == 200 and rec["rows"][0]["text"] in page.text and f"Batch {rec['index']}" in page.text
    body = {"batch": rec["index"], "labels": {"1": ["neg"], "2": [rec["rows"][1]["suggestion"]]}}
    assert c.post(f"/api/run/{name}/label", json=body).status_code == 403  # no X-Lmtune-UI header
    assert not active.loop.labeled_path(loop["run"], rec["index"]).exists()
    saved = c.post(f"/api/run/{name}/label", json=body, headers={"X-Lmtune-UI": "1"})
    assert saved.status_code == 200 and saved.json()["saved"] == 2
    bad = c.post(f"/api/run/{name}/label", json={"batch": rec["index"], "labels": {"3": ["meh"]}}, headers={"X-Lmtune-UI": "1"})
    assert bad.status_code == 422 and "meh" in bad.json()["detail"]
    items, _ = read_labeled(active.loop.labeled_path(loop["run"], rec["index"]), ["neg", "pos"], exclusive=True)
    assert [(it.text, it.labels) for it in items] == [(rec["rows"][0]["text"], ["neg"]),
                                                      (rec["rows"][1]["text"], [rec["rows"][1]["suggestion"]])]
    started = []
    monkeypatch.setattr(type(c.app.state.ui.jobs), "start_command",
                        lambda self, kind, args, run_dir: started.append((kind, args)) or _FakeJob())
    assert c.post(f"/api/run/{name}/label/retrain", json={"batch": rec["index"]}).status_code == 403
    assert c.post(f"/api/run/{name}/label/retrain", json={"batch": rec["index"]}, headers={"X-Lmtune-UI": "1"}).status_code == 200
    assert started == [("label", [str(loop["run"]), "--import", str(active.loop.labeled_path(loop["run"], rec["index"]))])]


class _FakeJob:
    def state(self) -> dict:
        return {"id": "j1", "status": "running"}
