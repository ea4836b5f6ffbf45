"""Weights & Biases tracker: config, step metrics, final metrics and the run's sizes and outcome as
the run summary, the plots as W&B images, each split's confusion matrix as a W&B confusion-matrix
panel (classification), and the report, results.json, plots and model card as files of the run.

Files are copied into the run's files folder before wandb.save: `run.save` of a file outside it
leaves a symlink, which an offline run loses when the run folder moves before `wandb sync`.

wandb's own environment decides where it goes: WANDB_MODE=offline writes to RUN_DIR/wandb only
(`wandb sync` uploads later), WANDB_PROJECT names the project ("lmtune" otherwise), WANDB_API_KEY
authenticates online runs. lmtune never reads or logs the key.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, flat_config, run_facts, step_metrics


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
        self.wandb = wandb = self.require()
        self.run_dir = Path(run_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmtune"), name=self.run_dir.name, dir=str(self.run_dir),
                              config=flat_config(cfg), tags=[cfg.task], reinit="create_new")
        self.done = 0
        self.last_step = 0

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            values = step_metrics(row)
            if values:
                self.run.log(values, step=row["step"])
                self.last_step = max(self.last_step, row["step"])
        self.done = len(state.history)

    def finish(self, results: dict, files: list[Path]) -> None:
        sizes, outcome = run_facts(results)
        self.run.summary.update({**final_metrics(results), **sizes, **outcome})
        panels = {f"plots/{f.stem}": self.wandb.Image(str(f)) for f in files if f.suffix == ".png" and f.is_file()}
        panels.update(self._confusion_matrices(results))
        if panels:  # at the last step logged: W&B drops rows logged at an earlier step than it has seen
            self.run.log(panels, step=max(self.last_step, results.get("summary", {}).get("steps", 0)))
        for f in [*files, RunDir(self.run_dir).results]:
            if f.is_file():
                self._save_copy(f)

    def _confusion_matrices(self, results: dict) -> dict[str, Any]:
        """wandb.plot.confusion_matrix per split, from the matrix results.json holds (rows gold,
        columns predicted): the counts are expanded into (gold, predicted) pairs, so no example is read."""
        labels = results.get("summary", {}).get("labels") or []
        out = {}
        for split, m in results.get("metrics", {}).items():
            cm = m.get("confusion_matrix")
            if not labels or not cm or len(cm) != len(labels) or any(len(row) != len(labels) for row in cm):
                continue
            gold, pred = confusion_pairs(cm)
            out[f"confusion_matrix/{split}"] = self.wandb.plot.confusion_matrix(
                y_true=gold, preds=pred, class_names=list(labels), title=f"Confusion matrix ({split})")
        return out

    def _save_copy(self, path: Path) -> None:
        """A real copy of `path` in the run's files folder (same relative path as in the run dir), then saved."""
        files_dir = Path(self.run.dir)
        rel = path.resolve().relative_to(self.run_dir.resolve()) if path.resolve().is_relative_to(self.run_dir.resolve()) \
            else Path(path.name)
        dest = files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        self.run.save(str(dest), base_path=str(files_dir), policy="now")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def confusion_pairs(cm: list[list[int]]) -> tuple[list[int], list[int]]:
    """A confusion matrix's counts as (gold, predicted) index lists, one pair per counted example."""
    gold, pred = [], []
    for i, row in enumerate(cm):
        for j, count in enumerate(row):
            gold += [i] * int(count)
            pred += [j] * int(count)
    return gold, pred
