"""Knowledge distillation: a trained run (one model, an ensemble, a soup, a larger backbone) teaches a
smaller or cheaper student, which comes out as an ordinary run directory.

The teacher's logits on the student's train split (the teacher's own config and seeded split, so the
student has the teacher's train / dev / test) and on optional unlabeled texts become soft targets,
log_softmax(logits / T). The logits are the calibrated ones (raw / the teacher's fitted temperature: the
probabilities its predict reports); an ensemble's are the log of its averaged calibrated probabilities.
The student trains through the task interface (a task with the distill capability: features carry
`soft_targets`, its loss becomes
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on labeled rows, the soft term alone
on unlabeled ones); the training loop, early stopping, calibration, report and run directory are the
ordinary ones. `compare` also trains the same student on the hard labels alone (same seed, same config),
and the run's results.json gets a `distill` section (report.md: Distillation).

NER is distilled per word: the teacher's tag distribution of each word (at its first sub-token) is the soft
target of the student's first sub-token of that word, the positions NER's hard labels use. With one tokenizer
for both (a truncated or smaller model of the teacher's family) those are the same sub-token: aligned by
position; with another tokenizer the words are what both see: aligned by word (the section's `alignment`).

`student_layers` truncates the student to its first N encoder layers (saved in the run as base_model/).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.errors import InputError

log = logging.getLogger("lmtune")

# Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") soften the teacher with a temperature
# (2.5 to 4 worked best for their small students; large ones tolerated 8 and more) and scale the soft term
# by T^2 so that its gradients keep their size as T changes; DistilBERT (Sanh et al. 2019) trains with T = 2.
# alpha 0.5 weighs the soft and hard terms equally, the usual start for task-specific distillation.
DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
BASE_MODEL = "base_model"  # the truncated student inside the run directory
HARD_ONLY = "hard_only"  # the comparison run (hard labels alone) inside the student's run directory


def distill(teacher_run_dir: str | Path, *, student: str, unlabeled: str | Path | None = None,
            temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA, student_layers: int | None = None,
            overrides: dict | None = None, compare: bool = True) -> dict:
    """Train `student` on the teacher run's soft targets; returns the `distill` section written into the
    student run's results.json ({teacher, student, hard_only, cost_ratio, temperature, alpha, ...}; the
    student run directory is student["run_dir"]). Every input error is raised before anything is written."""
    from lmtune import results
    from lmtune.api import load
    from lmtune.artifacts import RunDir, read_meta
    from lmtune.tasks import get_task
    from lmtune.tasks.base import DISTILL, ENSEMBLE

    if not temperature > 0:
        raise InputError(f"distill: --temperature {temperature}: give a positive temperature (2 to 4 is usual).")
    if not 0 <= alpha <= 1:
        raise InputError(f"distill: --alpha {alpha}: give a weight between 0 (hard labels only) and 1 (soft targets only).")
    teacher_dir = Path(teacher_run_dir)
    teacher = load(teacher_dir)
    teacher.task.require(DISTILL, "distill")
    if teacher_kind(read_meta(RunDir(teacher_dir).model)) == "ensemble" and not teacher.task.supports(ENSEMBLE):
        # not reachable through `lmtune ensemble`, which refuses such tasks; a hand-made one must not teach averages
        raise InputError(f"distill: {teacher_dir} is an ensemble of {teacher.task.name} runs, which has no averaged "
                         "per-example probabilities to teach; distil from one of its members or a soup (lmtune soup).")
    cfg = student_config(teacher.config, student, teacher_dir, overrides)
    check_student_layers(student, student_layers)
    task = get_task(cfg.task)
    splits = task.read(cfg)  # the teacher's data and seed: the teacher's own train / dev / test
    if splits.labels != teacher.labels:
        raise InputError(f"distill: the data gives labels {splits.labels[:5]}..., the teacher {teacher_dir} knows "
                         f"{teacher.labels[:5]}...; distill reads the teacher's own data (leave data.* as the teacher had it).")
    extra = read_unlabeled(task, str(unlabeled), cfg) if unlabeled else []
    teacher.config.train.progress = cfg.train.progress
    aligned = alignment(teacher, task, student)

    run, cfg = train_student(teacher, cfg, task, splits, extra, student, student_layers, temperature, alpha, unlabeled, aligned)
    hard_dir = train_hard_only(cfg, run.run_dir) if compare else None
    kind = "truncated" if student_layers is not None else "single"
    metric = run.metrics["metric"]
    split, examples = ("test", splits.test) if splits.test else ("dev", splits.dev)
    section = {"metric": metric, "split": split, "temperature": temperature, "alpha": alpha, "alignment": aligned,
               "train_rows": len(splits.train),
               "unlabeled_rows": len(extra), "unlabeled": str(unlabeled) if unlabeled else None,
               **compare_costs(teacher, run.run_dir, hard_dir, examples, metric, student, kind)}
    results.update(run.run_dir, distill=section)
    return section


def train_student(teacher, cfg, task, splits, extra: list, student: str, student_layers: int | None, temperature: float,
                  alpha: float, unlabeled, aligned: str = "example") -> tuple[Any, Any]:
    """The student's run (and its config, the truncated base model's path in it): a new run directory, the
    truncation inside it, the teacher's soft targets on train + unlabeled, then the ordinary recipe."""
    from lmtune.artifacts import new_run_dir
    from lmtune.config import build_config
    from lmtune.recipe import train_splits
    from lmtune.tasks.base import Splits

    run_dir = new_run_dir(cfg)  # claimed now: a truncated student goes inside it
    try:
        if student_layers is not None:
            base = truncate(student, student_layers, run_dir / BASE_MODEL)
            d = cfg.to_dict()
            cfg = build_config({**d, "model": {**d["model"], "gguf_file": None, "name": str(base)}})
        log.info("distill: the teacher's soft targets (T %g) on %d train and %d unlabeled texts", temperature,
                 len(splits.train), len(extra))
        taught = with_soft_targets(teacher, splits.train + extra, temperature)
        record = {"teacher": str(Path(teacher.run_dir).resolve()), "unlabeled": str(unlabeled) if unlabeled else None,
                  "unlabeled_rows": len(extra), "temperature": temperature, "alpha": alpha, "alignment": aligned}
        info = {**splits.info, "sizes": {**splits.info["sizes"], "train": len(taught)}, "distill": record}
        task.distill_with(temperature, alpha)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # our own half-written run, never user data
        raise
    return train_splits(cfg, task, Splits(taught, splits.dev, splits.test, splits.labels, info), run_dir=run_dir), cfg


