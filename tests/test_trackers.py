"""Trackers as their users expect them (issue 52): a real MLflow server gets a registrable model that
predicts what lmtune does, the resolved learning rates, dataset inputs, artifacts and facts as
params/tags; TensorBoard's reader finds the HParams and the plots; a W&B offline run keeps real copies
of its files, its plots as images and a confusion-matrix table."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

import lmtune
from tests.conftest import toy_rows, write_csv
# mlflow_server: the fixture that starts a real MLflow server; _wandb_records: wandb's own reader of an offline run
from tests.test_ecosystem import _wandb_records, mlflow_server  # noqa: F401

TEXTS = [t for t, _ in toy_rows(12, 7)]


def _short(cfg: dict, steps: int) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["train"].update(epochs=1, max_steps=steps)
    return cfg


# ---- MLflow ---------------------------------------------------------------------------------------

def test_mlflow_logs_a_registrable_transformers_model_that_predicts_like_lmtune(tiny_config, mlflow_server, monkeypatch):  # noqa: F811
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lmtune-models")
    cfg = _short(tiny_config, 12)
    cfg["train"].update(trackers=["mlflow"], lr=None)  # lr left to lmtune's default by width
    # a temperature applied (12 steps of a tiny model would rarely earn one): folded into model/'s output
    # layer, the transformers flavor must give lmtune's calibrated probabilities, not the raw softmax
    import lmtune.evaluate.calibration as calibration
    import lmtune.tasks.classification as cls
    monkeypatch.setattr(cls, "choose_temperature", lambda *a, **kw: {**calibration.choose_temperature(*a, **kw),
                                                                      "applied": True, "temperature": 0.4})
    run = lmtune.train(cfg)
    assert json.loads((run.run_dir / "model" / "lmtune.json").read_text())["task_state"]["folded_temperature"] == pytest.approx(0.4)
    client = MlflowClient(tracking_uri=mlflow_server)
    (found,) = client.search_runs([client.get_experiment_by_name("lmtune-models").experiment_id])
    run_id, params = found.info.run_id, found.data.params

    # the learning rates the run used, not the config's None; counts as params, the outcome as tags
    assert float(params["train.lr"]) == run.metrics["train"]["lr"] == 1e-4  # width 32 < 768
    assert float(params["train.head_lr"]) == run.metrics["train"]["head_lr"] == 3e-3
    assert params["data.train_examples"] == "96" and params["data.test_examples"] == "32"
    assert int(params["model.trainable_params"]) == run.metrics["train"]["trainable_params"]
    assert found.data.tags["lmtune.run.steps"] == "12" and float(found.data.tags["lmtune.run.train_seconds"]) > 0
    assert "test_n" not in found.data.metrics and "test_accuracy" in found.data.metrics
    # each split as a dataset input with its context; the source is the file, no text is sent
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "dev", "test"}
    assert json.loads(inputs["test"].source)["uri"] == str(Path(cfg["data"]["test"]).resolve())
    assert json.loads(inputs["train"].profile)["num_rows"] == 96
    assert not any(t in json.dumps([d.to_dictionary() for d in inputs.values()]) for t, _ in toy_rows(96, 1)[:10])
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.md", "results.json", "learning_curve.png", "confusion_matrix_test.png", "README.md"} <= names

    # the registry takes the run's model, and the transformers flavor predicts what lmtune predicts
    version = mlflow.register_model(f"runs:/{run_id}/model", "lmtune-tiny")
    assert version.version == "1"
    mlflow.set_tracking_uri(mlflow_server)
    try:
        pipe = mlflow.transformers.load_model("models:/lmtune-tiny/1")
        theirs = pipe(TEXTS, top_k=None)
        served = mlflow.pyfunc.load_model("models:/lmtune-tiny/1").predict(TEXTS)
    finally:
        mlflow.set_tracking_uri(None)
    ours = lmtune.load(run.run_dir).predict(TEXTS)
    assert [max(t, key=lambda s: s["score"])["label"] for t in theirs] == [r["label"] for r in ours]
    assert list(served["label"]) == [r["label"] for r in ours]
    for t, r in zip(theirs, ours):  # T = 0.4 sharpens: equal only because it is folded into the saved weights
        assert {s["label"]: pytest.approx(r["probabilities"][s["label"]], abs=1e-4) for s in t} == {s["label"]: s["score"] for s in t}
    assert len({round(r["score"], 6) for r in ours}) > 3  # each text its own probabilities: a per-text comparison


def _regression_config(tiny_config: dict, tmp_path: Path) -> dict:
    cfg = _short(tiny_config, 6)
    for split, n, seed in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3)):
        rows = [(t, "1.0" if y == "pos" else "0.0") for t, y in toy_rows(n, seed)]
        cfg["data"][split] = str(write_csv(tmp_path / f"reg_{split}.csv", rows))
    cfg.update(task="regression", run_name="reg")
    return cfg


def test_a_task_without_a_pipeline_is_logged_as_lmtune_pyfunc_and_export_adds_the_onnx_file(tiny_config, tmp_path,
                                                                                             monkeypatch):
    """MLflow's local store (no server set): a regression run's model is lmtune's pyfunc wrapper, which
    predicts exactly what lmtune.load does; `lmtune export` then adds the ONNX files to the same run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("onnx")
    import mlflow
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _regression_config(tiny_config, tmp_path)
    cfg["train"].update(trackers=["mlflow"])
    run = lmtune.train(cfg)
    # logging the model pointed MLflow's fluent API at the run for one call only: nothing is left behind
    assert mlflow.active_run() is None and "MLFLOW_TRACKING_URI" not in os.environ
    uri = f"sqlite:///{Path(cfg['output_dir']).resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    model_uri = f"runs:/{found.info.run_id}/model"
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
        assert "python_function" in info.flavors and "transformers" not in info.flavors
        served = mlflow.pyfunc.load_model(model_uri).predict(TEXTS)
    finally:
        mlflow.set_tracking_uri(None)
    ours = lmtune.load(run.run_dir).predict(TEXTS)
    assert list(served["value"]) == pytest.approx([r["value"] for r in ours], abs=1e-6)
    assert [list(i) for i in served["interval"]] == [r["interval"] for r in ours]  # the whole lmtune row

    from lmtune.export.onnx import export_run
    export_run(run.run_dir, sample=8)
    assert "onnx/model.onnx" in {a.path for a in client.list_artifacts(found.info.run_id, "onnx")}


