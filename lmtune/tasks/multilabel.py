"""Multi-label classification: any number of labels per text (topics, emotions, tags), none included.

What this module gets right that the usual scripts do not:
- decision thresholds chosen on dev for the metric the user chose (`train.metric`) and saved with the
  model, instead of 0.5 for every label: for macro F1 (the default) a threshold per label, each at that
  label's best dev F1 (rare labels almost never reach 0.5 after short training, so their F1 is 0); for a
  metric that pools labels or scores each text (micro / samples F1, samples Jaccard, subset accuracy,
  Hamming loss) one threshold shared by every label, the grid value best on dev for that metric (per-label
  F1 thresholds over-predict there: on one unseen set 4,373 labels against 2,161 gold ones, samples
  Jaccard 0.338 against 0.437 at 0.5); the report shows the dev trade-off over shared thresholds;
- a temperature per label fitted on dev (calibrated probabilities; ECE before/after in the report);
- `train.class_weights auto` weights each label's positives by its negative/positive ratio (BCE
  pos_weight, capped), for rare labels;
- metrics from scikit-learn: micro / macro / samples F1, samples Jaccard, per-label P/R/F1, subset
  accuracy, Hamming loss.
Labels come as a separated list in one column (`data.label_separator`), a JSON list, or one 0/1
column per label (`data.label_columns`); rows with no label are allowed.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.data.readers import Example, is_invisible, read_rows, row_unit
from lmtune.errors import InputError
from lmtune.evaluate.calibration import choose_temperature
from lmtune.evaluate.report import prf_table
from lmtune.io import atomic_path
from lmtune.models import load_config, load_pretrained, quiet_transformers
from lmtune.tasks.windows import encode_windows, pool, training_subset
from lmtune.tasks.base import (SHARED_ENCODER, ACTIVE, CALIBRATE, DISTILL, EXPLAIN, FOLD, Encoded, LabelScores, Splits, Task, attach_soft_targets,
                               collate_soft_targets,
                               dev_and_test, input_pad_values, pad_batch)
from lmtune.tasks.multilabel_config import MultiLabelColumns  # noqa: F401  (re-exported: code and saved configs name it here)

POS_WEIGHT_CAP = 30.0  # a label seen once in 10,000 rows would otherwise get a weight of 10,000
_TRUE, _FALSE = ("1", "1.0", "true", "yes"), ("0", "0.0", "false", "no", "")


@dataclass
class MultiLabelExample(Example):
    labels: list[str] | None = None  # None: unlabeled (predict); [] is a labeled row with no label

    def audit_units(self) -> list[str]:
        return list(self.labels or [])

    def audit_gold(self) -> str | None:
        return None if self.labels is None else "|".join(sorted(self.labels))


def binary_soft_target_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed T^2 * KL(teacher_T || student_T) of each label's Bernoulli distribution (sigmoid of the logits / T;
    soft_targets: the teacher's logits / T, NaN rows: none): the cross-entropy to the teacher's probabilities
    less their entropy, so that it is 0 where the student matches."""
    has = ~torch.isnan(soft_targets[:, :1])
    teacher = torch.nan_to_num(soft_targets.to(logits.device), nan=0.0)
    p = torch.sigmoid(teacher)
    kl = (F.binary_cross_entropy_with_logits(logits.float() / temperature, p, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher, p, reduction="none"))
    return (kl * has.to(kl.device)).sum() * temperature ** 2


