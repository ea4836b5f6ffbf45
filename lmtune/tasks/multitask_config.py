"""The config keys of task multitask (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.training.batching import SAMPLING  # numpy only: reading the config stays torch-free
from lmtune.config import option
from lmtune.errors import InputError


@dataclass
class MultitaskConfig:
    """The `multitask` section, owned by task multitask: several tasks, each with its own data, trained over one
    shared encoder.

    Each sub-task is an ordinary lmtune config file (its task, its data and its task's own sections), so the same
    file trains that task alone. The multitask config gives the model and train sections for all of them.

    Why temperature sampling with T = 2 by default: proportional sampling (T = 1) lets a large task crowd out a
    small one, and equal shares (round_robin) repeat a small task's examples many times per epoch and overfit it;
    T5 (Raffel et al. 2020, section 3.5.2) found temperature-scaled mixing between the two the better trade-off,
    and multilingual models (XLM-R, mT5) use the same rule."""
    tasks: list[str] = option([], "task multitask: one lmtune config file per sub-task (its task, data and task sections; "
                                  "model and train come from this config). At least two.", configs=True)
    names: list[str] = option([], "task multitask: each sub-task's name (its outputs' key in predictions and over HTTP); "
                                  "default: each config file's name without its extension.")
    weights: list[float] = option([], "task multitask: each sub-task's loss weight (its mean loss per batch is multiplied "
                                      "by it); default 1 for each.")
    sampling: str = option("temperature", "task multitask: how an epoch's batches are shared out (each batch holds one "
                                          "task): temperature (shares proportional to examples ** (1/T)), proportional, "
                                          "or round_robin (equal shares, tasks in turn).", SAMPLING)
    temperature: float = option(2.0, "task multitask, sampling temperature: T (1 = proportional; larger moves towards "
                                     "equal shares).", ge=1.0)

    def validate(self, cfg: Any, where: str) -> None:
        if cfg.task != "multitask":
            return
        if len(self.tasks) < 2:
            raise InputError(f"{where}: multitask.tasks: give at least two sub-task config files (got {len(self.tasks)}).")
        for key in ("names", "weights"):
            given = getattr(self, key)
            if given and len(given) != len(self.tasks):
                raise InputError(f"{where}: multitask.{key}: {len(given)} values for {len(self.tasks)} tasks; give one per "
                                 "entry of multitask.tasks, or none.")
        if any(w < 0 for w in self.weights) or (self.weights and not any(self.weights)):
            raise InputError(f"{where}: multitask.weights must be >= 0 and not all 0, got {self.weights}.")
        names = self.names or []
        if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
            raise InputError(f"{where}: multitask.names must be distinct, non-empty and without '/', got {names}.")
