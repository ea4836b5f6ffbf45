"""The training recipe as a list of named stages over a typed context (recipe.context).

    [unlabeled], record, [label_noise], build, [warm_start], [fewshot], prepare_data, adapt, audit, [start_trackers], fit,
    restore, [selftrain], [decoding_search], evaluate, [index], [slices], [forgetting], [drift_reference], save,
    write_results, [attack], [finish_trackers]

Core stages always run; an optional one (in brackets) runs where its predicate holds. build makes the
backbone and head and adapt wraps it with PEFT and sets the learning rates; prepare_data sits between
them because augmentation and the synonym table read the un-wrapped model's embeddings, and PEFT's
schedule needs the number of training examples they produce. selftrain trains each round's student with
this list's own stages from build to restore (lmtune.selftrain.STUDENT_STAGES), not with a loop of its own.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmtune import fewshot, results
from lmtune.artifacts import RunDir, shared_run_dir
from lmtune.config import Config, build_config
from lmtune.io import write_json
from lmtune.models import check_model
from lmtune.recipe import optional as opt
from lmtune.recipe.context import Context, Inputs
from lmtune.recipe.report import write_results
from lmtune.recipe.stages import adapt, audit_data, build, evaluate, fit, prepare_data, record, restore, save
from lmtune.runtime import accelerator_for, partial_state
from lmtune.selftrain import STUDENT_STAGES

log = logging.getLogger("lmtune")


def _always(ctx: Context) -> bool:
    return True


def _main(ctx: Context) -> bool:
    return ctx.main


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], None]
    applies: Callable[[Context], bool] = _always


def self_train(ctx: Context) -> None:
    """data.unlabeled: the self-training rounds, each student trained by the stages of STAGES it names."""
    opt.self_train(ctx, tuple(s for s in STAGES if s.name in STUDENT_STAGES))


STAGES: tuple[Stage, ...] = (
    Stage("unlabeled", opt.read_unlabeled, opt.has_unlabeled),
    Stage("record", record),
    Stage("label_noise", opt.label_noise, opt.wants_label_noise),
    Stage("build", build),
    Stage("warm_start", opt.warm_start, opt.continues_a_run),
    Stage("fewshot", fewshot.stage, fewshot.applies),
    Stage("prepare_data", prepare_data),
    Stage("adapt", adapt),
    Stage("audit", audit_data),
    Stage("start_trackers", opt.start_trackers, opt.has_trackers),
    Stage("fit", fit),
    Stage("restore", restore),
    Stage("selftrain", self_train, opt.has_unlabeled),
    Stage("decoding_search", opt.search_decoding, opt.wants_decoding_search),
    Stage("evaluate", evaluate),
    Stage("index", opt.build_index, opt.has_index),
    Stage("slices", opt.measure_slices, opt.has_slices),
    Stage("forgetting", opt.measure_forgetting, opt.has_old_test),
    Stage("drift_reference", opt.drift_reference, opt.can_reference_drift),
    Stage("save", save, _main),
    Stage("write_results", write_results),
    Stage("attack", opt.attack, opt.wants_attack),
    Stage("finish_trackers", opt.finish_trackers, opt.tracking),
)


def new_context(cfg: Config, task, splits, run_dir: str | Path, resume: bool | str | Path = False, callbacks: tuple = (),
                previous=None) -> Context:
    """The context a run starts from: its inputs and the accelerator for its precision."""
    inputs = Inputs(cfg, task, splits, RunDir(run_dir), resume, callbacks, previous)
    return Context(inputs, accelerator_for(cfg.train.precision))


def run_stages(ctx: Context, stages: tuple[Stage, ...] = STAGES):
    """Each stage that applies, in order; trackers are closed as failed if one raises. Returns the Run."""
    try:
        for stage in stages:
            if stage.applies(ctx):
                stage.run(ctx)
    except BaseException:
        for tracker in ctx.trackers:
            try:
                tracker.close(failed=True)
            except Exception as e:  # the training error is the one to report, not a tracker's
                log.warning("tracker %s could not close its run: %s", type(tracker).__name__, e)
        raise
    return ctx.run


def train_splits(cfg: Config, task, splits, resume: bool | str | Path = False, callbacks: tuple = (), previous=None,
                 run_dir: Path | None = None):
    """Fine-tune on splits already read (train() reads them from the config; `lmtune cv` makes its folds):
    the run directory, its train.log, and the clean-up of a run that fails before its first checkpoint.
    run_dir: a new run directory the caller already created (lmtune prefer writes its pairs there first)."""
    check_model(cfg.model.name, cfg.data.max_length, cfg.model.gguf_file)  # a model that cannot load, or too short for max_length
    run_dir = run_dir or shared_run_dir(cfg, resume)
    main = partial_state().is_main_process
    handler = logging.FileHandler(RunDir(run_dir).log, encoding="utf-8") if main else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = log.level
    log.setLevel(logging.INFO)  # train.log always gets the full story; the console keeps its own level
    log.addHandler(handler)
    marker = RunDir(run_dir).mark_running() if main else contextlib.nullcontext()
    try:
        with marker:  # `lmtune runs` and the dashboard tell a run in progress from an interrupted one
            run = _train(cfg, task, splits, run_dir, resume, callbacks, previous)
        if cfg.peft.compare_full and cfg.peft.method != "none":
            compare_with_full(run, cfg, splits)
        return run
    except BaseException:
        # a new run that failed before its first checkpoint has nothing to resume: remove what it
        # wrote instead of leaving a half-written run directory behind
        if not resume and partial_state().is_main_process and not RunDir(run_dir).pointer.is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


def _train(cfg: Config, task, splits, run_dir: Path, resume, callbacks, previous=None):
    ctx = new_context(cfg, task, splits, run_dir, resume, callbacks, previous)
    log.info("run dir %s: %s", ctx.rd.root, ", ".join(f"{k} {v}" for k, v in splits.info["sizes"].items()))
    return run_stages(ctx)


COMPARED = ("trainable_pct", "artifact_mb", "peak_mem_mb", "seconds_per_epoch")


def compare_with_full(run, cfg: Config, splits) -> None:
    """peft.compare_full: full fine-tuning on the same splits, its figures next to the PEFT run's."""
    from lmtune.tasks import get_task
    sub = run.run_dir / "full_finetune_comparison"
    if RunDir(sub).metrics.is_file():  # finished by an earlier (resumed) call
        full_metrics = RunDir(sub).read_metrics()
    else:
        shutil.rmtree(sub, ignore_errors=True)  # our own unfinished output, never user data
        sub.mkdir(parents=True)
        d = cfg.to_dict()
        d.update(output_dir=str(run.run_dir), run_name=sub.name)
        d["peft"] = {**d["peft"], "method": "none", "compare_full": False}
        d["train"] = {**d["train"], "lr": None, "head_lr": None}  # full fine-tuning's own defaults
        full_metrics = _train(build_config(d), get_task(cfg.task), splits, sub, False, ()).metrics
    metric = run.metrics["metric"]
    rows = {cfg.peft.method: run.metrics, "full": full_metrics}
    table = {name: {metric: m["dev"][metric], **{k: m["train"][k] for k in COMPARED}} for name, m in rows.items()}
    run.metrics["comparison"] = table
    write_json(RunDir(run.run_dir).metrics, run.metrics)
    results.update(run.run_dir, comparison=table)


__all__ = ["STAGES", "Context", "Stage", "compare_with_full", "new_context", "run_stages", "train_splits"]