def _fit_label_temperatures(logits: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """A temperature per label minimising the dev BCE of sigmoid(logits / T), kept within [0.05, 20]."""
    x, y = torch.from_numpy(logits).double(), torch.from_numpy(gold).double()
    log_t = torch.zeros(logits.shape[1], dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    return log_t.detach().exp().clamp(0.05, 20).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _binary_ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE over every (example, label) probability: |mean predicted - observed rate| per bin, weighted."""
    p, y = p.ravel(), y.ravel()
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / max(len(p), 1))


class MultiLabelTask(Task):
    name = "multilabel"
    headline = ("macro_f1", "micro_f1", "samples_f1", "samples_jaccard", "subset_accuracy", "hamming_loss", "loss")
    peft_task_type = "SEQ_CLS"
    capabilities = frozenset({SHARED_ENCODER, CALIBRATE, EXPLAIN, FOLD, DISTILL, ACTIVE})
    decision_key = "labels"
    encode_options = {"long_text": "long_text", "overlap": "window_overlap"}

    def __init__(self) -> None:
        self.temperatures: list[float] | None = None  # per label, fitted on dev
        # per label, what the saved output layer's rows are already divided by (lmtune.fold): _stack
        # multiplies the logits back, so everything here works on raw logits; None: nothing folded
        self.folded_temperatures: list[float] | None = None
        self.thresholds: list[float] | None = None  # per label, chosen on dev; None: 0.5 for all
        self.threshold_metric = PER_LABEL_METRIC  # train.metric: what the thresholds are chosen for
        self.pos_weight: torch.Tensor | None = None
        self.calibration: dict = {}
        self.pooling, self.max_windows = "mean", 8  # data.long_text windows (tasks/windows.py)
        self.distillation: tuple[float, float] | None = None  # (temperature, alpha) while a student trains (lmtune.distill)

    def state(self) -> dict:
        return {"temperatures": self.temperatures, "folded_temperatures": self.folded_temperatures,
                "thresholds": self.thresholds, "threshold_metric": self.threshold_metric, "pooling": self.pooling,
                "max_windows": self.max_windows}

    def set_state(self, state: dict) -> None:
        self.temperatures, self.thresholds = state.get("temperatures"), state.get("thresholds")
        self.threshold_metric = state.get("threshold_metric", PER_LABEL_METRIC)
        self.folded_temperatures = state.get("folded_temperatures")
        self.pooling, self.max_windows = state.get("pooling", "mean"), state.get("max_windows", 8)

    def report_state(self) -> dict:
        return {"calibration": self.calibration}

    def set_report_state(self, data: dict) -> None:
        self.calibration = data.get("calibration", {})

    # ---- data -------------------------------------------------------------------------------
    def _labels_of(self, row: dict, cfg: Config, where: str, require_label: bool) -> list[str] | None:
        d = cfg.data
        if d.label_columns:
            out = []
            for col in d.label_columns:
                if col not in row:
                    raise InputError(f"{where}: no column '{col}' (data.label_columns). Columns are: {', '.join(map(repr, row))}.")
                value = str(row[col]).strip().lower()
                if value not in _TRUE + _FALSE:
                    raise InputError(f"{where}: column '{col}' holds {row[col]!r}; label columns hold 0 or 1.")
                if value in _TRUE:
                    out.append(col)
            return out
        if d.label_column not in row:
            if require_label:
                raise InputError(f"{where}: no column '{d.label_column}' (columns are: {', '.join(map(repr, row))}). "
                                 "Rename the column, set data.label_column, or give data.label_columns.")
            return None
        raw = row[d.label_column]
        if raw is None:
            return []
        if isinstance(raw, list):
            if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in raw):
                raise InputError(f"{where}: '{d.label_column}' must be a list of label names.")
            labels = [str(x).strip() for x in raw]
        elif isinstance(raw, (dict, bool, float)):
            raise InputError(f"{where}: '{d.label_column}' holds {raw!r}; give a list of labels or a "
                             f"'{d.label_separator}'-separated string.")
        else:
            labels = [x.strip() for x in str(raw).split(d.label_separator)]
        labels = [x for x in labels if x]
        if len(set(labels)) != len(labels):
            raise InputError(f"{where}: a label appears twice in one row ({', '.join(labels)}).")
        return labels

    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[MultiLabelExample]:
        d = cfg.data
        known = set(labels) if labels is not None else None
        examples = []
        unit = row_unit(path)
        for line, row in read_rows(path, d.format, d.encoding):
            where = f"{path}: {unit} {line}"
            text = row.get(d.text_column)
            if d.text_column not in row:
                raise InputError(f"{where}: no column '{d.text_column}' (columns are: {', '.join(map(repr, row))}). "
                                 "Rename the column or set data.text_column.")
            if not isinstance(text, str) or not text.strip() or is_invisible(text):
                raise InputError(f"{where}: empty or invisible text in column '{d.text_column}'. Fill it in or remove the row.")
            found = self._labels_of(row, cfg, where, require_label)
            for lab in found or []:
                if known is not None and lab not in known:
                    raise InputError(f"{where}: label '{lab}' never appears in the training data "
                                     f"(known labels: {', '.join(sorted(known))}).")
            examples.append(MultiLabelExample(text.strip(), None, f"{path}:{line}", labels=found))
        return examples

    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        self.pooling, self.max_windows = d.window_pooling, d.max_windows
        self.threshold_metric = cfg.train.metric or PER_LABEL_METRIC
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        train = self.read_file(d.train, cfg)
        counts = Counter(lab for ex in train for lab in ex.labels)
        labels = list(d.label_columns) if d.label_columns else sorted(counts)
        if len(labels) < 2:
            raise InputError(f"{d.train}: {len(labels)} label(s) in the training data; multi-label needs at least 2.")
        train, dev, test, info = dev_and_test(self, cfg, train, labels)
        if not dev:
            raise InputError(f"{d.train}: too few rows to split off a dev set; give data.dev.")
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        if cfg.train.class_weights == "auto":
            pos = np.array([sum(lab in ex.labels for ex in train) for lab in labels], dtype=float)
            w = np.clip((len(train) - pos) / np.maximum(pos, 1), 1.0, POS_WEIGHT_CAP)
            self.pos_weight = torch.tensor(w, dtype=torch.float)
            info["pos_weight"] = dict(zip(labels, np.round(w, 3).tolist()))
        return Splits(train, dev, test, labels, info)

    def from_texts(self, texts: list) -> list[MultiLabelExample]:
        return [MultiLabelExample(t, None, "") for t in texts]

    def audit_findings(self, splits: Splits) -> list[dict]:
        train = [ex for ex in splits.train if ex.labels is not None]  # a distilled student's unlabeled rows have none
        sizes = [len(ex.labels) for ex in train]
        none = sum(s == 0 for s in sizes)
        pairs = Counter(p for ex in train for p in itertools.combinations(sorted(ex.labels), 2))
        counts = Counter(lab for ex in train for lab in ex.labels)
        out = [{"check": "label_cardinality", "severity": "info",
                "detail": f"{np.mean(sizes):.2f} labels per training row on average (max {max(sizes)}); {none} row(s) have none",
                "suggestion": "Rows without a label teach the model to stay silent; check that they are meant.",
                "examples": [ex.source for ex in train if not ex.labels][:5]}]
        rare = sorted(lab for lab in splits.labels if counts[lab] < 10)
        if rare:
            out.append({"check": "rare_labels", "severity": "warning",
                        "detail": f"{len(rare)} label(s) have fewer than 10 training rows: {', '.join(rare[:10])}",
                        "suggestion": "Their thresholds and F1 rest on few examples; add rows or merge them.", "examples": []})
        if pairs:
            top = ", ".join(f"{a}+{b} {n}" for (a, b), n in pairs.most_common(5))
            out.append({"check": "label_co_occurrence", "severity": "info", "detail": f"most frequent label pairs: {top}",
                        "suggestion": "Labels that always come together may be one label.", "examples": []})
        return out

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        config = load_config(cfg.model.name, cfg.model.dropout, num_labels=len(labels), problem_type="multi_label_classification",
                             id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
                             gguf=cfg.model.gguf_file)
        return load_pretrained(AutoModelForSequenceClassification, cfg.model.name, config, cfg.model.gguf_file)

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return load_pretrained(AutoModelForSequenceClassification, str(model_dir))

    # ---- encoding and batching --------------------------------------------------------------
    def encode(self, examples: list[MultiLabelExample], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               long_text: str = "truncate", overlap: int | None = None) -> Encoded:
        texts = [ex.text for ex in examples]
        if long_text == "windows":
            windows, stats = encode_windows(texts, tokenizer, max_length, overlap)
            targets = [self._target(ex, labels) for ex in examples]
            features = [{**f, "example": i, **({"target": targets[i]} if targets[i] is not None else {})}
                        for i, ws in enumerate(windows) for f in ws]
            return Encoded(attach_soft_targets(features, examples), examples, stats)
        with quiet_transformers():
            full = tokenizer(texts, add_special_tokens=True)["input_ids"]
        too_long = sum(len(ids) > max_length for ids in full)
        enc = tokenizer(texts, truncation=True, max_length=max_length) if too_long else {"input_ids": full}
        features = []
        for i, ex in enumerate(examples):
            f = {"input_ids": enc["input_ids"][i], "length": len(enc["input_ids"][i])}
            target = self._target(ex, labels)
            if target is not None:
                f["target"] = target
            features.append(f)
        return Encoded(attach_soft_targets(features, examples), examples, {"truncated": too_long, "examples": len(examples),
                                                                           "max_tokens": max((len(x) for x in full), default=0)})

    @staticmethod
    def _target(ex: MultiLabelExample, labels: list[str] | None) -> list[float] | None:
        if ex.labels is None or not labels:
            return None
        return [1.0 if lab in ex.labels else 0.0 for lab in labels]

    def train_features(self, enc: Encoded) -> list[dict]:
        return training_subset(enc.features, self.max_windows)

    def _stack(self, outputs: list[np.ndarray], enc: Encoded) -> np.ndarray:
        """Raw logits per text (a long text's windows pooled; what the weights carry multiplied back)."""
        logits = np.stack(pool(outputs, enc.features, len(enc.examples), self.pooling))
        return logits * np.asarray(self.folded_temperatures, dtype=np.float32) if self.folded_temperatures else logits

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, tokenizer)
        targets = [f.get("target") for f in features]
        width = next((len(t) for t in targets if t is not None), 0)
        if width:  # unlabeled rows among labeled ones (a distilled student's, lmtune.distill): NaN, no hard term
            batch["labels"] = torch.tensor([t if t is not None else [float("nan")] * width for t in targets], dtype=torch.float)
        soft = collate_soft_targets(features) if self.distillation else None
        if soft is not None:
            batch["soft_targets"] = soft
        return batch

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        return input_pad_values(tokenizer)

    def num_items(self, features: list[dict]) -> int:
        return len(features)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BCE summed over labels and examples (averaged per example by the loop)."""
        logits = outputs.logits.float()
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        if self.distillation is None or "soft_targets" not in batch:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"], pos_weight=weight, reduction="sum")
        temperature, alpha = self.distillation
        labels = batch["labels"]
        labeled = ~torch.isnan(labels[:, :1])  # masked arithmetic, not indexing: the shapes stay static
        hard = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels, nan=0.0), pos_weight=weight,
                                                  reduction="none") * labeled
        return alpha * binary_soft_target_loss(logits, batch["soft_targets"], temperature) + (1 - alpha) * hard.sum()

    # ---- distillation (lmtune.distill) ----------------------------------------------------------
    def soft_targets(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], temperature: float) -> np.ndarray:
        """Calibrated logits / T, per label (the sigmoid of each is the teacher's softened probability); calibrated
        for the reason classification's are (a badly scaled small model)."""
        t = np.asarray(self.temperatures, dtype=np.float32) if self.temperatures else np.float32(1.0)
        return self._stack(outputs, enc) / t / np.float32(temperature)

    def distill_with(self, temperature: float, alpha: float) -> None:
        self.distillation = (float(temperature), float(alpha))

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs.logits.float(), batch["labels"], reduction="none").sum(1)

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        return list(outputs.logits.float().cpu().numpy())

    # ---- decisions ----------------------------------------------------------------------------
    def _probs(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        t = np.array(self.temperatures) if calibrated and self.temperatures else 1.0
        return _sigmoid(logits / t)

    def _decide(self, probs: np.ndarray) -> np.ndarray:
        th = np.array(self.thresholds) if self.thresholds else np.full(probs.shape[1], 0.5)
        return probs >= th

    @staticmethod
    def _gold(enc: Encoded, labels: list[str]) -> np.ndarray:
        index = {lab: i for i, lab in enumerate(labels)}
        gold = np.zeros((len(enc.examples), len(labels)))
        for i, ex in enumerate(enc.examples):
            for lab in ex.labels or []:
                gold[i, index[lab]] = 1
        return gold

    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """A temperature per label (minimum BCE on dev) where it lowers the held-out dev ECE
        (choose_temperature; else none), then the thresholds for train.metric on the resulting probabilities
        (choose_thresholds), with the dev trade-off over shared thresholds for the report."""
        logits, gold = self._stack(outputs, enc), self._gold(enc, labels)
        c = choose_temperature(logits, gold, _fit_label_temperatures, lambda z, y: _binary_ece(_sigmoid(z), y),
                               identity=np.ones(len(labels)))
        self.temperatures = [round(float(t), 6) for t in c["temperature"]]
        probs = self._probs(logits)
        self.thresholds, rule = choose_thresholds(probs, gold, self.threshold_metric)
        before, after = _binary_ece(_sigmoid(logits), gold), _binary_ece(probs, gold)
        self.calibration = {"dev_ece_before": before, "dev_ece_after": after, "applied": c["applied"], "decision": c["decision"],
                            "method": c["method"], "held_out_ece": [c["dev_ece_before"], c["dev_ece_after"]],
                            "temperatures": dict(zip(labels, self.temperatures)), "thresholds": dict(zip(labels, self.thresholds)),
                            "threshold_rule": rule, "threshold_metric": self.threshold_metric,
                            "tradeoff": threshold_tradeoff(probs, gold, self.thresholds)}
        return {"temperature": self.temperatures, "dev_ece_before": c["dev_ece_before"], "dev_ece_after": c["dev_ece_after"],
                "applied": c["applied"], "decision": c["decision"], "method": c["method"]}

    # ---- the temperatures in the weights (lmtune.fold) ------------------------------------------
    def temperature_to_fold(self) -> list[float] | float:
        return self.temperatures or 1.0

    @property
    def folded_temperature(self) -> list[float] | float:
        return self.folded_temperatures or 1.0

    def set_folded(self, folded) -> None:
        values = np.atleast_1d(np.asarray(folded, dtype=np.float64))
        self.folded_temperatures = None if np.all(values == 1.0) else [float(v) for v in values]

    def _unfolded(self) -> np.ndarray | float:
        """What the model's logits must still be divided by for calibrated probabilities."""
        t = np.asarray(self.temperatures, dtype=np.float64) if self.temperatures else 1.0
        return t / np.asarray(self.folded_temperatures, dtype=np.float64) if self.folded_temperatures else t

    # ---- metrics and outputs ------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        from sklearn.metrics import precision_recall_fscore_support
        logits, gold = self._stack(outputs, enc), self._gold(enc, labels)
        probs = self._probs(logits)
        pred = self._decide(probs).astype(int)
        p, r, f, s = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(), torch.from_numpy(gold).double(),
                                                        reduction="sum") / max(len(gold), 1))
        return {**decision_scores(gold, pred), "loss": loss, "n": len(gold), "ece": _binary_ece(probs, gold),
                "per_label": {lab: {"precision": float(p[j]), "recall": float(r[j]), "f1-score": float(f[j]), "support": int(s[j])}
                              for j, lab in enumerate(labels)}}

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        probs = self._probs(self._stack(outputs, enc))
        chosen = self._decide(probs)
        rows = []
        for ex, pr, ch in zip(enc.examples, probs, chosen):
            row = {"text": ex.text, "labels": [lab for lab, c in zip(labels, ch) if c],
                   "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, pr)}}
            if ex.labels is not None:
                row["gold"] = ex.labels
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def label_scores(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> LabelScores:
        """Each label's calibrated sigmoid, and the per-label thresholds chosen on dev."""
        return LabelScores(self._probs(self._stack(outputs, enc)), exclusive=False,
                           thresholds=np.array(self.thresholds) if self.thresholds else None)

    def explain_targets(self, row: dict, labels: list[str], label: str | None = None) -> list[dict]:
        if label is not None and label not in labels:
            raise InputError(f"explain label {label!r}: not a label of this model ({', '.join(labels)}).")
        names = [label] if label else row["labels"] or [max(row["probabilities"], key=row["probabilities"].get)]
        return [{"name": n, "index": labels.index(n)} for n in names]

    def target_score(self, logits: torch.Tensor, target: dict, log_odds: bool = False) -> torch.Tensor:
        t = np.broadcast_to(self._unfolded(), (logits.shape[1],))[target["index"]]
        z = logits[:, target["index"]].float() / float(t)
        return z if log_odds else torch.sigmoid(z)

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"labels": (list[str], "The predicted label set (each label above its threshold chosen on dev)."),
                "probabilities": (dict[str, float], "Calibrated probability of every label.")}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        split = "test" if "test" in split_metrics else "dev"
        m = split_metrics[split]
        th = dict(zip(labels, self.thresholds)) if self.thresholds else {}
        rule = self.calibration.get("threshold_rule", "per_label" if th else "0.5")
        chosen = {"per_label": "chosen per label on dev", "shared": "one shared threshold chosen on dev"}.get(rule, "0.5 for every label")
        lines = [f"### Labels ({split})", "", f"Decision thresholds: {chosen}"
                 f"{' for ' + self.calibration['threshold_metric'] if 'threshold_metric' in self.calibration else ''}; "
                 f"subset accuracy {m['subset_accuracy']:.4f}, Hamming loss {m['hamming_loss']:.4f}, "
                 f"samples F1 {m['samples_f1']:.4f}, samples Jaccard {m.get('samples_jaccard', float('nan')):.4f}.", "",
                 *prf_table("label", m["per_label"]), ""]
        if th and rule == "per_label":
            self._threshold_plot(th, run_dir / "thresholds.png")
            lines += ["![thresholds per label](thresholds.png)", ""]
        lines += tradeoff_table(self.calibration.get("tradeoff", []))
        if self.calibration:
            c = self.calibration
            lines += ["### Calibration", "", *([f"Calibration: {c['decision']} (held-out: {c['method']}).", ""]
                                                if "decision" in c else []),
                      f"A temperature per label {'fitted on dev' if c.get('applied', True) else 'was not applied'}: ECE over "
                      f"every (text, label) probability {c['dev_ece_before']:.4f} before, {c['dev_ece_after']:.4f} after "
                      f"({split} after: {m['ece']:.4f}).", ""]
        return "\n".join(lines)

    @staticmethod
    def _threshold_plot(thresholds: dict[str, float], path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(thresholds)), 3.5))
        ax.bar(list(thresholds), list(thresholds.values()), color="tab:blue")
        ax.axhline(0.5, ls="--", color="grey", label="0.5")
        ax.set_ylabel("threshold")
        ax.tick_params(axis="x", rotation=90)
        ax.legend()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)