def test_only_a_plain_softmax_classifier_goes_out_as_a_transformers_pipeline(tmp_path):
    """The transformers flavor is chosen only where a pipeline reads model/ as lmtune predicts."""
    from lmtune.tracking.mlflow import pipeline_task
    state = {"temperature": 1.0, "threshold": None, "oos_label": None, "score": "probability"}

    def folder(name: str, meta: dict, adapter: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "lmtune.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"], "task_state": state,
                                                   "config": {"data": {"long_text": "truncate"}}, **meta}))
        if adapter:
            (d / "adapter_config.json").write_text("{}")
        return d

    assert pipeline_task(folder("plain", {})) == "text-classification"
    assert pipeline_task(folder("regression", {"task": "regression"})) is None
    assert pipeline_task(folder("abstains", {"task_state": {**state, "threshold": 0.7}})) is None
    assert pipeline_task(folder("mahalanobis", {"task_state": {**state, "score": "mahalanobis"}})) is None
    assert pipeline_task(folder("windows", {"config": {"data": {"long_text": "windows"}}})) is None
    assert pipeline_task(folder("lora", {}, adapter=True)) is None
    # calibrated and folded: the pipeline's softmax is lmtune's; a fold that failed leaves T in lmtune.json only
    assert pipeline_task(folder("folded", {"task_state": {**state, "temperature": 1.7, "folded_temperature": 1.7}})) \
        == "text-classification"
    assert pipeline_task(folder("unfolded", {"task_state": {**state, "temperature": 1.7, "folded_temperature": 1.0}})) is None
    # pairs: lmtune averages both orders of a symmetric pair, and a bi-encoder is no sequence classifier
    assert pipeline_task(folder("symmetric", {"task_state": {**state, "symmetric": True}})) is None
    assert pipeline_task(folder("bi", {"task_state": {**state, "pair_encoding": "bi"}})) is None
    assert pipeline_task(folder("cross", {"task_state": {**state, "pair_encoding": "cross"}})) == "text-classification"


