"""Self-training on unlabeled text (data.unlabeled, the selftrain section): the trained and calibrated model
(the teacher) labels the unlabeled texts it is sure of, a student trains on the labeled data plus those
pseudo-labels, and rounds go on while the dev metric improves.

One round (self-training as in Scudder 1965 and Yarowsky 1995; a fresh student each round as in Xie et al.
2020's noisy student):

1. the teacher (round 0: the ordinary run; later: the best student so far) predicts the unlabeled texts not
   yet pseudo-labeled; a text's confidence is the calibrated probability of its top class (the temperature
   fitted on dev, what predict reports);
2. the threshold is the lowest value of selftrain.thresholds at which the teacher's own dev predictions with at
   least that confidence are selftrain.target_precision accurate. It is chosen from dev alone (test is never
   read) and from the teacher's dev predictions rather than by training a student per grid value: that would
   cost one fine-tuning per value and round, and pick on dev a third time (after early stopping and the round
   check below), which on a few-shot dev set selects noise;
3. of the texts above it, each class takes at most its share of the labeled train set's class distribution,
   the most confident first (class-balanced self-training: Zou et al. 2018, CBST; Wei et al. 2021, CReST): a
   weak teacher over-predicts the easy classes, and unbalanced pseudo-labels teach the student that bias;
   selftrain.max_per_class and max_per_round cap the counts further;
4. a student trains on train plus every kept pseudo-label through the recipe's own stages (build to restore:
   the same loop, early stopping and calibration) in RUN/selftrain/round-N/, from the pretrained weights
   (selftrain.reinit, as the noisy student does) or from the teacher's, with the few-shot method the run decided
   on its gold train split (fewshot.method auto counts labels, and pseudo-labels are not labels; a SetFit student
   samples its pairs from labels plus pseudo-labels);
5. it is kept only if its dev metric beats the teacher's; the first round that does not stops the rounds, and
   its pseudo-labels are dropped. The best model is what the run evaluates, saves and reports.

RUN/pseudo_labels.jsonl records every pseudo-label (its text's file:line, label, confidence, round, kept), and
results.json's `selftrain` section the rounds (report.md: Self-training).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lmtune.config import option
from lmtune.errors import InputError

log = logging.getLogger("lmtune")

# the recipe stages (by name, lmtune.recipe.STAGES) that train a round's student: the run's own from build to restore
# (fewshot included: a student uses the method its run decided on the gold train split, RecipeRounds.train passes it;
# deciding again on labels plus pseudo-labels would count pseudo-labels as labels, lmtune.fewshot.given_decision)
STUDENT_STAGES = ("build", "warm_start", "fewshot", "prepare_data", "adapt", "fit", "restore")


@dataclass
class UnlabeledData:
    """data.unlabeled (it joins the data section; registered in lmtune/registrations.py)."""
    unlabeled: str | None = option(None, path=True, help="Unlabeled texts for self-training (CSV, TSV, JSONL with data.text_column; a label "
                                         "column, if any, is ignored): after training, the calibrated model labels the texts "
                                         "it is confident about and a student retrains with them (the selftrain section). "
                                         "Classification.")


@dataclass
class SelfTrainConfig:
    """Self-training on data.unlabeled (lmtune.selftrain)."""
    rounds: int = option(3, "data.unlabeled: at most this many self-training rounds; they stop at the first round whose "
                            "student does not improve the dev metric (that round is dropped).", ge=1)
    thresholds: list[float] = option([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
                                     "Calibrated-confidence thresholds tried each round: the lowest at which the teacher's "
                                     "dev predictions above it reach target_precision is used (dev only, never test).")
    target_precision: float = option(0.9, "The accuracy on dev that the teacher's predictions above the threshold must "
                                          "reach; no threshold reaching it stops the rounds.", gt=0, le=1)
    balance: str = option("train", "Class balance of a round's pseudo-labels: train = each class takes at most its share "
                                   "of the labeled train set's classes (the most confident first), so a class the teacher "
                                   "over-predicts cannot swamp the others; none = every text above the threshold.",
                          ("train", "none"))
    max_per_class: int = option(0, "At most this many new pseudo-labels per class and round (the most confident); 0 = no "
                                   "cap beyond balance.", ge=0)
    max_per_round: int = option(0, "At most this many new pseudo-labels per round, shared among the classes by balance; "
                                   "0 = no cap.", ge=0)
    reinit: bool = option(True, "Train each round's student from the pretrained weights (noisy-student style, less "
                                "confirmation of the teacher's mistakes); false = continue from the teacher's weights "
                                "(full fine-tuning only).")

    def validate(self, cfg: Any, where: str) -> None:
        bad = [t for t in self.thresholds if not 0 < t <= 1]
        if not self.thresholds or bad:
            raise InputError(f"{where}: selftrain.thresholds must be confidences in (0, 1], got {self.thresholds}.")
        if not self.reinit and cfg.peft.method != "none":
            raise InputError(f"{where}: selftrain.reinit false continues from the teacher's weights, which needs full "
                             f"fine-tuning; set peft.method none, or selftrain.reinit true (peft.method is {cfg.peft.method}).")


# ---- the selection, from arrays alone ---------------------------------------------------------------
def choose_threshold(conf: np.ndarray, correct: np.ndarray, grid: list[float], target: float) -> dict:
    """The lowest grid value t at which the dev predictions with confidence >= t are at least `target`
    accurate (None when none is): the most pseudo-labels the dev set vouches for. Each value's dev precision
    and support are kept, so the choice can be checked."""
    rows = []
    for t in sorted(set(grid)):
        above = conf >= t
        n = int(above.sum())
        rows.append({"threshold": float(t), "dev_examples": n, "dev_precision": float(correct[above].mean()) if n else None})
    chosen = next((r for r in rows if r["dev_precision"] is not None and r["dev_precision"] >= target), None)
    return {"threshold": chosen["threshold"] if chosen else None,
            "dev_precision": chosen["dev_precision"] if chosen else None,
            "dev_examples": chosen["dev_examples"] if chosen else 0, "grid": rows}


def select(pred: np.ndarray, conf: np.ndarray, threshold: float, train_counts: np.ndarray, balance: str,
           max_per_class: int = 0, max_per_round: int = 0) -> np.ndarray:
    """Indices of the texts a round pseudo-labels, the most confident first: those at or above the threshold,
    each class's capped at its share of the train counts (balance train) of the round's total (every text
    above it, or max_per_round), and at max_per_class."""
    above = np.flatnonzero(conf >= threshold)
    total = min(len(above), max_per_round) if max_per_round else len(above)
    share = train_counts / max(train_counts.sum(), 1)
    picked = []
    for c in range(len(train_counts)):
        mine = above[pred[above] == c]
        cap = total if balance == "none" else math.ceil(total * share[c])
        if max_per_class:
            cap = min(cap, max_per_class)
        picked.extend(mine[np.argsort(-conf[mine], kind="stable")][:cap])
    picked = np.array(picked, dtype=int)
    picked = picked[np.lexsort((picked, -conf[picked]))]  # by confidence, then position: deterministic
    return picked[:max_per_round] if max_per_round else picked


# ---- the rounds -------------------------------------------------------------------------------------
@dataclass
class Model:
    """One model of the rounds: the teacher (round 0) or a round's student, with its dev metric."""
    round: int
    dev: float
    handle: Any = None  # what the hooks know it by (RecipeRounds: the recipe context that trained it)


