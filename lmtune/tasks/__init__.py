"""Task registry: a new task is one module plus one line here (spaCy-style)."""
from __future__ import annotations

import importlib

from lmtune.errors import InputError

_REGISTRY = {
    "classification": "lmtune.tasks.classification:ClassificationTask",
    "ner": "lmtune.tasks.ner:NerTask",
}


def register(name: str, target: str) -> None:
    """Register a task class given as 'module:Class' (imported only when used)."""
    _REGISTRY[name] = target


def get_task(name: str):
    if name not in _REGISTRY:
        raise InputError(f"task: unknown task '{name}'. Known tasks: {', '.join(sorted(_REGISTRY))}.")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def task_names() -> list[str]:
    return sorted(_REGISTRY)