# ---- thresholds for the chosen metric ---------------------------------------------------------------------
PER_LABEL_METRIC = "macro_f1"  # the mean of per-label F1s: each label's own best threshold maximises it
# the shared thresholds tried on dev for the metrics that pool labels or score each text
SHARED_GRID = tuple(round(float(t), 2) for t in np.arange(0.05, 0.951, 0.05))


def decision_scores(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The metrics of a 0/1 decision matrix against the gold one (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, jaccard_score
    return {"macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
            "samples_f1": float(f1_score(gold, pred, average="samples", zero_division=0)),
            "samples_jaccard": float(jaccard_score(gold, pred, average="samples", zero_division=0)),
            "subset_accuracy": float(accuracy_score(gold, pred)), "hamming_loss": float(hamming_loss(gold, pred))}


def choose_thresholds(probs: np.ndarray, gold: np.ndarray, metric: str) -> tuple[list[float], str]:
    """(a threshold per label, the rule used) for `metric` on dev: per-label best F1 for macro F1 (and for
    the loss, which no threshold changes); else the SHARED_GRID value with the best dev `metric` (lowest
    for Hamming loss; ties keep the value nearest 0.5, the uncalibrated default)."""
    from lmtune.training.loop import LOWER_IS_BETTER
    if metric in (PER_LABEL_METRIC, "loss"):
        return [best_f1_threshold(probs[:, j], gold[:, j]) for j in range(probs.shape[1])], "per_label"
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best = max(sorted(SHARED_GRID, key=lambda t: abs(t - 0.5)),
               key=lambda t: sign * decision_scores(gold, (probs >= t).astype(int))[metric])
    return [best] * probs.shape[1], "shared"


def best_f1_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """One label's threshold at its best dev F1; 0.5 for a label dev never shows."""
    if y.sum() == 0:
        return 0.5
    order = np.argsort(-p)
    tp = np.cumsum(y[order])
    k = np.arange(1, len(p) + 1)
    f1 = 2 * tp / (k + y.sum())  # predicting the top k as positive
    best = int(np.argmax(f1))
    # halfway to the next lower probability, so a tie or a nearby unseen score decides the same way
    lower = p[order[best + 1]] if best + 1 < len(p) else 0.0
    return round(float((p[order[best]] + lower) / 2), 6)


def threshold_tradeoff(probs: np.ndarray, gold: np.ndarray, chosen: list[float]) -> list[dict]:
    """Dev metrics and labels predicted per text at shared thresholds 0.1-0.9 and at the chosen ones: the
    trade-off between predicting more labels (recall) and fewer (precision) that the report shows."""
    rows = []
    for name, th in [*((f"{t:.1f}", np.full(probs.shape[1], t)) for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
                     ("chosen", np.asarray(chosen))]:
        pred = (probs >= th).astype(int)
        rows.append({"threshold": name, "labels_per_text": round(float(pred.sum(1).mean()), 4),
                     **{k: round(v, 4) for k, v in decision_scores(gold, pred).items()}})
    if rows:
        rows.append({"threshold": "gold", "labels_per_text": round(float(gold.sum(1).mean()), 4)})
    return rows


def tradeoff_table(rows: list[dict]) -> list[str]:
    """The report's markdown table of threshold_tradeoff's rows."""
    if not rows:
        return []
    keys = ("macro_f1", "micro_f1", "samples_f1", "samples_jaccard", "subset_accuracy")
    out = ["### Threshold trade-off (dev)", "", "| threshold | labels per text | " + " | ".join(keys) + " |",
           "|---|---|" + "---|" * len(keys)]
    for r in rows:
        out.append(f"| {r['threshold']} | {r['labels_per_text']:.2f} | " + " | ".join(
            f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    return [*out, ""]
