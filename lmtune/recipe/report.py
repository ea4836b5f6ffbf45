"""The recipe's last core stage: metrics.json, history.jsonl, results.json and report.md (main
process), then the Run every process returns; and peft.compare_full's side-by-side table."""
from __future__ import annotations

import json
import logging
import math

from lmtune import results
from lmtune.diagnose import diagnose
from lmtune.io import write_json, write_jsonl
from lmtune.peft import artifact_bytes, rank_pattern
from lmtune.recipe.context import Context
from lmtune.tasks.base import EXAMPLE_LABELS, GENERATE

log = logging.getLogger("lmtune")

TRAIN_KEYS = ("steps", "lr", "head_lr", "peft_method", "trainable_pct", "artifact_mb", "peak_mem_mb", "peak_mem_increase_mb",
              "seconds_per_epoch", "resumed", "seconds_per_step", "rank_pattern", "train_seconds", "eval_seconds",
              "checkpoint_seconds", "stop_reason", "best_step", "best_metric", "trainable_params", "total_params", "truncation")


def write_results(ctx: Context) -> None:
    """metrics.json, history.jsonl and report.md (main process), then the Run every process returns."""
    from lmtune.inference import Run
    if ctx.main:
        _write_files(ctx)
    ctx.accelerator.wait_for_everyone()
    ctx.run = Run(ctx.rd.root, ctx.built.model, ctx.built.tokenizer, ctx.task, ctx.splits.labels, ctx.cfg, ctx.rd.read_metrics())


def _write_files(ctx: Context) -> None:
    summary, lrs, state, out = train_summary(ctx), ctx.built.lrs, ctx.fit.state, ctx.outcome
    keys = (*(("adversarial",) if ctx.fit.adversary else ()), *TRAIN_KEYS)
    metrics = {**out.split_metrics, "train": {k: summary[k] for k in keys}, "metric": lrs.metric,
               "headline": list(ctx.task.headline), **({"continual": out.continual} if out.continual else {})}
    baseline = (majority_baseline(ctx.splits.dev) if lrs.metric == "accuracy" and ctx.task.supports(EXAMPLE_LABELS)
                else None)
    findings = diagnose(state.history, lrs.metric, baseline)
    metrics["diagnosis"] = findings
    write_json(ctx.rd.metrics, metrics)
    write_jsonl(ctx.rd.history, state.history)
    for f in findings:
        log.warning("fit diagnosis: %s (%s): %s. %s", f["kind"], f["severity"], f["evidence"], f["advice"])
    results.write(ctx.rd.root, {"summary": summary, "metrics": out.split_metrics, "metric": lrs.metric,
                                "headline": list(ctx.task.headline), "diagnosis": findings, "audit": ctx.data.audit,
                                "task_report": ctx.task.report_state(),
                                **({"continual": out.continual} if out.continual else {}),
                                **({"fewshot": ctx.fewshot} if ctx.fewshot else {}),
                                **({"slices": out.slices} if out.slices else {}), **out.sections})
    results.render(ctx.rd.root)
    if ctx.task.supports(GENERATE):  # the outputs' control checks and the decoding chosen, as data
        write_json(ctx.rd.generation, {"decoding": ctx.task.decoding, "search": ctx.task.search,
                                       "splits": {k: m for k, m in out.split_metrics.items() if "rougeL" in m}})


def train_summary(ctx: Context) -> dict:
    cfg, state, built, fit = ctx.cfg, ctx.fit.state, ctx.built, ctx.fit
    summary = {"run_name": ctx.rd.root.name, "task": ctx.task.name, "model": cfg.model.name,
               "data": json.dumps({k: v for k, v in ctx.splits.info.items() if not k.endswith("_rows")}),
               "sizes": ctx.splits.info["sizes"], "labels": ctx.splits.labels, "max_length": cfg.data.max_length,
               "truncation": {k: v.stats for k, v in ctx.data.encoded.items()},
               "trainable_params": built.trainable, "total_params": built.total, "steps": state.step,
               "lr": built.lrs.lr, "head_lr": built.lrs.head_lr, "peft_method": cfg.peft.method,
               "trainable_pct": 100 * built.trainable / built.total, "peak_mem_mb": fit.peak_mem.peak_mb,
               "peak_mem_increase_mb": fit.peak_mem.peak_mb - fit.peak_mem.start_mb,
               # from the per-step times in the history, which a resumed run carries over from its first
               # part: the whole run's speed, not only the resumed part's
               "seconds_per_epoch": seconds_per_epoch(state.history, math.ceil(len(ctx.data.train_features) / cfg.train.batch_size)),
               "resumed": ({"from_step": fit.resumed_from, "steps_this_part": state.step - fit.resumed_from,
                            "seconds_this_part": fit.seconds} if fit.resumed_from is not None else None),
               "rank_pattern": rank_pattern(built.model),
               "train_seconds": fit.seconds, "eval_seconds": state.eval_seconds,
               "checkpoint_seconds": state.checkpoint_seconds, "stop_reason": state.stop_reason,
               "best_step": state.best_step, "best_metric": state.best_metric}
    summary["artifact_mb"] = artifact_bytes(ctx.rd.model) / 2**20
    step_rows = [r["seconds"] for r in state.history if "seconds" in r]
    summary["seconds_per_step"] = sum(step_rows) / max(len(step_rows), 1)
    if fit.adversary:
        summary["adversarial"] = fit.adversary.describe()
    return summary


def seconds_per_epoch(history: list[dict], steps_per_epoch: int) -> float:
    steps = [r["seconds"] for r in history if "seconds" in r]
    return sum(steps) / max(len(steps), 1) * steps_per_epoch


def majority_baseline(examples: list) -> float | None:
    """Accuracy of always answering the most frequent dev label (examples of a task with EXAMPLE_LABELS)."""
    labels = [ex.label for ex in examples]
    if not labels or None in labels:
        return None
    return max(labels.count(x) for x in set(labels)) / len(labels)