def train_hard_only(cfg, student_dir: Path) -> Path:
    """The same student (same config, seed and base model) on the hard labels alone: RUN/hard_only."""
    from lmtune.config import build_config
    from lmtune.recipe import train_splits
    from lmtune.tasks import get_task

    out = student_dir / HARD_ONLY
    out.mkdir()
    hard_cfg = build_config({**cfg.to_dict(), "output_dir": str(student_dir), "run_name": HARD_ONLY})
    task = get_task(cfg.task)
    train_splits(hard_cfg, task, task.read(hard_cfg), run_dir=out)
    return out


def compare_costs(teacher, student_dir: Path, hard_dir: Path | None, examples: list, metric: str, student: str,
                  kind: str) -> dict:
    """Teacher, student (and hard-only student): metric on the examples, size and inference cost, one after
    the other on this machine, and the cost ratios."""
    from lmtune import runtime
    from lmtune.api import load
    from lmtune.artifacts import RunDir, read_meta
    out: dict[str, Any] = {"device": str(runtime.device()),
                           "teacher": measure(teacher, examples, metric, kind=teacher_kind(read_meta(RunDir(teacher.run_dir).model))),
                           "student": measure(load(student_dir), examples, metric, model=student, kind=kind)}
    if hard_dir is not None:
        out["hard_only"] = measure(load(hard_dir), examples, metric, model=student, kind=kind)
    out["cost_ratio"] = out["student"]["seconds_per_1000"] / max(out["teacher"]["seconds_per_1000"], 1e-9)
    # without tokenizing, which teacher and student share (an ensemble tokenizes once for all its members)
    out["model_cost_ratio"] = out["student"]["model_seconds_per_1000"] / max(out["teacher"]["model_seconds_per_1000"], 1e-9)
    return out


def student_config(teacher_cfg, student: str, teacher_dir: Path, overrides: dict | None):
    """The teacher's config (data, seed, epochs, ...) with the student's model, a run name of its own and
    the user's overrides."""
    from lmtune.config import build_config
    d = teacher_cfg.to_dict()
    d["model"] = {**d["model"], "name": student, "gguf_file": None}
    d["continual"] = {**d.get("continual", {}), "from_run": None}
    if not (overrides or {}).get("run_name"):
        d["run_name"] = f"{teacher_dir.resolve().name}-distilled"
    return build_config(d, overrides)


def check_student_layers(student: str, layers: int | None) -> None:
    """Refuse a truncation to N outside 1..the student's encoder layers (before anything is written)."""
    if layers is None:
        return
    from lmtune.models import load_config
    total = getattr(load_config(student), "num_hidden_layers", None)
    if total is None:
        raise InputError(f"distill: --student-layers: {student} does not say how many encoder layers it has "
                         "(no num_hidden_layers in its config); it cannot be truncated.")
    if not 1 <= layers <= total:
        raise InputError(f"distill: --student-layers {layers}: {student} has {total} encoder layers; give a number "
                         f"from 1 to {total}.")


