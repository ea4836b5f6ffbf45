"""The ecosystem around a run: `datasets` input, the model card, trackers (a real MLflow server, W&B
offline, TensorBoard) and the command-line habits (version, completion, stdin/stdout, runs, compare,
init)."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmtune
from lmtune.cli import main
from lmtune.errors import InputError
from tests.conftest import toy_rows, write_csv

datasets = pytest.importorskip("datasets")


def _dataset(rows, class_label: bool = False):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"]) if class_label else datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": [t for t, _ in rows],
                                       "label": [(["neg", "pos"].index(y) if class_label else y) for _, y in rows]}, features=features)


def _short(cfg: dict, steps: int = 12) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["train"].update(epochs=1, max_steps=steps)
    return cfg


# ---- datasets input ----------------------------------------------------------------------------

def test_parquet_trains_to_the_same_metrics_as_the_same_rows_in_csv(tiny_config, tmp_path):
    csv_run = lmtune.train(_short(tiny_config))
    pq = {}
    for split, seed in (("train", 1), ("dev", 2), ("test", 3)):
        pq[split] = str(tmp_path / f"{split}.parquet")
        _dataset(toy_rows({"train": 96}.get(split, 32), seed)).to_parquet(pq[split])
    cfg = _short(tiny_config)
    cfg["data"].update(pq)
    cfg["run_name"] = "pq"
    pq_run = lmtune.train(cfg)
    assert pq_run.metrics["test"]["accuracy"] == csv_run.metrics["test"]["accuracy"]
    assert pq_run.metrics["test"]["loss"] == pytest.approx(csv_run.metrics["test"]["loss"], abs=1e-6)


def test_class_label_names_come_from_the_feature_in_arrow_and_saved_folders(tiny_config, tmp_path):
    ds = _dataset(toy_rows(96, 1), class_label=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (str(tmp_path / "saved"), str(arrow)):
        cfg = _short(tiny_config, 4)
        cfg["data"].update(train=source, dev=None, test=None)
        cfg["run_name"] = Path(source).name
        run = lmtune.train(cfg)
        assert run.labels == ["neg", "pos"]  # names, not 0 / 1


def test_dataset_errors_name_the_dataset_and_the_row(tiny_config, tmp_path):
    rows = toy_rows(20, 1)
    rows[6] = ("   ", "pos")
    bad = tmp_path / "bad.parquet"
    _dataset(rows).to_parquet(str(bad))
    cfg = _short(tiny_config)
    cfg["data"].update(train=str(bad), dev=None, test=None)
    with pytest.raises(InputError, match=r"bad\.parquet: row 7: empty value in column 'text'"):
        lmtune.train(cfg)
    cfg["data"]["text_column"] = "sentence"
    with pytest.raises(InputError, match=r"bad\.parquet: row 1: no column 'sentence'"):
        lmtune.train(cfg)
    test = tmp_path / "unseen.parquet"
    _dataset([("a fine day", "pos"), ("so so", "meh")]).to_parquet(str(test))
    cfg = _short(tiny_config)
    cfg["data"]["test"] = str(test)
    with pytest.raises(InputError, match=r"unseen\.parquet:2: label 'meh' never appears"):
        lmtune.train(cfg)


def test_the_python_api_takes_dataset_objects(tiny_config):
    cfg = _short(tiny_config, 4)
    for key in ("train", "dev", "test"):
        cfg["data"][key] = None
    dd = datasets.DatasetDict({"train": _dataset(toy_rows(96, 1), True), "validation": _dataset(toy_rows(32, 2), True),
                               "test": _dataset(toy_rows(32, 3), True)})
    run = lmtune.train(cfg, data=dd)
    assert run.metrics["test"]["n"] == 32 and run.metrics["dev"]["n"] == 32 and run.labels == ["neg", "pos"]
    with pytest.raises(InputError, match="unknown split"):
        lmtune.train(cfg, data={"training": dd["train"]})


def test_data_hub_loads_through_load_dataset(tiny_config, tmp_path):
    """The real datasets.load_dataset call, on a local dataset repository (the Hub is unreachable here):
    its files name the splits, data.hub_split_map picks them."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _dataset(toy_rows(96, 1), True).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    _dataset(toy_rows(32, 2), True).to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    _dataset(toy_rows(32, 3), True).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    cfg = _short(tiny_config, 4)
    for key in ("train", "dev", "test"):
        cfg["data"][key] = None
    cfg["data"]["hub"] = str(repo)
    run = lmtune.train(cfg)
    assert run.metrics["test"]["n"] == 32 and run.labels == ["neg", "pos"]
    cfg["data"]["hub_split_map"] = {"dev": "nosuchsplit"}
    cfg["run_name"] = "t2"
    with pytest.raises(InputError, match="data.hub: cannot load .* split 'nosuchsplit'"):
        lmtune.train(cfg)


