"""Continual fine-tuning: `lmtune train CONFIG --from RUN_DIR` (config `continual.*`).

The new run starts from a finished run's weights (a PEFT run's adapter is merged into its base
first), with the old labels first and the new ones appended: the head's old rows are copied, new
rows keep the fresh initialisation of a new head, so the model's logits for the old labels are
unchanged at step 0. Two forgetting guards: replay (a seeded share of the old run's training data,
re-read from its recorded sources) and L2-SP (a pull toward the old weights). The old run's test
split is evaluated before and after, and the difference is reported as forgetting.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtune.artifacts import RunDir, read_meta
from lmtune.config import Config, build_config
from lmtune.errors import InputError
from lmtune.peft import mergeable
from lmtune.tasks import get_task
from lmtune.tasks.base import CONTINUAL, Splits

log = logging.getLogger("lmtune")


@dataclass
class Previous:
    """What the new run takes from the old one."""
    run_dir: Path
    labels: list[str]  # the old run's labels, in its head's order
    state: dict[str, torch.Tensor]  # its weights (a PEFT run's merged into the base), CPU
    old_test: list = field(default_factory=list)  # its test split, for the forgetting figures
    replayed: int = 0
    dropped: list[str] = field(default_factory=list)
    kept_without_examples: list[str] = field(default_factory=list)
    old_test_before: dict | None = None  # the old model's metrics on old_test


def _old_config(run_dir: Path) -> tuple[dict, Config]:
    if not RunDir(run_dir).finished():
        raise InputError(f"continual.from_run: {run_dir} is not a finished lmtune run (no model/lmtune.json).")
    meta = read_meta(RunDir(run_dir).model)
    return meta, build_config(meta["config"])


def prepare(cfg: Config, task: Any, splits: Splits) -> tuple[Splits, Previous]:
    """Check the old run against the new config, add replay rows, merge the label lists. Runs before
    anything is written, so every problem is an InputError with nothing on disk."""
    c = cfg.continual
    run_dir = Path(c.from_run)
    task.require(CONTINUAL, "continual.from_run")
    meta, old_cfg = _old_config(run_dir)
    if meta["task"] != task.name:
        raise InputError(f"continual.from_run: {run_dir} is a {meta['task']} run; this config trains {task.name}.")
    if old_cfg.model.name != cfg.model.name:
        raise InputError(f"continual.from_run: {run_dir} was fine-tuned from {old_cfg.model.name}; set model.name to the "
                         f"same model (this config names {cfg.model.name}).")
    if cfg.peft.method != "none" and cfg.peft.method not in mergeable():
        raise InputError(f"continual.from_run: a continued run is saved merged (its base is the old run's weights); "
                         f"peft.method {cfg.peft.method} cannot be merged. Use one of {', '.join(mergeable())}, or none.")
    if cfg.train.class_weights != "none":
        raise InputError("continual.from_run: train.class_weights auto is not supported when continuing a run "
                         "(the weights are counted before the old labels join); leave it at none.")
    old_labels = list(meta["labels"])
    old_splits = _old_splits(old_cfg, run_dir)  # replay's rows and the old test split
    replay = _replay_rows(old_splits.train, c.replay, cfg.train.seed) if c.replay > 0 else []
    train = splits.train + replay
    present = {ex.label for ex in train}
    missing = [lab for lab in old_labels if lab not in present]
    if missing and c.missing_labels == "error":
        raise InputError(f"continual.from_run: {len(missing)} label(s) of {run_dir} have no example in the new training "
                         f"data ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}). Replay old data "
                         "(continual.replay 0.2), keep them in the head (continual.missing_labels keep) or drop them "
                         "(continual.missing_labels drop).")
    dropped = missing if c.missing_labels == "drop" else []
    labels = [lab for lab in old_labels if lab not in dropped] + [lab for lab in splits.labels if lab not in old_labels]
    known = set(labels)
    old_test = [ex for ex in old_splits.test if ex.label in known]
    info = {**splits.info, "continual": {"from_run": str(run_dir), "replayed": len(replay), "dropped_labels": dropped,
                                         "new_labels": [lab for lab in labels if lab not in old_labels]}}
    info["sizes"] = {**info["sizes"], "train": len(train)}
    prev = Previous(run_dir, old_labels, {}, old_test, len(replay), dropped,
                    [lab for lab in missing if lab not in dropped])
    if replay:
        log.info("continual: replaying %d rows of %s's training data (%.0f%%)", len(replay), run_dir, 100 * c.replay)
    return dataclasses.replace(splits, train=train, labels=labels, info=info), prev


def _old_splits(old_cfg: Config, run_dir: Path) -> Splits:
    """The old run's splits, re-read from the data sources its config records (same seed: same split)."""
    try:
        return get_task(old_cfg.task).read(old_cfg)
    except InputError as e:
        raise InputError(f"continual.from_run: cannot re-read the training data {run_dir} recorded ({e}). Replay and the "
                         "forgetting figures need the old data where it was.") from None


