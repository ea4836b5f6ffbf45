"""Text (and text-pair) classification: reading, encoding, head, loss, metrics, decoding, report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from transformers import AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.data.pairs import pair_findings, relevant_positions, symmetric_copies
from lmtune.data.readers import Example, read_examples
from lmtune.data.splits import stratified_split
from lmtune.errors import InputError
from lmtune.evaluate import plots
from lmtune.evaluate.abstain import abstention_metrics, choose_threshold, coverage_curve, coverage_plot
from lmtune.evaluate.calibration import choose_temperature, ece, fit_temperature, softmax
from lmtune.evaluate.calibration import metrics as calibration_metrics
from lmtune.evaluate.calibration import report_section as calibration_section
from lmtune.evaluate.report import prf_table
from lmtune.fewshot import load_embedding_classifier
from lmtune.models import load_config, load_pretrained, quiet_transformers
from lmtune.tasks.biencoder import load_bi_encoder, pair_model, report_lines
from lmtune.tasks.windows import encode_windows, pool, training_subset
from lmtune.tasks.base import (SHARED_ENCODER, ABSTAIN, ACTIVE, CALIBRATE, CONTINUAL, DISTILL, ENSEMBLE, EXAMPLE_LABELS, EXPLAIN, FEWSHOT,
                               LABEL_NOISE, MAHALANOBIS, RERANK, FOLD, SELF_TRAINING, Encoded, LabelScores, Splits, Task,
                               attach_soft_targets, balanced_weights, class_score, collate_soft_targets,
                               cross_entropy_sum, input_pad_values, pad_batch, soft_target_loss)


def mahalanobis_score(feats: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the squared Mahalanobis distance to the nearest class mean (higher = more in-scope),
    as three matrix products instead of an (examples x classes x dim) tensor."""
    f = feats.astype(np.float64)
    fp = f @ precision
    d = (fp * f).sum(1)[:, None] - 2 * fp @ means.T + ((means @ precision) * means).sum(1)[None]
    return -d.min(1)


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order ('2' < '10'), others alphabetically."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