def truncate(student: str, layers: int, out: Path) -> Path:
    """The student's first `layers` encoder layers (weights and config) with its tokenizer, saved at out
    (safetensors): the run's base model. transformers builds the shorter encoder and loads the layers it
    has from the checkpoint, dropping the later ones (and any task head)."""
    from transformers import AutoModel

    from lmtune.models import load_tokenizer, quiet_transformers, resolve_model
    path = resolve_model(student)
    with quiet_transformers():
        model = AutoModel.from_pretrained(path, num_hidden_layers=layers)
        model.save_pretrained(out)
        load_tokenizer(student).save_pretrained(out)
    log.info("distill: student %s truncated to its first %d encoder layers (%s)", student, layers, out)
    return out.resolve()


def read_unlabeled(task, path: str, cfg) -> list:
    """The unlabeled file's examples, read as predict reads a file (the data's text column, and text_pair column
    for a pair run; NER: tokens, CoNLL's first column or raw text), their labels dropped (a label column or tags,
    if any, are ignored); bad rows are file:line errors."""
    return task.without_labels(task.read_file(path, cfg, None, require_label=False))


def with_soft_targets(teacher, examples: list, temperature: float) -> list:
    """The examples, each with the teacher's soft targets at the temperature (classification: its log-probabilities,
    a tuple; NER: an array of each word's log-probabilities, as the task gives it)."""
    enc = teacher.encode(examples)
    soft = teacher.task.soft_targets(teacher.outputs(enc), enc, teacher.labels, temperature)
    return [dataclasses.replace(ex, soft_targets=_per_example(s)) for ex, s in zip(examples, soft)]


def _per_example(soft: Any) -> Any:
    """One example's soft targets as its example keeps them: a row over the labels as a tuple of floats (what the
    classification and multi-label features carry), a per-token task's array [tokens, labels] as it is."""
    arr = np.asarray(soft)
    return tuple(arr.astype(np.float64).tolist()) if arr.ndim == 1 else soft


def alignment(teacher, task, student: str) -> str:
    """How the teacher's soft targets meet the student's inputs (Task.soft_target_alignment): a token-level task
    aligns by position when both tokenizers are one (the same vocabulary: a truncated or smaller model of the
    teacher's family), by word otherwise."""
    from lmtune.models import load_tokenizer
    shared = load_tokenizer(student).get_vocab() == teacher.tokenizer.get_vocab()
    how = task.soft_target_alignment(shared)
    if how == "word":
        log.info("distill: %s has another tokenizer than the teacher: soft targets aligned by word (each word's first "
                 "sub-token in either model)", student)
    return how


def teacher_kind(meta: dict) -> str:
    """What the teacher run is: an ensemble, a soup, an adapter over a base model, or a single model."""
    for kind in ("ensemble", "soup"):
        if kind in meta:
            return kind
    return "adapter" if "base_model" in meta else "single"


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0


def _layers(model: Any) -> str | None:
    """Encoder layers: N, or an ensemble's "members x N"."""
    from lmtune.search.members import EnsembleModel
    if isinstance(model, EnsembleModel):
        inner = {_layers(m) for m in model.members}
        return f"{len(model.members)} x {inner.pop()}" if len(inner) == 1 else " + ".join(_layers(m) or "?" for m in model.members)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return None if n is None else str(n)


TIMING_REPEATS = 2  # timed passes over at most TIMING_TEXTS texts after the full one; the fastest counts
TIMING_TEXTS = 512


def _timed_outputs(run, examples: list) -> tuple[Any, list, float, float]:
    """(encoded, outputs, seconds per 1000 texts, of which the model's) of one pass: tokenizing included."""
    start = time.perf_counter()
    enc = run.encode(examples)
    encoded = time.perf_counter()
    outputs = run.outputs(enc)
    end, n = time.perf_counter(), max(len(examples), 1)
    return enc, outputs, 1000 * (end - start) / n, 1000 * (end - encoded) / n


def measure(run, examples: list, metric: str, model: str | None = None, kind: str = "single") -> dict:
    """A run's metric on the examples and its inference cost: seconds per 1000 texts, the fastest of the full
    pass and TIMING_REPEATS passes over its first TIMING_TEXTS texts (timeit's rule: slower passes measure
    what else the machine did), after one warm-up batch; the same procedure for teacher and students."""
    run.outputs(run.encode(examples[:8]))  # warm-up: lazy initialisation is not inference cost
    enc, outputs, per_1000, model_per_1000 = _timed_outputs(run, examples)
    for _ in range(TIMING_REPEATS):
        again = _timed_outputs(run, examples[:TIMING_TEXTS])
        per_1000, model_per_1000 = min(per_1000, again[2]), min(model_per_1000, again[3])
    value = run.task.evaluate(outputs, enc, run.labels).get(metric)
    return {"run_dir": str(Path(run.run_dir).resolve()), "model": model or run.config.model.name, "kind": kind,
            "layers": _layers(run.model), "parameters": _parameters(run.model), metric: None if value is None else float(value),
            "seconds_per_1000": per_1000, "model_seconds_per_1000": model_per_1000}