class Hooks(Protocol):
    """What the rounds ask of the models (RecipeRounds on a training run; tests use fakes)."""

    def dev_predictions(self, model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """On dev: predicted label index, calibrated confidence, gold label index (-1: not a trained label)."""

    def predict(self, model: Model, examples: list) -> tuple[np.ndarray, np.ndarray]:
        """On the examples: predicted label index and calibrated confidence."""

    def train(self, round_no: int, pseudo: list, teacher: Model) -> Model:
        """A student trained on the labeled train split plus the pseudo-labeled examples."""

    def drop(self, model: Model) -> None:
        """A model no longer needed (a dropped or superseded student): free what it holds on disk."""


def rounds(teacher: Model, pool: list, labels: list[str], train_counts: np.ndarray, opts: SelfTrainConfig, metric: str,
           hooks: Hooks) -> tuple[Model, dict, list[dict]]:
    """Self-training rounds from the teacher over the unlabeled examples `pool`. Returns the best model,
    the results section (each round: threshold, dev precision above it, pseudo-labels per class, the student's
    dev metric, kept) and one row per pseudo-label (source, label, confidence, round, kept)."""
    from lmtune.training.loop import is_better  # the loop's own rule: lower is better for loss-like metrics
    best, taken, rows = teacher, [], []
    record: list[dict] = [{"round": 0, "dev": teacher.dev, "pseudo_labels": 0, "kept": True}]
    remaining = list(range(len(pool)))
    stop = f"reached selftrain.rounds ({opts.rounds})"
    for r in range(1, opts.rounds + 1):
        if not remaining:
            stop = "every unlabeled text has a pseudo-label"
            break
        dev_pred, dev_conf, gold = hooks.dev_predictions(best)
        known = gold >= 0
        choice = choose_threshold(dev_conf[known], (dev_pred == gold)[known], opts.thresholds, opts.target_precision)
        entry = {"round": r, "threshold": choice["threshold"], "dev_precision": choice["dev_precision"],
                 "dev_examples": choice["dev_examples"], "grid": choice["grid"]}
        if choice["threshold"] is None:
            stop = (f"round {r}: no threshold in selftrain.thresholds reaches dev precision {opts.target_precision} "
                    "with the teacher's predictions")
            record.append({**entry, "pseudo_labels": 0, "kept": False})
            break
        pred, conf = hooks.predict(best, [pool[i] for i in remaining])
        picked = select(pred, conf, choice["threshold"], train_counts, opts.balance, opts.max_per_class, opts.max_per_round)
        if not len(picked):
            stop = f"round {r}: no unlabeled text reaches the threshold {choice['threshold']}"
            record.append({**entry, "pseudo_labels": 0, "kept": False})
            break
        new = [(remaining[k], int(pred[k]), float(conf[k])) for k in picked]
        examples = [dataclasses.replace(pool[i], label=labels[p]) for i, p, _ in new]
        counts: dict[str, int] = {}
        for _, p, _ in new:
            counts[labels[p]] = counts.get(labels[p], 0) + 1
        log.info("self-training round %d: threshold %.2f (teacher's dev precision above it %.4f on %d examples): %d "
                 "pseudo-labels of %d unlabeled texts", r, choice["threshold"], choice["dev_precision"],
                 choice["dev_examples"], len(new), len(remaining))
        student = hooks.train(r, taken + examples, best)
        kept = is_better(metric, student.dev, best.dev)
        rows += [{"source": ex.source, "text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair is not None else {}),
                  "label": ex.label, "confidence": round(c, 6), "round": r, "kept": kept} for ex, (_, _, c) in zip(examples, new)]
        record.append({**entry, "pseudo_labels": len(new), "per_class": counts, "dev": student.dev, "kept": kept})
        log.info("self-training round %d: dev %s %.4f (best so far %.4f): %s", r, metric, student.dev, best.dev,
                 "kept" if kept else "dropped, rounds stop")
        if not kept:
            hooks.drop(student)
            stop = f"round {r}: dev {metric} did not improve ({student.dev:.4f}, best {best.dev:.4f})"
            break
        hooks.drop(best)
        best, taken = student, taken + examples
        used = {i for i, _, _ in new}
        remaining = [i for i in remaining if i not in used]
    section = {"metric": metric, "unlabeled_rows": len(pool), "target_precision": opts.target_precision,
               "threshold_rule": "lowest of selftrain.thresholds at which the teacher's dev predictions above it reach "
                                 "target_precision", "balance": opts.balance, "reinit": opts.reinit, "labels": list(labels),
               "rounds": record, "final_round": best.round, "pseudo_labels_kept": len(taken), "stop_reason": stop}
    return best, section, rows


# ---- on a training run (the recipe's stages) --------------------------------------------------------
def read_unlabeled(ctx: Any) -> None:
    """data.unlabeled's texts as unlabeled examples of the task, each with its file:line; read before the run
    writes anything, so a bad file is an InputError with nothing left behind. A label column is ignored."""
    from lmtune.tasks.base import SELF_TRAINING
    cfg, task = ctx.cfg, ctx.task
    task.require(SELF_TRAINING, "data.unlabeled")
    rows = task.read_file(cfg.data.unlabeled, cfg, None, require_label=False)
    labeled = sum(ex.label is not None for ex in rows)
    if labeled:
        log.warning("data.unlabeled: %s has a '%s' column; its %d labels are ignored (self-training labels the texts "
                    "itself)", cfg.data.unlabeled, cfg.data.label_column, labeled)
    ctx.inputs.unlabeled = rows  # as read: self_train drops the labels (and counts them for the report)


def self_train(ctx: Any, student_stages: tuple) -> None:
    """The rounds on a trained and restored run (lmtune.recipe's selftrain stage): the best model takes the run's
    place (its model, data, fit and outcome), pseudo_labels.jsonl is written and the section kept for results.json."""
    from lmtune.io import write_jsonl
    if ctx.main and ctx.rd.selftrain.exists():  # an interrupted earlier attempt's rounds (--resume): run them again
        shutil.rmtree(ctx.rd.selftrain)
    hooks = RecipeRounds(ctx, student_stages)
    labels = ctx.splits.labels
    counts = np.array([sum(ex.label == lab for ex in ctx.splits.train) for lab in labels], dtype=float)
    pool = [dataclasses.replace(ex, label=None) for ex in ctx.inputs.unlabeled]
    best, section, rows = rounds(hooks.teacher(), pool, labels, counts, ctx.cfg.selftrain, ctx.built.lrs.metric, hooks)
    hooks.use(best)
    if best.round:
        student, audit = best.handle, ctx.data.audit
        ctx.built, ctx.data, ctx.fit, ctx.outcome = student.built, student.data, student.fit, student.outcome
        ctx.fewshot = student.fewshot  # the method that trained the model the run keeps
        ctx.data.audit = audit  # the labeled data's audit: the rounds audit nothing
    section["unlabeled"] = ctx.cfg.data.unlabeled
    section["labels_ignored"] = sum(ex.label is not None for ex in ctx.inputs.unlabeled)
    ctx.outcome.sections["selftrain"] = section
    if ctx.main:
        write_jsonl(ctx.rd.pseudo_labels, rows)
    log.info("self-training: %s; the model of round %d is kept (%d pseudo-labels)", section["stop_reason"], best.round,
             section["pseudo_labels_kept"])


class RecipeRounds:
    """The rounds' hooks on a recipe context: each student is trained by the recipe's own stages on a context of
    its own (RUN/selftrain/round-N/). The task object is shared, and each model's calibration, threshold and
    scorer are task state: a snapshot is kept per model and put back before that model is used."""

    def __init__(self, ctx: Any, student_stages: tuple) -> None:
        self.ctx, self.stages = ctx, student_stages
        self.states: dict[int, tuple] = {}
        self.index = {lab: i for i, lab in enumerate(ctx.splits.labels)}

    def teacher(self) -> Model:
        self._snapshot(0)
        return Model(0, self._dev_metric(self.ctx), self.ctx)

    def use(self, model: Model) -> None:
        state, report, arrays = self.states[model.round]
        task = self.ctx.task
        task.set_state(dict(state))
        task.set_report_state(dict(report))
        task.set_arrays(dict(arrays))

    def dev_predictions(self, model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.use(model)
        c = model.handle
        enc = c.data.encoded["dev"]
        pred, conf = self.ctx.task.pseudo_labels(c.outcome.outputs("dev"), enc, c.splits.labels)
        return pred, conf, np.array([self.index.get(ex.label, -1) for ex in enc.examples])

    def predict(self, model: Model, examples: list) -> tuple[np.ndarray, np.ndarray]:
        from lmtune.tasks.base import encode_examples
        from lmtune.training.loop import predict_outputs
        self.use(model)
        c, task = model.handle, self.ctx.task
        enc = encode_examples(task, examples, c.built.tokenizer, c.cfg, c.splits.labels)
        outputs = predict_outputs(c.built.model, enc.features, c.data.collate, task.unbatch, c.accelerator.device,
                                  f"pseudo-label round {model.round + 1}", c.cfg.train.progress)
        return task.pseudo_labels(outputs, enc, c.splits.labels)

    def train(self, round_no: int, pseudo: list, teacher: Model) -> Model:
        from lmtune.artifacts import RunDir
        from lmtune.recipe.context import Context, Inputs
        ctx = self.ctx
        folder = ctx.rd.selftrain / f"round-{round_no}"
        folder.mkdir(parents=True, exist_ok=True)
        sizes = {**ctx.splits.info["sizes"], "train": len(ctx.splits.train) + len(pseudo)}
        splits = dataclasses.replace(ctx.splits, train=ctx.splits.train + pseudo,
                                     info={**ctx.splits.info, "sizes": sizes, "pseudo_labels": len(pseudo)})
        # the run's few-shot decision travels with the student: it was made on the gold labels (STUDENT_STAGES)
        student = Context(Inputs(ctx.cfg, ctx.task, splits, RunDir(folder), previous=ctx.inputs.previous,
                                 fewshot_decision=ctx.fewshot), ctx.accelerator)
        self.use(teacher)  # build and encode see the task as the teacher left it (pair encoding, scorer flag)
        for stage in self.stages:
            if stage.applies(student):
                stage.run(student)
            if stage.name == "build" and not ctx.cfg.selftrain.reinit:  # continue from the teacher's weights
                student.built.model.load_state_dict(teacher.handle.built.model.state_dict())
        self._snapshot(round_no)
        return Model(round_no, self._dev_metric(student), student)

    def drop(self, model: Model) -> None:
        """A student's checkpoints (its run folder keeps its log and events); the run's own (round 0) stay."""
        if model.round and self.ctx.main:
            shutil.rmtree(model.handle.rd.checkpoints, ignore_errors=True)

    def _snapshot(self, round_no: int) -> None:
        task = self.ctx.task
        self.states[round_no] = (dict(task.state()), dict(task.report_state()), dict(task.arrays()))

    def _dev_metric(self, c: Any) -> float:
        metrics = self.ctx.task.evaluate(c.outcome.outputs("dev"), c.data.encoded["dev"], c.splits.labels)
        return float(metrics[self.ctx.built.lrs.metric])