def _replay_rows(train: list, share: float, seed: int) -> list:
    k = round(share * len(train))
    return random.Random(seed).sample(train, k) if k else []


def load_previous(prev: Previous, load: Callable[[Path], Any]) -> None:
    """Load the old run's weights with load (inference.load, which the recipe passes in) merging a PEFT
    adapter, and measure the old model on its test split."""
    from lmtune.peft import is_peft, merge
    old = load(prev.run_dir)
    old.config.train.progress = "none"
    if prev.old_test:
        prev.old_test_before = old.evaluate_examples(prev.old_test)
    model = merge(old.model, old.config.peft.method) if is_peft(old.model) else old.model
    # the old run's raw weights: its saved output layer carries its calibration temperature (lmtune.fold),
    # which is no starting point (nor an L2-SP anchor) for the new head
    from lmtune.fold import text_probe, unfold_temperature
    unfold_temperature(model, old.task, text_probe(old.tokenizer, model))
    prev.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def warm_start(model: torch.nn.Module, prev: Previous, labels: list[str]) -> list[str]:
    """Copy the old weights into a freshly built model (same architecture, head for `labels`). The
    head's per-label tensors (outside the base model, leading dim = the old label count) get the old
    rows of the labels both runs share, in the new order; new labels keep their fresh rows; every
    other tensor is copied. Returns the names of the per-label head tensors."""
    index = {lab: i for i, lab in enumerate(prev.labels)}
    shared = [(i, index[lab]) for i, lab in enumerate(labels) if lab in index]
    new_rows = torch.tensor([a for a, _ in shared], dtype=torch.long)
    old_rows = torch.tensor([b for _, b in shared], dtype=torch.long)
    base = getattr(model, "base_model_prefix", "") + "."
    state = model.state_dict()
    unmatched = [k for k in prev.state if k not in state]
    if unmatched:
        raise InputError(f"continual.from_run: {prev.run_dir}'s weights do not fit this model ({unmatched[0]} ...); "
                         "continue with the same model.name and task.")
    head = []
    with torch.no_grad():
        for name, t in state.items():
            old = prev.state.get(name)
            if old is None:
                continue
            per_label = (not name.startswith(base) and old.dim() >= 1 and old.shape[0] == len(prev.labels)
                         and t.shape[0] == len(labels) and old.shape[1:] == t.shape[1:])
            if per_label:
                t[new_rows] = old[old_rows].to(t.dtype)
                head.append(name)
            elif old.shape == t.shape:
                t.copy_(old)
            else:
                raise InputError(f"continual.from_run: {name} has shape {tuple(old.shape)} in {prev.run_dir}, "
                                 f"{tuple(t.shape)} here; continue with the same model.name.")
    return head


def l2sp_loss(loss_fn: Callable, model: torch.nn.Module, prev: Previous, strength: float, head: list[str]) -> Callable:
    """L2-SP (Li et al., 2018): strength/2 * ||w - w_old||^2 over the weights shared with the old run
    (not the head, whose rows changed), added once per optimizer step: the task loss is a sum the loop
    divides by the step's item count, so the penalty is weighted by this micro-batch's items."""
    if strength <= 0:
        return loss_fn
    pairs = []
    for name, p in model.named_parameters():
        name = name.removeprefix("base_model.model.")  # a peft-wrapped model
        if p.requires_grad and name in prev.state and name not in head and prev.state[name].shape == p.shape:
            pairs.append((p, prev.state[name].to(p.device)))

    def loss(outputs, batch):
        penalty = sum(((p - p0) ** 2).sum() for p, p0 in pairs)
        items = (batch["labels"] != -100).sum()
        return loss_fn(outputs, batch) + 0.5 * strength * penalty * items
    return loss


def forgetting(prev: Previous, after: dict, metric: str) -> dict:
    """The old test split's metric before (old model) and after (new model), and their difference."""
    before = prev.old_test_before or {}
    out = {"from_run": str(prev.run_dir), "replayed": prev.replayed, "dropped_labels": prev.dropped,
           "kept_without_examples": prev.kept_without_examples, "metric": metric, "old_test_examples": len(prev.old_test)}
    if metric in before and metric in after:
        out.update(before=before[metric], after=after[metric], forgetting=before[metric] - after[metric])
    return out
