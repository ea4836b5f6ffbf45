"""MLflow tracker: the resolved config as params (the learning rates the run used, not None), the
data as dataset inputs (train/dev/test contexts), every history row as step metrics, the final
metrics, the run's sizes as params and its outcome (steps, seconds, stop reason) as tags, the report,
results.json, plots and model card as artifacts, and the model itself, logged once at the end:

- the transformers flavor (a text-classification pipeline over model/) where a plain pipeline reads
  the model as lmtune does: `mlflow.transformers.load_model`, `mlflow models serve` and the registry
  work as for any Hub model;
- otherwise a pyfunc model wrapping lmtune.load (tracking/mlflow_model.py), which predicts what
  `lmtune predict` does;
- the ONNX export's files under onnx/ when the run has one (`lmtune export` also adds them to the
  run's MLflow run afterwards, see log_export).

Where: MLFLOW_TRACKING_URI when set (a server, a database); otherwise a local SQLite store beside the
runs (OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlartifacts), MLflow's own default since 3.7 but
not tied to the working directory. The experiment is MLFLOW_EXPERIMENT_NAME or "lmtune". It talks
through MlflowClient; logging a model needs MLflow's fluent API, which is pointed at the run only for
that call (no global active run or tracking URI is left behind).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, flat_params, run_facts, step_metrics

log = logging.getLogger("lmtune")

MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value
BATCH = 1000  # MLflow's limit on metrics per log_batch call
MODEL_PATH = "model"  # the model's name in the run: runs:/RUN_ID/model


def tracking_uri(output_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MLflowTracker(Tracker):
    @staticmethod
    def require():
        try:
            import mlflow
        except ImportError:
            raise InputError("train.trackers: mlflow needs the mlflow package. pip install 'lmtune[track]', "
                             "or leave mlflow out of train.trackers.") from None
        return mlflow

    def __init__(self, run_dir: Path, cfg):
        self.require()
        from mlflow.tracking import MlflowClient
        self.run_dir = Path(run_dir).resolve()
        root = Path(cfg.output_dir).resolve()
        self.uri = tracking_uri(root)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmtune")
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            exp_id = self.client.create_experiment(name)  # the server decides where artifacts go
        else:
            exp_id = self.client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                             tags={"lmtune.task": cfg.task, "lmtune.run_dir": str(self.run_dir)}).info.run_id
        self._params(flat_params(cfg))
        self.cfg = cfg
        self.done = 0
        self.last_step = 0
        from lmtune.io import write_json
        write_json(RunDir(self.run_dir).mlflow_run, {"tracking_uri": _shown_uri(self.uri), "run_id": self.run_id})

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def inputs(self, splits) -> None:
        """Each split as an MLflow dataset (schema, row count, digest, source path; no text is sent),
        with the context train / dev / test that the MLflow UI groups inputs by."""
        from mlflow.entities import DatasetInput, InputTag
        datasets = []
        for split in ("train", "dev", "test"):
            examples = getattr(splits, split)
            if not examples:
                continue
            try:
                dataset = _dataset(split, examples, _source(split, splits.info, self.cfg))
            except Exception as e:  # an input the dataset schema cannot describe must not stop training
                log.warning("mlflow: %s not logged as a dataset input (%s)", split, e)
                continue
            # _to_mlflow_entity is what mlflow.log_input itself sends; the client API takes the entity
            datasets.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        if datasets:
            self.client.log_inputs(self.run_id, datasets=datasets)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            self._log(step_metrics(row), row["step"])
            self.last_step = max(self.last_step, row["step"])
        self.done = len(state.history)

    def finish(self, results: dict, files: list[Path]) -> None:
        self._log(final_metrics(results), results.get("summary", {}).get("steps", self.last_step))
        sizes, outcome = run_facts(results)
        self._params(sizes)
        for key, value in outcome.items():
            self.client.set_tag(self.run_id, f"lmtune.{key}", str(value))
        for f in [*files, RunDir(self.run_dir).results]:
            if f.is_file():
                self.client.log_artifact(self.run_id, str(f))
        log_onnx(self.client, self.run_id, self.run_dir)
        try:
            self.log_model()
        except Exception as e:  # the run is trained and saved: a model MLflow cannot take only warns
            log.warning("mlflow: the model was not logged (%s: %s); the run itself is complete", type(e).__name__, e)
            self.client.set_tag(self.run_id, "lmtune.model_logged", "false")

    def log_model(self) -> None:
        """model/ as the transformers flavor where a pipeline reads it as lmtune does, else as a pyfunc
        model over lmtune.load; either way at runs:/RUN_ID/model, ready for mlflow.register_model."""
        import mlflow
        model_dir = RunDir(self.run_dir).model
        task = pipeline_task(model_dir)
        with _in_run(mlflow, self.uri, self.run_id):
            if task:
                import mlflow.transformers
                mlflow.transformers.log_model(_pipeline(model_dir, task), name=MODEL_PATH, model_card=_card(model_dir),
                                              pip_requirements=_requirements("torch", "transformers", "tokenizers"))
            else:
                from lmtune.tracking.mlflow_model import LmtuneModel
                with tempfile.TemporaryDirectory() as staged:
                    mlflow.pyfunc.log_model(name=MODEL_PATH, python_model=LmtuneModel(),
                                            artifacts={"run": str(_stage_run(self.run_dir, Path(staged)))},
                                            pip_requirements=_requirements("lmtune", "torch", "transformers", "tokenizers"))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def pipeline_task(model_dir: Path) -> str | None:
    """The transformers pipeline task that reads model/ exactly as lmtune predicts, or None: a single-
    model classifier that answers with its softmax (no adapter, ensemble, windows, abstention or
    out-of-scope score). Anything else is logged as lmtune's own pyfunc model."""
    from lmtune.fold import pipeline_reproduces_lmtune
    return "text-classification" if pipeline_reproduces_lmtune(model_dir) else None