class ClassificationTask(Task):
    name = "classification"
    headline = ("accuracy", "macro_f1", "loss")  # report.md / CLI summary columns
    peft_task_type = "SEQ_CLS"
    capabilities = frozenset({CALIBRATE, ABSTAIN, MAHALANOBIS, LABEL_NOISE, EXAMPLE_LABELS, CONTINUAL, ENSEMBLE, EXPLAIN, RERANK, FOLD,
                              DISTILL, ACTIVE, SELF_TRAINING, FEWSHOT, SHARED_ENCODER})
    encode_options = {"long_text": "long_text", "overlap": "window_overlap"}

    def __init__(self) -> None:
        self.temperature = 1.0  # fitted on dev after training (temperature scaling); 1.0 = raw softmax
        # the temperature already divided into the saved classifier's weights (lmtune.fold), so that the
        # model's logits are raw / folded_temperature; split_outputs multiplies them back, and everything
        # else works on raw logits. 1.0: nothing folded (a model in training, or a run saved before folding)
        self.folded_temperature = 1.0
        self.calibration: dict = {}
        self.class_weight: torch.Tensor | None = None  # train.class_weights auto: inverse frequency
        self.focal_gamma = 0.0
        self.oos_label: str | None = None  # abstain.oos_label: out-of-scope gold label (a class, or dev/test only)
        self.abstain_label = "abstain"
        self.threshold: float | None = None  # abstain below this confidence (chosen on dev)
        self.threshold_calibrated = True
        self.abstention: dict = {}
        self.score = "probability"  # abstain.score: what the threshold is put on
        self.ood: dict[str, np.ndarray] = {}  # mahalanobis: in-scope class means and the shared precision matrix
        self.pooling = "mean"  # data.long_text windows: how a text's window outputs are pooled (tasks/windows.py)
        self.max_windows = 8
        self.symmetric = False  # data.symmetric_pairs: a pair is predicted in both orders, logits averaged
        self.pair_encoding: str | None = None  # a pair run: cross or bi (data.pair_encoding, decided in build_model)
        self.distillation: tuple[float, float] | None = None  # (temperature, alpha) while a student trains (lmtune.distill)

    def configure(self, cfg: Config) -> None:
        self.oos_label = cfg.abstain.oos_label
        self.abstain_label = cfg.abstain.oos_label or cfg.abstain.label
        self.threshold_calibrated = cfg.abstain.calibrated
        self.score = cfg.abstain.score
        self.pooling, self.max_windows = cfg.data.window_pooling, cfg.data.max_windows
        self.symmetric = bool(cfg.data.symmetric_pairs and cfg.data.text_pair_column)
        if cfg.data.long_text == "windows" and cfg.data.text_pair_column:
            raise InputError("data.long_text: windows cut one text; a sentence pair (data.text_pair_column) is truncated. "
                             "Set data.long_text truncate.")

    def report_state(self) -> dict:
        return {"calibration": self.calibration, "abstention": self.abstention}

    def set_report_state(self, data: dict) -> None:
        self.calibration = data.get("calibration", {})
        self.abstention = data.get("abstention", {})

    def state(self) -> dict:
        return {"temperature": self.temperature, "folded_temperature": self.folded_temperature, "threshold": self.threshold,
                "threshold_calibrated": self.threshold_calibrated,
                "oos_label": self.oos_label, "abstain_label": self.abstain_label, "score": self.score, "pooling": self.pooling,
                "max_windows": self.max_windows, "symmetric": self.symmetric, "pair_encoding": self.pair_encoding}

    def arrays(self) -> dict[str, np.ndarray]:
        """State too big for JSON; saved next to the weights as safetensors."""
        return self.ood

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.ood = dict(arrays)

    def set_state(self, state: dict) -> None:
        self.temperature = float(state.get("temperature", 1.0))
        self.folded_temperature = float(state.get("folded_temperature", 1.0))
        self.threshold = state.get("threshold")
        self.threshold_calibrated = state.get("threshold_calibrated", True)
        self.oos_label = state.get("oos_label")
        self.abstain_label = state.get("abstain_label", "abstain")
        self.score = state.get("score", "probability")
        self.pooling, self.max_windows = state.get("pooling", "mean"), state.get("max_windows", 8)
        self.symmetric = bool(state.get("symmetric", False))
        self.pair_encoding = state.get("pair_encoding")

    # ---- abstention ---------------------------------------------------------------------------
    def split_outputs(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per example (a long text's windows pooled): logits, and the [CLS] features that unbatch appends
        when abstain.score is mahalanobis."""
        how = "mean" if self.symmetric else self.pooling  # a pair in both orders: the average evidence
        x = np.stack(pool(outputs, enc.features, len(enc.examples), how))
        logits = x[:, :len(labels)] * np.float32(self.folded_temperature)  # raw logits, whatever is folded in
        return logits, (x[:, len(labels):] if x.shape[1] > len(labels) else None)

    def _decisions(self, logits: np.ndarray, feats: np.ndarray | None, labels: list[str], calibrated: bool | None = None):
        """Confidence, predicted index, and whether the prediction is an in-scope class."""
        t = self.temperature if (self.threshold_calibrated if calibrated is None else calibrated) else 1.0
        probs = softmax(logits, t)
        pred = probs.argmax(-1)
        in_scope = pred != labels.index(self.oos_label) if self.oos_label in labels else np.ones(len(pred), bool)
        if self.score == "mahalanobis" and self.ood:  # before fit_scorer (dev evaluations while training): probability
            if feats is None:
                raise InputError("this model abstains on the Mahalanobis score, which needs its [CLS] features; an ONNX "
                                 "export made without them cannot serve it: export the run again.")
            return mahalanobis_score(feats, self.ood["means"], self.ood["precision"]), pred, in_scope
        return probs.max(-1), pred, in_scope

    def fit_scorer(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Fit the Mahalanobis scorer on (train) outputs: a mean [CLS] feature per in-scope class and one
        shared covariance (Lee et al. 2018; Podolskiy et al. 2021 for transformers). Out-of-scope
        inputs a classifier is confidently wrong about still lie far from every class mean: on CLINC150
        after 1 epoch, 0.842 out-of-scope recall vs 0.639 for the max-probability threshold at the same
        in-scope accuracy cost."""
        from sklearn.covariance import LedoitWolf  # shrinkage: stays invertible with few examples per class
        _, feats = self.split_outputs(outputs, enc, labels)
        if feats is None:
            raise InputError("abstain.score mahalanobis: the model returned no hidden states.")
        gold = self._gold(enc, labels)
        classes = [c for c in range(len(labels)) if labels[c] != self.oos_label and (gold == c).any()]
        means = np.stack([feats[gold == c].mean(0) for c in classes])
        keep = np.isin(gold, classes)
        centred = feats[keep] - means[np.searchsorted(classes, gold[keep])]
        precision = LedoitWolf(assume_centered=True).fit(centred.astype(np.float64)).precision_
        self.ood = {"means": means.astype(np.float32), "precision": precision.astype(np.float32)}
        return {"classes": len(classes), "examples": int(keep.sum()), "dim": int(feats.shape[1])}

    def _oos_gold(self, enc: Encoded) -> np.ndarray:
        return np.array([ex.label is not None and ex.label == self.oos_label for ex in enc.examples], dtype=bool)

    def fit_threshold(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], target: str,
                      value: float | None, calibrated: bool = True, score: str | None = None) -> dict:
        """Choose the abstention threshold on (dev) outputs for the target; later predictions use it."""
        if score == "mahalanobis" and not self.ood:
            raise InputError("abstention score mahalanobis: this model has no Mahalanobis scorer; train it with "
                             "abstain.score: mahalanobis.")
        self.score = score or self.score
        self.threshold_calibrated = calibrated
        conf, pred, in_scope = self._decisions(*self.split_outputs(outputs, enc, labels), labels)
        gold = self._gold(enc, labels)
        self.abstention = choose_threshold(conf, in_scope, pred == gold, self._oos_gold(enc), target, value)
        self.threshold = self.abstention["threshold"]
        return self.abstention

    def example_probs(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[np.ndarray]:
        """Raw class probabilities per example (the label-noise search's input)."""
        return list(softmax(self.split_outputs(outputs, enc, labels)[0]))

    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Fit the temperature on dev when it lowers the held-out dev ECE (choose_temperature), else keep
        the raw softmax; every later probability (evaluate, predict, API) uses it."""
        logits, gold = self.split_outputs(outputs, enc, labels)[0], self._gold(enc, labels)
        logits, gold = logits[gold >= 0], gold[gold >= 0]
        self.calibration = choose_temperature(logits, gold, fit_temperature, lambda z, y: ece(softmax(z), y))
        self.temperature = float(self.calibration["temperature"])
        return self.calibration

    # ---- the temperature in the weights (lmtune.fold) -------------------------------------------
    def temperature_to_fold(self) -> float:
        return self.temperature

    def unfolded_temperature(self) -> float:
        """What the model's logits must still be divided by for calibrated probabilities."""
        return self.temperature / self.folded_temperature

    def set_folded(self, folded: float) -> None:
        self.folded_temperature = float(folded)

    @staticmethod
    def _gold(enc: Encoded, labels: list[str]) -> np.ndarray:
        """Gold class index; -1 for out-of-scope rows whose label is not a trained class."""
        index = {lab: i for i, lab in enumerate(labels)}
        return np.array([index.get(ex.label, -1) for ex in enc.examples])

    # ---- data -------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[Example]:
        d = cfg.data
        examples = read_examples(path, d.text_column, d.label_column, d.text_pair_column, d.format,
                                 d.encoding, require_label=require_label)
        if labels is not None:
            known = set(labels)
            for ex in examples:
                if ex.label is not None and ex.label not in known and ex.label != cfg.abstain.oos_label:
                    raise InputError(f"{ex.source}: label '{ex.label}' never appears in the training data "
                                     f"(known labels: {', '.join(labels)}). Add training examples for it "
                                     "or remove the row.")
        return examples

    def read(self, cfg: Config) -> Splits:
        self.configure(cfg)
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train in the config or pass --data.train FILE.")
        train = self.read_file(d.train, cfg)
        labels = _sort_labels({ex.label for ex in train})
        if len(labels) < 2:
            raise InputError(f"{d.train}: only one class ({labels[0]!r}) in column '{d.label_column}'; "
                             "classification needs examples of at least 2 classes.")
        if d.dev:
            dev = self.read_file(d.dev, cfg, labels)
            test = self.read_file(d.test, cfg, labels) if d.test else []
            info = {"method": "files", "train": d.train, "dev": d.dev, "test": d.test}
        elif d.test:  # a test file but no dev file: dev is split off train in the configured proportion
            test = self.read_file(d.test, cfg, labels)
            share = d.split[1] / (d.split[0] + d.split[1])
            tr, dv, _ = stratified_split([ex.label for ex in train], [1 - share, share, 0.0], cfg.train.seed)
            dev, train = [train[i] for i in dv], [train[i] for i in tr]
            info = {"method": "files+dev split", "train": d.train, "test": d.test, "dev_fraction_of_train": share,
                    "seed": cfg.train.seed, "dev_rows": [ex.source for ex in dev]}
        else:
            tr, dv, te = stratified_split([ex.label for ex in train], d.split, cfg.train.seed)
            dev, test, train = [train[i] for i in dv], [train[i] for i in te], [train[i] for i in tr]
            info = {"method": "stratified", "fractions": d.split, "seed": cfg.train.seed, "source": d.train,
                    "train_rows": [ex.source for ex in train], "dev_rows": [ex.source for ex in dev],
                    "test_rows": [ex.source for ex in test]}
        if not dev:
            raise InputError(f"{d.train}: too few examples to split off a dev set; give data.dev or more data.")
        train = train + symmetric_copies(train, d)
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        self.focal_gamma = cfg.train.focal_gamma
        if cfg.train.class_weights == "auto":
            w = balanced_weights(np.array([sum(ex.label == lab for ex in train) for lab in labels]))
            self.class_weight = torch.tensor(w, dtype=torch.float)
            info["class_weights"] = dict(zip(labels, np.round(w, 4).tolist()))
        return Splits(train, dev, test, labels, info)

    def audit_findings(self, splits: Splits) -> list[dict]:
        return pair_findings(splits)

    def from_texts(self, texts: list) -> list[Example]:
        return [Example(t[0], None, "", t[1]) if isinstance(t, tuple) else Example(t, None, "") for t in texts]

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        # the Mahalanobis scorer reads the last layer's [CLS]; the flag is saved in config.json, so a
        # loaded (or exported) model returns it too
        head = {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)},
                **({"output_hidden_states": True} if self.score == "mahalanobis" else {})}
        self.pair_encoding, bi = pair_model(cfg, labels, **head)
        if bi:
            return bi
        config = load_config(cfg.model.name, cfg.model.dropout, num_labels=len(labels), gguf=cfg.model.gguf_file, **head)
        return load_pretrained(AutoModelForSequenceClassification, cfg.model.name, config, cfg.model.gguf_file)

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return (load_bi_encoder(model_dir) or load_embedding_classifier(model_dir)
                or load_pretrained(AutoModelForSequenceClassification, str(model_dir)))

    # ---- encoding and batching --------------------------------------------------------------
    def encode(self, examples: list[Example], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               long_text: str = "truncate", overlap: int | None = None) -> Encoded:
        texts = [ex.text for ex in examples]
        pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair is not None else None
        index = {lab: i for i, lab in enumerate(labels or [])}
        if long_text == "windows" and pairs is None:
            windows, stats = encode_windows(texts, tokenizer, max_length, overlap)
            features = [{**f, "example": i, "label": index.get(ex.label, -100) if ex.label is not None else -100}
                        for i, (ex, ws) in enumerate(zip(examples, windows)) for f in ws]
            return Encoded(attach_soft_targets(features, examples), examples, stats)
        features, stats = _encode_truncated(texts, pairs, examples, index, tokenizer, max_length)
        if pairs is not None and self.symmetric:
            features = _with_swapped(features, examples, index, tokenizer, max_length)
        return Encoded(attach_soft_targets(features, examples), examples, stats)

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, tokenizer)
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        soft = collate_soft_targets(features) if self.distillation else None
        if soft is not None:
            batch["soft_targets"] = soft
        return batch

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        return input_pad_values(tokenizer)

    def num_items(self, features: list[dict]) -> int:
        return len(features)

    def train_features(self, enc: Encoded) -> list[dict]:
        # symmetric pairs train on both orders through their symmetric copies (read), not on the swapped
        # features that encode adds for prediction
        return training_subset([f for f in enc.features if not f.get("swapped")], self.max_windows)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hard = cross_entropy_sum(outputs.logits, batch["labels"], self.class_weight, self.focal_gamma)
        if self.distillation is None or "soft_targets" not in batch:
            return hard
        # unlabeled rows (label -100) add nothing to the hard term: they learn from the soft one alone
        temperature, alpha = self.distillation
        return alpha * soft_target_loss(outputs.logits, batch["soft_targets"], temperature) + (1 - alpha) * hard

    # ---- distillation (lmtune.distill) ----------------------------------------------------------
    def soft_targets(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], temperature: float) -> np.ndarray:
        """log_softmax(calibrated logits / T). Calibrated (windows pooled): the probabilities predict reports, as an
        ensemble's logits are the log of its members' calibrated ones. A small model's raw logits can sit far off
        scale (a calibration temperature of 0.01 on the tests' tiny BERT): soft targets made from them would be
        near uniform at any T."""
        z = torch.from_numpy(self.split_outputs(outputs, enc, labels)[0] / np.float32(self.temperature * temperature))
        return torch.log_softmax(z.float(), -1).numpy()

    def distill_with(self, temperature: float, alpha: float) -> None:
        self.distillation = (float(temperature), float(alpha))

    # ---- self-training (lmtune.selftrain) -------------------------------------------------------
    def pseudo_labels(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The top class and its calibrated probability (windows pooled, the fitted temperature applied): the
        confidence predict reports, so a threshold on it means what a user reads in predictions."""
        probs = softmax(self.split_outputs(outputs, enc, labels)[0], self.temperature)
        return probs.argmax(-1), probs.max(-1)

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        logits = outputs.logits.float().cpu().numpy()
        hidden = getattr(outputs, "hidden_states", None)  # a model built for abstain.score mahalanobis
        if hidden is None:
            return list(logits)  # _decisions / fit_scorer say what is missing
        return list(np.concatenate([logits, hidden[-1][:, 0].float().cpu().numpy()], 1))  # logits, then [CLS]

    # ---- metrics and decoding ---------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        (all_logits, feats), all_gold = self.split_outputs(outputs, enc, labels), self._gold(enc, labels)
        known = all_gold >= 0  # out-of-scope rows of an untrained class only count in the abstention figures
        logits, gold = all_logits[known], all_gold[known]
        pred = logits.argmax(-1)
        log_probs = torch.log_softmax(torch.from_numpy(logits) / self.temperature, -1)
        loss = float(F.nll_loss(log_probs, torch.from_numpy(gold))) if len(gold) else 0.0
        ids = list(range(len(labels)))
        report = classification_report(gold, pred, labels=ids, target_names=labels, output_dict=True, zero_division=0)
        m = {
            "accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(f1_score(gold, pred, labels=ids, average="macro", zero_division=0)),
            "loss": loss,
            "n": int(len(all_gold)),
            **calibration_metrics(logits, gold, self.temperature),
            "per_class": {lab: {k: float(report[lab][k]) for k in ("precision", "recall", "f1-score", "support")}
                          for lab in labels},
            "confusion_matrix": confusion_matrix(gold, pred, labels=ids).tolist(),
        }
        if self.threshold is not None or self.oos_label is not None:
            conf, p, in_scope = self._decisions(all_logits, feats, labels)
            oos, correct = self._oos_gold(enc), p == all_gold
            m.update(abstention_metrics(conf, in_scope, correct, oos, -np.inf if self.threshold is None else self.threshold))
            if self.threshold is not None:
                m["no_abstention"] = abstention_metrics(conf, in_scope, correct, oos, -np.inf)
            m["coverage_curve"] = coverage_curve(conf, in_scope, correct)
        return m

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        examples = enc.examples
        logits, feats = self.split_outputs(outputs, enc, labels)
        probs = softmax(logits, self.temperature)
        conf, _, in_scope = self._decisions(logits, feats, labels)
        rows = []
        for ex, p, c, ins in zip(examples, probs, conf, in_scope):
            row = {"text": ex.text}
            if ex.text_pair is not None:
                row["text_pair"] = ex.text_pair
            row["label"] = labels[int(p.argmax())]
            row["score"] = round(float(p.max()), 6)
            if self.threshold is not None and ins and c < self.threshold:
                row["top_label"], row["label"], row["abstained"] = row["label"], self.abstain_label, True
            row["probabilities"] = {lab: round(float(x), 6) for lab, x in zip(labels, p)}
            if ex.label is not None:
                row["gold"] = ex.label
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def label_scores(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> LabelScores:
        """The calibrated softmax over the labels (the probabilities predict reports)."""
        return LabelScores(softmax(self.split_outputs(outputs, enc, labels)[0], self.temperature), exclusive=True)

    def relevance(self, rows: list[dict], labels: list[str], label: str | None = None) -> list[float]:
        """The probability of the relevant label (`label`, else "1" / "true" / "yes" / "relevant" / "positive" /
        "duplicate" / "paraphrase" / "entailment" when the run has exactly one of them)."""
        label = label or relevant_label(labels)
        if label not in labels:
            raise InputError(f"rerank label {label!r} is not one of the pair run's labels ({', '.join(labels)}).")
        return [float(r["probabilities"][label]) for r in rows]

    # ---- explanations -------------------------------------------------------------------------
    def explain_targets(self, row: dict, labels: list[str], label: str | None = None) -> list[dict]:
        name = label or row.get("top_label", row["label"])  # an abstained row explains its best class
        if name not in labels:
            raise InputError(f"explain label {name!r}: not a class of this model ({', '.join(labels)}).")
        return [{"name": name, "index": labels.index(name), "classes": len(labels)}]

    def target_score(self, logits: torch.Tensor, target: dict, log_odds: bool = False) -> torch.Tensor:
        # calibrated, as predict reports it; output rows may carry [CLS] features after the logits
        return class_score(logits[:, :target["classes"]].float() / self.unfolded_temperature(), target["index"], log_odds)

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"label": (str, "Predicted label; the abstain / out-of-scope label when the model abstains."),
                "score": (float, "Calibrated probability of the predicted label."),
                "probabilities": (dict[str, float], "Calibrated class probabilities."),
                "abstained": (bool, "True when the model abstained (confidence below the threshold chosen on dev)."),
                "top_label": (str, "The best class when the model abstained.")}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        lines = report_lines(self.pair_encoding)
        for split, m in split_metrics.items():
            worst = min(labels, key=lambda lab: m["per_class"][lab]["f1-score"])
            marks = {worst: " (weakest)"} if len(labels) > 2 else {}
            lines += [f"### Per-class results ({split})", "", *prf_table("class", m["per_class"], marks)]
            png = f"confusion_matrix_{split}.png"
            plots.confusion_matrix(np.array(m["confusion_matrix"]), labels, run_dir / png, f"Confusion matrix ({split})")
            lines += ["", f"![confusion matrix ({split})]({png})", ""]
        if self.calibration:
            lines += calibration_section(self.calibration, split_metrics, run_dir)
        if any("coverage_curve" in m for m in split_metrics.values()):
            lines += self._abstention_report(split_metrics, run_dir)
        return "\n".join(lines)

    def _abstention_report(self, split_metrics: dict[str, dict], run_dir: Path) -> list[str]:
        a = self.abstention
        lines = ["### Abstention / out-of-scope", ""]
        if self.threshold is not None:
            on = ("Mahalanobis score (minus the distance to the nearest class mean)" if self.score == "mahalanobis" and self.ood
                  else f"{'calibrated' if self.threshold_calibrated else 'raw'} confidence")
            lines += [f"Threshold {self.threshold:.4f} on the {on}, chosen on dev for {a.get('target')} {a.get('value')}"
                      + ("" if a.get("met", True) else " (not reachable on dev: the model answers nothing)")
                      + f"; below it predict returns '{self.abstain_label}'.", ""]
        lines += ["| split | answered | accuracy of answered | in-scope accuracy | out-of-scope recall |", "|---|---|---|---|---|"]
        for split, m in split_metrics.items():
            rows = [("no abstention", m["no_abstention"])] if "no_abstention" in m else []
            for name, r in rows + [("with threshold" if self.threshold is not None else "", m)]:
                oos = f"{r['oos_recall']:.4f}" if "oos_recall" in r else "-"
                lines.append(f"| {split} {name} | {r['coverage']:.4f} | {r['selective_accuracy']:.4f} | "
                             f"{r['in_scope_accuracy']:.4f} | {oos} |")
        points = {s: (m["coverage"], m["selective_accuracy"]) for s, m in split_metrics.items() if self.threshold is not None}
        coverage_plot({s: m["coverage_curve"] for s, m in split_metrics.items()}, points, run_dir / "coverage.png")
        return lines + ["", "![coverage / accuracy](coverage.png)", ""]


def relevant_label(labels: list[str]) -> str:
    found = relevant_positions(labels)
    if len(found) != 1:
        raise InputError(f"rerank: which of the pair run's labels ({', '.join(labels)}) means 'relevant'? Give it with "
                         "--rerank-label LABEL.")
    return labels[found[0]]


def _encode_truncated(texts: list[str], pairs: list[str] | None, examples: list[Example], index: dict[str, int],
                      tokenizer: Any, max_length: int) -> tuple[list[dict], dict]:
    """One feature per text (or pair), cut at max_length, and how much truncation cut."""
    with quiet_transformers():  # untruncated on purpose, to count what truncation cuts
        untruncated = tokenizer(texts, pairs, add_special_tokens=True)
    full = untruncated["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    # tokenize again only when something must be cut (the server pays for every call)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length) if too_long else untruncated
    features = []
    for i, ex in enumerate(examples):
        f = {"input_ids": enc["input_ids"][i], "length": len(enc["input_ids"][i]),
             "label": index.get(ex.label, -100) if ex.label is not None else -100}
        if "token_type_ids" in enc:
            f["token_type_ids"] = enc["token_type_ids"][i]
        features.append(f)
    return features, {"truncated": len(too_long), "examples": len(examples), "max_tokens": max((len(x) for x in full), default=0)}


def _with_swapped(features: list[dict], examples: list[Example], index: dict[str, int], tokenizer: Any,
                  max_length: int) -> list[dict]:
    """Each pair's feature followed by the same pair in the other order (identical pairs have none), both
    naming their example, so that split_outputs averages them. For a symmetric relation a model's answer
    should not depend on the order; trained on both orders it still does a little, and averaging the two
    removes that noise (test-time augmentation, as in the symmetric sentence-pair models of the STS and
    paraphrase literature)."""
    swapped, _ = _encode_truncated([ex.text_pair for ex in examples], [ex.text for ex in examples], examples, index,
                                   tokenizer, max_length)
    out = []
    for i, (ex, f, g) in enumerate(zip(examples, features, swapped)):
        out.append({**f, "example": i, "window": 0})
        if ex.text != ex.text_pair:
            out.append({**g, "example": i, "window": 1, "swapped": True})
    return out
