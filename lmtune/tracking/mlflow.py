"""MLflow tracker: the resolved config as params, every history row as step metrics, the final
metrics, and the report, plots and model card as artifacts.

Where: MLFLOW_TRACKING_URI when set (a server, a database); otherwise a local SQLite store beside the
runs (OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlartifacts), MLflow's own default since 3.7 but
not tied to the working directory. The experiment is MLFLOW_EXPERIMENT_NAME or "lmtune". It talks
through MlflowClient, not the fluent API: a library must not leave a global active run behind.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, flat_params, step_metrics

MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value
BATCH = 1000  # MLflow's limit on metrics per log_batch call


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
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        root = Path(cfg.output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmtune")
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            exp_id = self.client.create_experiment(name)  # the server decides where artifacts go
        else:
            exp_id = self.client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=Path(run_dir).name,
                                             tags={"lmtune.task": cfg.task, "lmtune.run_dir": str(Path(run_dir).resolve())}).info.run_id
        params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.done = 0

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            self._log(step_metrics(row), row["step"])
        self.done = len(state.history)

    def finish(self, results: dict, files: list[Path]) -> None:
        self._log(final_metrics(results), results.get("summary", {}).get("steps", 0))
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