def _pipeline(model_dir: Path, task: str) -> Any:
    """model/ as a transformers pipeline (MLflow's own reading of a checkpoint folder fails on transformers 5)."""
    from transformers import pipeline
    from lmtune.models import quiet_transformers
    with quiet_transformers():
        return pipeline(task, model=str(model_dir), tokenizer=str(model_dir), device="cpu")


def _card(model_dir: Path) -> Any:
    """The run's own model card, so MLflow does not look the folder up on the Hub."""
    if not (model_dir / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard
    return ModelCard.load(model_dir / "README.md")


def log_onnx(client: Any, run_id: str, run_dir: Path) -> bool:
    """The run's ONNX export (model.onnx and what loads it) under the artifact folder onnx/, if it has one."""
    export = RunDir(run_dir).export
    if not any(export.glob("*.onnx")):
        return False
    client.log_artifacts(run_id, str(export), "onnx")
    return True


def log_export(run_dir: str | Path) -> bool:
    """After `lmtune export`: add the ONNX files to the MLflow run the training logged to (named in
    RUN_DIR/mlflow_run.json). False when the run was not tracked with MLflow or MLflow is absent."""
    import json
    record = RunDir(run_dir).mlflow_run
    if not record.is_file():
        return False
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return False
    rec = json.loads(record.read_text())
    uri = os.environ.get("MLFLOW_TRACKING_URI") or rec["tracking_uri"]
    with _fail_fast():
        return log_onnx(MlflowClient(tracking_uri=uri), rec["run_id"], Path(run_dir))


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """The export is done and verified before this optional upload: a tracking server that is down gets
    one try with a short timeout, not MLflow's default 7 retries with backoff (minutes of a stalled export)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update({k: v for k, v in wanted.items() if before[k] is None})  # a user's own setting wins
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)


@contextlib.contextmanager
def _in_run(mlflow: Any, uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at our run for one call, then put back as it was: the process's
    tracking URI and active run are the user's, not ours."""
    from mlflow.tracking._tracking_service import utils as tracking_utils
    # set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ (and unsets it for None): keep both as found
    before, env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        # nested: a user who called lmtune.train inside their own `with mlflow.start_run()` keeps it active
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _stage_run(run_dir: Path, staged: Path) -> Path:
    """What lmtune.load reads of a run (model/, metrics.json, index/), without its checkpoints."""
    src, out = RunDir(run_dir), RunDir(staged / "run")
    out.root.mkdir()
    shutil.copytree(src.model, out.model)
    if src.metrics.is_file():
        shutil.copy2(src.metrics, out.metrics)
    if src.index.is_dir():
        shutil.copytree(src.index, out.index)
    return out.root


def _requirements(*packages: str) -> list[str]:
    """Pinned to the versions this run used (asking pip to infer them would load the model in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _shown_uri(uri: str) -> str:
    """A tracking URI without credentials (user:password@host), for the file kept in the run dir."""
    from lmtune.redact import redact_text
    return redact_text(uri)


def _source(split: str, info: dict, cfg: Any):
    """Where a split came from: a data file, a Hub dataset (with its split), or, for Python objects, the code."""
    data = cfg.data
    if data.hub:
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
        hub_split = (data.hub_split_map or {}).get(split, {"dev": "validation"}.get(split, split))
        return HuggingFaceDatasetSource(path=str(data.hub), config_name=data.hub_config, split=str(hub_split))
    path = info.get(split) if isinstance(info.get(split), str) else None
    path = path or getattr(data, split, None) or data.train  # a split carved out of train comes from train's file
    if isinstance(path, (str, Path)):
        from mlflow.data import get_registered_sources
        # MLflow registers its local-file source class at import time (it has no importable name)
        local = next((s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"), None)
        uri = str(Path(path).resolve()) if Path(path).exists() else str(path)
        if local is not None:
            return local(uri)
    from mlflow.data.code_dataset_source import CodeDatasetSource
    return CodeDatasetSource(tags={"lmtune.split": split})


def _dataset(split: str, examples: list, source: Any):
    """An MLflow pandas dataset of the examples' fields (their `source` line numbers left out): MLflow
    keeps its schema, profile and digest; the rows themselves stay here."""
    import mlflow.data
    import pandas as pd
    rows = [{k: v for k, v in dataclasses.asdict(ex).items() if k != "source"} if dataclasses.is_dataclass(ex) else dict(ex)
            for ex in examples]
    df = pd.DataFrame(rows).dropna(axis=1, how="all")
    targets = next((c for c in ("label", "labels", "tags", "target") if c in df.columns), None)
    return mlflow.data.from_pandas(df, source=source, name=split, targets=targets)