def test_run_facts_split_sizes_from_outcome_and_leave_counts_out_of_the_metrics():
    from lmtune.tracking import final_metrics, run_facts
    results = {"summary": {"sizes": {"train": 96, "dev": 32, "test": 0}, "trainable_params": 10, "total_params": 20,
                           "steps": 12, "train_seconds": 1.5, "stop_reason": "reached 12 steps", "lr": 1e-4},
               "metrics": {"test": {"accuracy": 0.75, "n": 32, "per_class": {"a": {"support": 16.0}}}}}
    sizes, outcome = run_facts(results)
    assert sizes == {"data.train_examples": 96, "data.dev_examples": 32, "data.test_examples": 0,
                     "model.trainable_params": 10, "model.total_params": 20}
    assert outcome == {"run.steps": 12, "run.train_seconds": 1.5, "run.stop_reason": "reached 12 steps"}
    assert final_metrics(results) == {"test_accuracy": 0.75}


def test_a_confusion_matrix_expands_to_one_pair_per_counted_example():
    from lmtune.tracking.wandb import confusion_pairs
    gold, pred = confusion_pairs([[2, 1], [0, 3]])
    assert sorted(zip(gold, pred)) == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 1)]


# ---- TensorBoard ----------------------------------------------------------------------------------

def test_tensorboard_reader_finds_the_hparams_and_the_plots(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_metadata
    cfg = _short(tiny_config, 4)
    cfg["train"].update(trackers=["tensorboard"], lr=None)
    run = lmtune.train(cfg)
    acc = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    # the hparams plugin's records: the experiment (hparams and metrics) and this run's session
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    session = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert "final/test_accuracy" in metric_tags and metric_tags <= set(acc.Tags()["scalars"])
    assert session.hparams["train.lr"].number_value == run.metrics["train"]["lr"] == 1e-4  # resolved, not None
    assert session.hparams["data.train_examples"].number_value == 96
    assert session.hparams["task"].string_value == "classification"
    # the run's plots as images
    images = set(acc.Tags()["images"])
    assert {"plots/learning_curve", "plots/confusion_matrix_test", "plots/reliability"} <= images
    (image,) = acc.Images("plots/learning_curve")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 and image.height > 100


# ---- W&B ------------------------------------------------------------------------------------------

def test_wandb_offline_run_keeps_real_files_images_and_a_confusion_matrix(tiny_config, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _short(tiny_config, 4)
    cfg["train"].update(trackers=["wandb"])
    run = lmtune.train(cfg)
    (offline,) = (run.run_dir / "wandb").glob("offline-run-*")
    files = offline / "files"
    for rel in ("report.md", "results.json", "learning_curve.png", "model/README.md"):
        assert (files / rel).is_file() and not (files / rel).is_symlink(), rel
    assert (files / "report.md").read_bytes() == (run.run_dir / "report.md").read_bytes()

    history, summary = _wandb_records(next(offline.glob("*.wandb")))
    assert [h["_step"] for h in history if "train_loss" in h] == [1, 2, 3, 4]  # every step's metrics at its step
    assert summary["test_accuracy"] == run.metrics["test"]["accuracy"]
    final = {k: v for row in history for k, v in row.items()}  # the reader flattens nested keys with dots
    assert final["plots/learning_curve._type"] == "image-file"
    assert (files / final["plots/learning_curve.path"]).is_file()  # the image itself, in media/
    assert final["confusion_matrix/test_table._type"] == "table-file"  # the panel's table
    rows = json.loads((files / final["confusion_matrix/test_table.path"]).read_text())
    assert rows["columns"] == ["Actual", "Predicted", "nPredictions"]
    cm = run.metrics["test"]["confusion_matrix"]
    assert sorted(rows["data"]) == sorted([[a, p, float(cm[i][j])] for i, a in enumerate(run.labels)
                                           for j, p in enumerate(run.labels)])
    assert summary["data.train_examples"] == 96 and summary["run.steps"] == 4 and "test_n" not in summary

