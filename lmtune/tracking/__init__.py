"""Experiment trackers, registered by name in lmtune.registrations (train.trackers).

A tracker is a class with
- `require()` (static): imports its package or raises InputError, before anything is written;
- `__init__(run_dir, cfg)`: opens a run and logs the resolved config as parameters (the recipe hands
  it the config with the learning rates and metric the run actually uses filled in);
- `inputs(splits)`: the train/dev/test examples the run reads (MLflow logs them as dataset inputs;
  no text leaves the machine, only their schema, size and digest);
- `__call__(state)` after every optimizer step: logs the history rows it has not logged yet;
- `finish(results, files)`: the final metrics (results.json's document), the counts and seconds of
  the run (`run_facts`), and the report, plots and model card as artifacts;
- `close(failed)`: ends the run (marked failed when training raised).
Trackers run in the main process only. This module holds what they share and names none of them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class Tracker:
    """The tracker interface (see the module docstring); subclasses override what they log."""

    @staticmethod
    def require() -> Any:
        return None

    def __init__(self, run_dir: Path, cfg: Any):
        self.run_dir = Path(run_dir)

    def inputs(self, splits: Any) -> None:
        pass

    def __call__(self, state: Any) -> None:
        pass

    def finish(self, results: dict, files: list[Path]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as `section.key -> value`, credentials masked (trackers store and show it)."""
    out: dict[str, Any] = {}
    for section, value in cfg.redacted_dict().items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def flat_params(cfg: Any) -> dict[str, str]:
    """The config as text, for trackers that store parameters as strings (MLflow)."""
    return {k: str(v) for k, v in flat_config(cfg).items()}


def step_metrics(row: dict) -> dict[str, float]:
    """A history row's finite numbers, named as they are in history.jsonl."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


COUNTS = ("n",)  # a split's metrics that count examples: facts of the run, not measurements to plot


def final_metrics(results: dict) -> dict[str, float]:
    """`test_accuracy`, `dev_macro_f1`, ...: every number of every split's metrics (top level only),
    less the example counts (those are in run_facts)."""
    return {f"{split}_{k}": float(v) for split, m in results.get("metrics", {}).items() for k, v in m.items()
            if k not in COUNTS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# the summary's counts (inputs of the run: what it trained) and its outcome (how long, how far, why it stopped)
SIZE_FACTS = ("trainable_params", "total_params")
OUTCOME_FACTS = ("steps", "best_step", "stop_reason", "train_seconds", "eval_seconds", "checkpoint_seconds",
                 "seconds_per_epoch", "seconds_per_step", "peak_mem_mb", "artifact_mb")


def run_facts(results: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sizes, outcome): the run's counts and seconds, which are single values, not time series. Sizes
    (`data.train_examples`, `model.trainable_params`, ...) are parameters of the run; the outcome
    (`run.steps`, `run.train_seconds`, `run.stop_reason`, ...) describes how it went."""
    summary = results.get("summary", {})
    sizes = {f"data.{split}_examples": int(n) for split, n in (summary.get("sizes") or {}).items() if n is not None}
    sizes.update({f"model.{k}": summary[k] for k in SIZE_FACTS if summary.get(k) is not None})
    outcome = {f"run.{k}": summary[k] for k in OUTCOME_FACTS if summary.get(k) is not None}
    return sizes, outcome
