"""The run directory's layout: the one module that names its files and reads and writes the model
metadata (lmtune.json) and the task state saved beside a model (model/, export/, a merged folder).

    RUN_DIR/config.yaml  splits.json  audit.json  train.log  history.jsonl  metrics.json  report.md
            checkpoints/  model/ (lmtune.json, task_state.safetensors, weights, tokenizer, README.md: the model card)
            predictions/{dev,test}.jsonl  export/ (the same metadata + ONNX files)
            drift_reference.safetensors (dev embeddings and scores for the serve drift monitor)
            running.json ({pid, host} while a process trains the run)
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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
    running_marker = property(lambda self: self.root / "running.json")  # {pid, host} while a process trains it

    def predictions(self, split: str) -> Path:
        return self.root / "predictions" / f"{split}.jsonl"

    def finished(self) -> bool:
        """Training wrote the model's metadata last, so its presence means the run finished."""
        return (self.model / META).is_file()

    def running(self) -> bool:
        """A live process on this machine is training the run: its marker names a pid that exists here.
        A marker left by a killed process (or one from another machine) does not count."""
        try:
            marker = json.loads(self.running_marker.read_text())
        except (OSError, ValueError):
            return False
        pid = marker.get("pid") if isinstance(marker, dict) else None
        if not isinstance(pid, int) or marker.get("host") != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by another user
            pass
        return True

    @contextmanager
    def mark_running(self) -> Iterator[None]:
        """running.json for as long as this process trains the run (removed however training ends)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.running_marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        try:
            yield
        finally:
            self.running_marker.unlink(missing_ok=True)

    def read_metrics(self) -> dict:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


def write_meta(folder: Path, meta: dict) -> None:
    """lmtune.json; its config with credentials masked (`lmtune push` uploads this file)."""
    from lmtune.redact import redact
    write_json(folder / META, {**meta, "config": redact(meta["config"])} if "config" in meta else meta)


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
