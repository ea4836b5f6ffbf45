"""Named registries for every pluggable kind: tasks, PEFT methods, adversaries, attacks, augmenters,
prediction backends, trackers, run analyses, export formats, and the config sections that tasks and features own.

A built-in or a newcomer registers a name with a lazy target ("module:attribute", imported only when
used) and metadata (e.g. a PEFT method's default learning rate). The built-ins are registered in
lmtune/registrations.py, which imports no implementation, so config.py can validate names against
the registries without an import cycle (spaCy's registry and registrations module work this way).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

from lmtune.errors import InputError


@dataclass
class Entry:
    name: str
    target: str | None  # "module:attribute", imported by load(); None for a name with metadata only
    meta: dict = field(default_factory=dict)

    def load(self) -> Any:
        if self.target is None:
            raise LookupError(f"{self.name} has no implementation to load")
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key  # key: the config key or flag that names an entry, for errors
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str | None = None, **meta: Any) -> None:
        self._entries[name] = Entry(name, target, meta)

    def unregister(self, name: str) -> None:
        """Drop a name (a test's own entry, once the test is done)."""
        self._all().pop(name, None)

    def _all(self) -> dict[str, Entry]:
        _ensure_registrations()
        return self._entries

    def names(self, **where: Any) -> tuple[str, ...]:
        """Registered names, in registration order; `where` filters on metadata (kind="word")."""
        return tuple(n for n, e in self._all().items() if all(e.meta.get(k) == v for k, v in where.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._all()

    def __iter__(self):
        return iter(self.names())

    def entry(self, name: str) -> Entry:
        self.check(name)
        return self._all()[name]

    def get(self, name: str) -> Any:
        """The registered implementation (imported now)."""
        return self.entry(name).load()

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        return self.entry(name).meta.get(key, default)

    def check(self, name: str, key: str | None = None) -> None:
        if name not in self._all():
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputError(f"{key or self.key}: unknown {self.kind} '{name}'; choose from {', '.join(self._entries)}.{hint}")


tasks = Registry("task", "task")
peft_methods = Registry("PEFT method", "peft.method")
adversaries = Registry("adversarial method", "adversarial.method")
attacks = Registry("attack", "attack.methods")
augmenters = Registry("augmentation", "augment.methods")
backends = Registry("prediction backend", "--backend")
trackers = Registry("tracker", "train.trackers")
analyses = Registry("analysis", "analysis")  # lmtune.analysis: what a trained run is asked, and its report section
# a dataclass of config fields (lmtune.config.option) that a task or feature owns; meta section: the config
# section its fields join (default: the entry's name, a section of its own), moved: {old key: new key}
config_sections = Registry("config section", "config")
# `lmtune export --format NAME`: the target exports a run (run_dir, **options); meta quantize: the --quantize
# values it declares; options: the other export flags it takes; tasks: the run tasks it serves (None: every task)
exporters = Registry("export format", "--format")
# `lmtune label RUN_DIR --strategy NAME` (lmtune.active.strategies): the target picks pool rows (pool, k) -> [(row, score)];
# meta multilabel: it has a multi-label form (else a multi-label run is refused)
query_strategies = Registry("query strategy", "--strategy")

_loaded = False


def _ensure_registrations() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("lmtune.registrations")