# ---- model card ---------------------------------------------------------------------------------

def test_the_model_card_parses_and_carries_the_metrics_and_the_controls(tiny_config):
    from huggingface_hub import ModelCard
    run = lmtune.train(_short(tiny_config))
    card = ModelCard.load(run.run_dir / "model" / "README.md")
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    shown = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert shown[("test", "accuracy")] == metrics["test"]["accuracy"]
    assert shown[("test", "f1")] == metrics["test"]["macro_f1"]  # the Hub's metric id; macro in the name and args
    # the tiny base model has no card, so no license is claimed (never `other` without a name)
    assert card.data.pipeline_tag == "text-classification" and "lmtune" in card.data.tags and card.data.license is None
    assert card.data.base_model is None  # a local folder is not a Hub id
    for section in ("## Intended use", "## Training data", "## Training recipe", "## Evaluation",
                    "## Output controls (calibration and abstention)", "## Limitations"):
        assert section in card.text
    assert "`temperature`" in card.text
    assert not any(t in card.text for t, _ in toy_rows(96, 1)[:20])  # no training text is quoted


# ---- trackers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    pytest.importorskip("mlflow")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import urllib.request
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_a_real_mlflow_server_receives_params_metrics_and_artifacts(tiny_config, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lmtune-test")
    cfg = _short(tiny_config, 6)
    cfg["train"].update(trackers=["mlflow"], eval_every=3)
    run = lmtune.train(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("lmtune-test")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "t"
    assert found.data.params["train.seed"] == "1" and found.data.params["train.max_steps"] == "6"
    losses = client.get_metric_history(found.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert found.data.metrics["test_accuracy"] == run.metrics["test"]["accuracy"]
    assert "dev_accuracy" in found.data.metrics
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.md", "learning_curve.png", "README.md"} <= names


def test_mlflow_without_a_server_writes_a_local_store_beside_the_runs(tiny_config, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _short(tiny_config, 3)
    cfg["train"].update(trackers=["mlflow"])
    lmtune.train(cfg)
    db = Path(cfg["output_dir"]) / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (found,) = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train_loss")] == [1, 2, 3]


# W&B's offline run (metrics at their steps, copied files, images, the confusion-matrix panel):
# tests/test_trackers.py::test_wandb_offline_run_keeps_real_files_images_and_a_confusion_matrix


def _wandb_records(path: Path) -> tuple[list[dict], dict]:
    """The history rows and the final summary of an offline run file, as wandb's own reader
    (`wandb leet inspect --json`, the Go core's transaction-log reader) prints its records."""
    exe = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(exe), "leet", "inspect", str(path), "--json"], capture_output=True, text=True, timeout=120,
                          check=True)
    rows, summary = [], {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "history":
            rows.append(rec["history"]["item"])
        elif rec.get("type") == "summary":
            summary.update(rec["summary"].get("update", {}))
    return rows, summary


def test_tensorboard_event_files_hold_the_train_loss(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = _short(tiny_config, 5)
    cfg["train"].update(trackers=["tensorboard"])
    run = lmtune.train(cfg)
    acc = EventAccumulator(str(run.run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/train_loss")] == [1, 2, 3, 4, 5]
    assert acc.Scalars("final/test_accuracy")[0].value == pytest.approx(run.metrics["test"]["accuracy"])


# ---- command line -------------------------------------------------------------------------------

def test_version_and_completion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lmtune ")
    for shell in ("bash", "zsh"):
        assert main(["completion", shell]) == 0
        script = capsys.readouterr().out
        assert "predict" in script and "compare" in script and "--input" in script


def test_predict_streams_stdin_to_stdout(tiny_config, tmp_path):
    run = lmtune.train(_short(tiny_config, 4))
    lines = ["a good day", json.dumps({"text": "an awful movie"}), "", "fine food"]
    proc = subprocess.run([sys.executable, "-m", "lmtune", "predict", str(run.run_dir), "--input", "-", "--output", "-"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["text"] for o in out] == ["a good day", "an awful movie", "fine food"]
    assert [o.pop("source") for o in out] == ["<stdin>:1", "<stdin>:2", "<stdin>:4"]
    assert out == run.predict(["a good day", "an awful movie", "fine food"])
    # a bad line deep in the stream is named by its line in the stream
    stream = "\n".join(["ok text"] * 300 + ['{"txt": "no text column"}']) + "\n"
    proc = subprocess.run([sys.executable, "-m", "lmtune", "predict", str(run.run_dir), "--input", "-"],
                          input=stream, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "<stdin>: line 301: no column 'text'" in proc.stderr


def test_runs_lists_status_and_compare_shows_differences(tiny_config, capsys):
    a = lmtune.train(_short(tiny_config, 4))
    cfg = _short(tiny_config, 6)
    cfg["run_name"] = "b"
    cfg["train"]["lr"] = 1e-3
    b = lmtune.train(cfg)
    broken = Path(tiny_config["output_dir"]) / "killed"
    broken.mkdir()
    (broken / "config.yaml").write_text((a.run_dir / "config.yaml").read_text())
    assert main(["runs", tiny_config["output_dir"], "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["t"]["status"] == "finished" and rows["killed"]["status"] == "interrupted"
    assert rows["b"]["metrics"]["accuracy"] == b.metrics["test"]["accuracy"] and rows["b"]["task"] == "classification"
    assert main(["runs", tiny_config["output_dir"]]) == 0
    assert "interrupted" in capsys.readouterr().out
    assert not (a.run_dir / "running.json").exists()  # removed when training ended
    assert main(["compare", str(a.run_dir), str(b.run_dir), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["config"]["train.lr"] == [0.003, 0.001] and c["config"]["train.max_steps"] == [4, 6]
    assert c["metrics"]["test.accuracy"]["b_minus_a"] == pytest.approx(b.metrics["test"]["accuracy"] - a.metrics["test"]["accuracy"])
    assert "train" not in [k.split(".")[0] for k in c["metrics"]]


def test_runs_tell_a_run_in_progress_from_an_interrupted_one(tiny_config, tmp_path):
    import socket
    import subprocess
    import sys

    from lmtune.artifacts import RunDir
    from lmtune.runs import status
    seen = []

    def look(state):  # while training: this very process is the live trainer
        seen.append(status(RunDir(Path(tiny_config["output_dir"]) / "t")))
        if (Path(tiny_config["output_dir"]) / "t" / "checkpoints" / "pointer.json").is_file():
            raise SystemExit(3)  # then the run dies like a killed one, after a checkpoint

    with pytest.raises(SystemExit):
        lmtune.train({**tiny_config, "train": {**tiny_config["train"], "eval_every": 2}}, callbacks=(look,))
    assert seen[0] == "running"
    rd = RunDir(Path(tiny_config["output_dir"]) / "t")
    assert status(rd) == "interrupted" and not rd.running_marker.exists()
    # a marker left by a process that no longer exists (kill -9) does not count
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout
    rd.running_marker.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    assert status(rd) == "interrupted"


def test_init_inspects_a_file_and_writes_a_config_that_loads(tmp_path, capsys):
    from lmtune.config import load_config
    data = write_csv(tmp_path / "reviews.csv", [(t, y) for t, y in toy_rows(60, 1)], header=("review", "sentiment"))
    out = tmp_path / "cfg.yaml"
    assert main(["init", str(data), "--output", str(out)]) == 0
    info = json.loads(capsys.readouterr().err.split("\nwrote")[0])
    assert info["task"] == "classification" and info["labels"] == {"pos": 30, "neg": 30} and info["language"] == "en"
    cfg = load_config(out)
    assert (cfg.task, cfg.data.text_column, cfg.data.label_column) == ("classification", "review", "sentiment")
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2" and "# guess" in out.read_text()
    zh = write_csv(tmp_path / "zh.csv", [("这部电影非常好看", "好"), ("服务太差了", "差")] * 10)
    assert main(["init", str(zh), "--output", str(out)]) == 2  # exists: never overwritten without --force
    assert main(["init", str(zh), "--output", str(out), "--force"]) == 0
    assert load_config(out).model.name == "moka-ai/m3e-small"
    scores = write_csv(tmp_path / "sts.csv", [(f"pair {i}", f"{i / 7:.2f}") for i in range(40)])
    assert main(["init", str(scores), "--output", str(tmp_path / "r.yaml")]) == 0
    assert load_config(tmp_path / "r.yaml").task == "regression"
    assert not os.path.exists(tmp_path / "lmtune.yaml")
