"""Experiment trackers, registered by name in lmtune.registrations (train.trackers).

A tracker is a class with
- `require()` (static): imports its package or raises InputError, before anything is written;
- `__init__(run_dir, cfg)`: opens a run and logs the resolved config as parameters;
- `__call__(state)` after every optimizer step: logs the history rows it has not logged yet;
- `finish(results, files)`: the final metrics (results.json's document) and the report, plots and
  model card as artifacts;
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


def final_metrics(results: dict) -> dict[str, float]:
    """`test_accuracy`, `dev_macro_f1`, ...: every number of every split's metrics (top level only)."""
    return {f"{split}_{k}": float(v) for split, m in results.get("metrics", {}).items() for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
