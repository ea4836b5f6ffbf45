"""The Python API: `train(config) -> Run`, `load(run_dir) -> Run`, `Run.predict`, `Run.evaluate`.

A facade over the modules that do the work: lmtune.recipe (the training stages), lmtune.inference
(Run and its loaders), lmtune.artifacts (the run directory) and lmtune.runtime (devices, processes).
train() reads and validates all input before it creates anything on disk, then writes the run
directory: config.yaml, splits.json, checkpoints/, model/ (save_pretrained layout), metrics.json,
predictions/, report.md with its PNGs, and train.log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune import continual
from lmtune.artifacts import new_run_dir, resolve_run_dir, shared_run_dir
from lmtune.config import Config, build_config, load_config
from lmtune.errors import InputError
from lmtune.inference import Run, build_index, embed_texts, fit_output_controls, load
from lmtune.recipe import train_splits
from lmtune.recipe.optional import tracker_names
from lmtune.recipe.report import TRAIN_KEYS
from lmtune.registry import trackers
from lmtune.runtime import accelerator_for, device, partial_state
from lmtune.tasks import get_task
from lmtune.tasks.base import ABSTAIN, EXAMPLE_LABELS, LABEL_NOISE, MAHALANOBIS

__all__ = ["TRAIN_KEYS", "Run", "accelerator_for", "as_config", "build_index", "dataset_overrides", "device", "embed_texts",
           "fit_output_controls", "load", "new_run_dir", "partial_state", "resolve_run_dir", "shared_run_dir", "tracker_names",
           "train", "train_splits"]


def as_config(config: Config | dict | str | Path, overrides: dict | None = None) -> Config:
    """A Config from a Config, a dict or a YAML file, with dotted-key overrides applied."""
    if isinstance(config, Config):
        return build_config(config.to_dict(), overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def dataset_overrides(data: Any) -> dict[str, str]:
    """`datasets` objects handed to train(): a Dataset (train only), a DatasetDict or a dict with
    train / dev (or validation) / test. They become data.train / dev / test sources of this process."""
    import datasets
    from lmtune.data.hf_datasets import hold
    if isinstance(data, datasets.Dataset):
        data = {"train": data}
    if not isinstance(data, (dict, datasets.DatasetDict)):
        raise InputError(f"train(data=...): expected a datasets.Dataset, a DatasetDict or a dict of them, got {type(data).__name__}.")
    names = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
    unknown = set(data) - set(names)
    if unknown:
        raise InputError(f"train(data=...): unknown split(s) {', '.join(sorted(unknown))}; use train, dev (or validation), test.")
    return {f"data.{names[k]}": hold(ds, names[k]) for k, ds in data.items()}


def train(config: Config | dict | str | Path, overrides: dict | None = None, resume: bool | str | Path = False,
          callbacks: tuple = (), data: Any = None) -> Run:
    """Read data, fine-tune, restore the best checkpoint, evaluate, write the run directory.
    `data`: datasets.Dataset / DatasetDict objects instead of data.train / dev / test files."""
    if data is not None:
        overrides = {**(overrides or {}), **dataset_overrides(data)}
    cfg = as_config(config, overrides)
    task = get_task(cfg.task)
    if cfg.train.metric is not None and cfg.train.metric not in task.headline:
        raise InputError(f"train.metric: '{cfg.train.metric}' is not a metric of the {task.name} task "
                         f"(choose from {', '.join(task.headline)}).")
    for name in tracker_names(cfg):
        trackers.get(name).require()
    for key, on, capability in (("abstain.target", cfg.abstain.target != "none", ABSTAIN),
                                ("abstain.score", cfg.abstain.score != "probability", MAHALANOBIS),
                                ("data.label_noise_folds", cfg.data.label_noise_folds > 0, LABEL_NOISE),
                                ("data.resample", cfg.data.resample != "none", EXAMPLE_LABELS)):
        if on:
            task.require(capability, key)
    splits = task.read(cfg)  # every input error surfaces here, before anything is written
    previous = None
    if cfg.continual.from_run:
        splits, previous = continual.prepare(cfg, task, splits)
    return train_splits(cfg, task, splits, resume, callbacks, previous)


