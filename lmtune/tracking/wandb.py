"""Weights & Biases tracker: config, step metrics, final metrics as the run summary, and the report,
plots and model card as files of the run.

wandb's own environment decides where it goes: WANDB_MODE=offline writes to RUN_DIR/wandb only
(`wandb sync` uploads later), WANDB_PROJECT names the project ("lmtune" otherwise), WANDB_API_KEY
authenticates online runs. lmtune never reads or logs the key.
"""
from __future__ import annotations

import os
from pathlib import Path

from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, flat_config, step_metrics


class WandbTracker(Tracker):
    @staticmethod
    def require():
        try:
            import wandb
        except ImportError:
            raise InputError("train.trackers: wandb needs the wandb package. pip install 'lmtune[track]', "
                             "or leave wandb out of train.trackers.") from None
        return wandb

    def __init__(self, run_dir: Path, cfg):
        wandb = self.require()
        self.run_dir = Path(run_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmtune"), name=self.run_dir.name, dir=str(self.run_dir),
                              config=flat_config(cfg), tags=[cfg.task], reinit="create_new")
        self.done = 0

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            values = step_metrics(row)
            if values:
                self.run.log(values, step=row["step"])
        self.done = len(state.history)

    def finish(self, results: dict, files: list[Path]) -> None:
        self.run.summary.update(final_metrics(results))
        for f in files:
            self.run.save(str(f), base_path=str(self.run_dir), policy="now")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
