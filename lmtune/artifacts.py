"""The run directory's layout: the one module that names its files and reads and writes the model
metadata (lmtune.json) and the task state saved beside a model (model/, export/, a merged folder).

    RUN_DIR/config.yaml  splits.json  audit.json  train.log  history.jsonl  metrics.json  report.md
            checkpoints/  model/ (lmtune.json, task_state.safetensors, weights, tokenizer, README.md: the model card)
            predictions/{dev,test}.jsonl  export/ (the same metadata + ONNX files)
            drift_reference.safetensors (dev embeddings and scores for the serve drift monitor)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.io import write_json

META = "lmtune.json"
TASK_ARRAYS = "task_state.safetensors"  # task state too big for lmtune.json (e.g. the Mahalanobis scorer)


class RunDir:
    """Paths of a run directory's files (nothing is created by naming them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    splits = property(lambda self: self.root / "splits.json")
    audit = property(lambda self: self.root / "audit.json")
    log = property(lambda self: self.root / "train.log")
    history = property(lambda self: self.root / "history.jsonl")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.md")
    checkpoints = property(lambda self: self.root / "checkpoints")
    model = property(lambda self: self.root / "model")
    export = property(lambda self: self.root / "export")
    card = property(lambda self: self.root / "model" / "README.md")  # the Hub model card

    def predictions(self, split: str) -> Path:
        return self.root / "predictions" / f"{split}.jsonl"

    def finished(self) -> bool:
        """Training wrote the model's metadata last, so its presence means the run finished."""
        return (self.model / META).is_file()

    def read_metrics(self) -> dict:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


def write_meta(folder: Path, meta: dict) -> None:
    write_json(folder / META, meta)


def update_task_state(folder: Path, task: Any) -> None:
    """Rewrite only the task state in a model folder's lmtune.json (a new abstention threshold)."""
    meta = read_meta(folder)
    meta["task_state"] = task.state()
    write_meta(folder, meta)


def save_task_arrays(task: Any, folder: Path) -> None:
    arrays = task.arrays()
    if arrays:
        from safetensors.numpy import save_file
        save_file({k: v.copy() for k, v in arrays.items()}, folder / TASK_ARRAYS)


def restore_task_state(task: Any, meta: dict, folder: Path) -> None:
    """The task's saved state: small values from lmtune.json, arrays from safetensors."""
    task.set_state(meta.get("task_state", {}))
    if (folder / TASK_ARRAYS).is_file():
        from safetensors.numpy import load_file
        task.set_arrays(load_file(folder / TASK_ARRAYS))
