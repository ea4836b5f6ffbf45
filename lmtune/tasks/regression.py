"""Regression: a number per text or text pair (similarity scores, ratings, risk scores), with a
prediction interval that says how far to trust it.

What this module gets right that the usual scripts do not:
- targets are standardized on train (the head starts near the mean, one lr suits any scale);
- every prediction comes with a split-conformal interval (Vovk et al.; Lei et al. 2018): the
  ceil((n + 1) * level) / n quantile of the absolute dev residuals, added on both sides. Whatever the
  model, a new example's interval holds its true value with probability >= level (exchangeable
  data), and the report shows the coverage reached on test. With enough dev rows the quantile is
  taken per band of predicted values (Mondrian conformal prediction, Vovk et al. 2003): coverage
  then holds within each band, so an interval is wider where the model is less precise (mid-range
  similarity scores, say) instead of one width for all, and abstaining on width means something;
- `abstain.max_interval_width`: a prediction whose interval is wider than that is flagged
  `abstained` (the value is still returned), instead of a bare point estimate;
- Pearson, Spearman (scipy), MAE and RMSE; a predicted-vs-gold scatter and a residual plot.
Pairs (data.text_pair_column) are encoded as one pair input, as for classification.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.data.pairs import pair_findings, symmetric_copies
from lmtune.data.readers import Example, read_examples
from lmtune.errors import InputError
from lmtune.io import atomic_path
from lmtune.models import load_config, load_pretrained, quiet_transformers
from lmtune.tasks.biencoder import load_bi_encoder, pair_model, report_lines
from lmtune.tasks.base import SHARED_ENCODER, EXPLAIN, INTERVALS, RERANK, Encoded, Splits, Task, dev_and_test, input_pad_values, pad_batch

TARGET = "value"  # the one output of the head
ROWS_PER_BAND = 200  # dev rows per band of predicted values (at most MAX_BANDS): enough for a stable 90-95% quantile
MAX_BANDS = 5


@dataclass
class RegressionExample(Example):
    target: float | None = None

    def audit_units(self) -> list[str]:
        return []  # no classes to balance

    def audit_gold(self) -> str | None:
        return None if self.target is None else f"{self.target:g}"


def conformal_quantile(residuals: np.ndarray, level: float) -> float:
    """The split-conformal radius: the ceil((n + 1) level)-th smallest absolute residual (infinite
    when dev is too small for the level: the only honest interval then is everything)."""
    r = np.sort(np.abs(np.asarray(residuals, dtype=float)))
    k = math.ceil((len(r) + 1) * level)
    return float(r[k - 1]) if 0 < k <= len(r) else math.inf


class RegressionTask(Task):
    name = "regression"
    headline = ("spearman", "pearson", "mae", "rmse", "loss")
    peft_task_type = "SEQ_CLS"
    capabilities = frozenset({SHARED_ENCODER, INTERVALS, EXPLAIN, RERANK})
    decision_key = "value"

    def __init__(self) -> None:
        self.mean, self.std = 0.0, 1.0  # train targets, for standardization
        self.loss_name = "mse"
        self.level = 0.9
        self.radius: float | None = None  # conformal half-width over all of dev, fitted after training
        self.edges: list[float] = []  # inner edges of the bands of predicted values (Mondrian), ascending
        self.radii: list[float] = []  # the half-width in each band (len(edges) + 1)
        self.max_width: float | None = None
        self.dev_residuals: list[float] = []
        self.pair_encoding: str | None = None  # a pair run: cross or bi (data.pair_encoding, decided in build_model)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std, "level": self.level, "radius": self.radius, "max_width": self.max_width,
                "loss": self.loss_name, "edges": self.edges, "radii": self.radii, "pair_encoding": self.pair_encoding}

    def set_state(self, state: dict) -> None:
        self.mean, self.std = float(state.get("mean", 0.0)), float(state.get("std", 1.0))
        self.level, self.radius = float(state.get("level", 0.9)), state.get("radius")
        self.max_width, self.loss_name = state.get("max_width"), state.get("loss", "mse")
        self.edges, self.radii = list(state.get("edges", [])), list(state.get("radii", []))
        self.pair_encoding = state.get("pair_encoding")

    def configure(self, cfg: Config) -> None:
        self.loss_name = "huber" if cfg.train.loss == "huber" else "mse"
        self.level, self.max_width = cfg.abstain.interval_coverage, cfg.abstain.max_interval_width

    # ---- data -------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[RegressionExample]:
        d = cfg.data
        rows = read_examples(path, d.text_column, d.label_column, d.text_pair_column, d.format, d.encoding,
                             require_label=require_label)
        out = []
        for ex in rows:
            target = None
            if ex.label is not None:
                try:
                    target = float(ex.label)
                except ValueError:
                    target = math.nan
                if not math.isfinite(target):
                    file, line = ex.source.rsplit(":", 1)
                    raise InputError(f"{file}: line {line}: '{d.label_column}' holds {ex.label!r}; regression needs a "
                                     "finite number. Fix the value or remove the row.")
            out.append(RegressionExample(ex.text, None, ex.source, ex.text_pair, target=target))
        return out

    def read(self, cfg: Config) -> Splits:
        self.configure(cfg)
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        train, dev, test, info = dev_and_test(self, cfg, self.read_file(d.train, cfg))
        if len(dev) < 10:
            raise InputError(f"{d.dev or d.train}: {len(dev)} dev rows; the prediction intervals are fitted on dev and need "
                             "at least 10 (a few hundred for a stable interval). Give data.dev or more data.")
        targets = np.array([ex.target for ex in train])
        if targets.std() == 0:
            raise InputError(f"{d.train}: every training target is {targets[0]:g}; there is nothing to learn.")
        self.mean, self.std = float(targets.mean()), float(targets.std())
        train = train + symmetric_copies(train, d)
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        info["target"] = {"mean": self.mean, "std": self.std, "min": float(targets.min()), "max": float(targets.max())}
        return Splits(train, dev, test, [TARGET], info)

    def from_texts(self, texts: list) -> list[RegressionExample]:
        return [RegressionExample(t[0], None, "", t[1]) if isinstance(t, tuple) else RegressionExample(t, None, "")
                for t in texts]

    def audit_findings(self, splits: Splits) -> list[dict]:
        t = np.array([ex.target for ex in splits.train])
        out = [{"check": "target_distribution", "severity": "info",
                "detail": f"train targets: mean {t.mean():.4g}, std {t.std():.4g}, range {t.min():.4g} to {t.max():.4g}, "
                          f"{len(np.unique(t))} distinct values",
                "suggestion": "Check the range is the one you expect; very few distinct values may be a classification task.",
                "examples": []}]
        return out + pair_findings(splits)

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        head = {"problem_type": "regression", "id2label": {0: TARGET}, "label2id": {TARGET: 0}}
        self.pair_encoding, bi = pair_model(cfg, None, **head)
        if bi:
            return bi
        config = load_config(cfg.model.name, cfg.model.dropout, num_labels=1, gguf=cfg.model.gguf_file, **head)
        return load_pretrained(AutoModelForSequenceClassification, cfg.model.name, config, cfg.model.gguf_file)

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return load_bi_encoder(model_dir) or load_pretrained(AutoModelForSequenceClassification, str(model_dir))

    # ---- encoding and batching --------------------------------------------------------------
    def encode(self, examples: list[RegressionExample], tokenizer: Any, max_length: int,
               labels: list[str] | None = None) -> Encoded:
        texts = [ex.text for ex in examples]
        pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair is not None else None
        with quiet_transformers():
            full = tokenizer(texts, pairs, add_special_tokens=True)
        too_long = sum(len(ids) > max_length for ids in full["input_ids"])
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length) if too_long else full
        features = []
        for i, ex in enumerate(examples):
            f = {"input_ids": enc["input_ids"][i], "length": len(enc["input_ids"][i])}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][i]
            if ex.target is not None:
                f["target"] = (ex.target - self.mean) / self.std
            features.append(f)
        return Encoded(features, examples, {"truncated": too_long, "examples": len(examples),
                                            "max_tokens": max((len(x) for x in full["input_ids"]), default=0)})

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, tokenizer)
        if "target" in features[0]:
            batch["labels"] = torch.tensor([f["target"] for f in features], dtype=torch.float)
        return batch

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        return input_pad_values(tokenizer)

    def num_items(self, features: list[dict]) -> int:
        return len(features)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = outputs.logits.float().view(-1)
        if self.loss_name == "huber":  # delta 1 on standardized targets: one standard deviation
            return F.huber_loss(pred, batch["labels"], reduction="sum", delta=1.0)
        return F.mse_loss(pred, batch["labels"], reduction="sum")

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (outputs.logits.float().view(-1) - batch["labels"]) ** 2

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        return list(outputs.logits.float().cpu().numpy())

    # ---- intervals ----------------------------------------------------------------------------
    def _values(self, outputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(outputs)[:, 0].astype(float) * self.std + self.mean

    @staticmethod
    def _gold(enc: Encoded) -> np.ndarray:
        return np.array([np.nan if ex.target is None else ex.target for ex in enc.examples], dtype=float)

    def fit_intervals(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """The conformal half-widths from the (dev) residuals of the restored best model: over all of dev,
        and per band of predicted values (equal-count bands; a band too small for the level falls back
        to the overall width)."""
        pred = self._values(outputs)
        residuals = np.abs(self._gold(enc) - pred)
        self.radius = conformal_quantile(residuals, self.level)
        bands = max(1, min(MAX_BANDS, len(pred) // ROWS_PER_BAND))
        self.edges = [float(x) for x in np.quantile(pred, [k / bands for k in range(1, bands)])]
        where = np.searchsorted(self.edges, pred, side="right")
        self.radii = [conformal_quantile(residuals[where == b], self.level) if (where == b).any() else self.radius
                      for b in range(bands)]
        self.radii = [r if math.isfinite(r) else self.radius for r in self.radii]
        self.dev_residuals = [round(float(r), 6) for r in residuals]
        return {"interval_radius": self.radius, "level": self.level, "dev_examples": len(residuals), "bands": bands}

    def _radii(self, values: np.ndarray) -> np.ndarray:
        """Each prediction's half-width: its band's (all the same when dev was small)."""
        if not self.radii:
            return np.full(len(values), math.inf if self.radius is None else self.radius)
        return np.array(self.radii)[np.searchsorted(self.edges, values, side="right")]

    # ---- metrics and outputs ------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        from scipy.stats import pearsonr, spearmanr
        pred, gold = self._values(outputs), self._gold(enc)
        err = pred - gold
        std_err = err / self.std
        varied = len(gold) > 1 and np.ptp(pred) > 0 and np.ptp(gold) > 0
        m = {"spearman": float(spearmanr(pred, gold).statistic) if varied else 0.0,
             "pearson": float(pearsonr(pred, gold).statistic) if varied else 0.0,
             "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
             "loss": float((std_err ** 2).mean()), "n": int(len(gold))}
        if self.radius is not None:
            radii = self._radii(pred)
            m["interval_level"] = self.level
            m["interval_width"] = float(2 * radii.mean())  # mean width (bands differ)
            m["interval_coverage"] = float((np.abs(err) <= radii).mean())
        m["points"] = {"pred": [round(float(x), 4) for x in pred[:2000]], "gold": [round(float(x), 4) for x in gold[:2000]]}
        return m

    def relevance(self, rows: list[dict], labels: list[str], label: str | None = None) -> list[float]:
        """The predicted value (a similarity score, as STS-B's): higher = more relevant."""
        return [float(r["value"]) for r in rows]

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        rows = []
        values = self._values(outputs)
        for ex, v, r in zip(enc.examples, values, self._radii(values)):
            row = {"text": ex.text}
            if ex.text_pair is not None:
                row["text_pair"] = ex.text_pair
            row["value"] = round(float(v), 6)
            if self.radius is not None and math.isfinite(r):
                row["interval"] = [round(float(v - r), 6), round(float(v + r), 6)]
                row["interval_level"] = self.level
                if self.max_width is not None and 2 * r > self.max_width:
                    row["abstained"] = True
            if ex.target is not None:
                row["gold"] = ex.target
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def explain_targets(self, row: dict, labels: list[str], label: str | None = None) -> list[dict]:
        return [{"name": "value", "index": 0}]

    def target_score(self, logits: torch.Tensor, target: dict, log_odds: bool = False) -> torch.Tensor:
        return logits[:, 0].float() * self.std + self.mean  # in the target's own units

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"value": (float, "The predicted number."),
                "interval": (list[float], "The prediction interval [low, high] (split conformal, fitted on dev)."),
                "interval_level": (float, "The interval's coverage level (e.g. 0.9)."),
                "abstained": (bool, "True when the interval is wider than abstain.max_interval_width.")}

    def report_state(self) -> dict:
        return {"dev_residuals": self.dev_residuals}

    def set_report_state(self, data: dict) -> None:
        self.dev_residuals = data.get("dev_residuals", [])

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        lines = [*report_lines(self.pair_encoding), "### Regression", "",
                 "| split | Spearman | Pearson | MAE | RMSE | interval coverage |", "|---|---|---|---|---|---|"]
        for split, m in split_metrics.items():
            cov = f"{m['interval_coverage']:.4f} (target {m['interval_level']:.2f})" if "interval_coverage" in m else "-"
            lines.append(f"| {split} | {m['spearman']:.4f} | {m['pearson']:.4f} | {m['mae']:.4f} | {m['rmse']:.4f} | {cov} |")
        if self.radius is not None:
            width = "unbounded (dev is too small for the level)" if not math.isfinite(self.radius) else f"+-{self.radius:.4g}"
            lines += ["", f"Prediction intervals: split conformal on the dev residuals, {self.level:.0%} level, {width} around "
                      "each prediction over all of dev; the coverage above is measured, not assumed."
                      + (f" Predictions abstain when the interval is wider than {self.max_width:g}." if self.max_width else "")]
            if len(self.radii) > 1:
                bounds = [-math.inf, *self.edges, math.inf]
                lines += ["", "Half-width per band of predicted values (coverage holds within each band):", "",
                          "| predicted value | half-width |", "|---|---|"]
                lines += [f"| {lo:.4g} to {hi:.4g} | {r:.4g} |" for lo, hi, r in zip(bounds, bounds[1:], self.radii)]
        split = "test" if "test" in split_metrics else "dev"
        self._scatter(split_metrics[split]["points"], run_dir / "regression.png", split)
        return "\n".join(lines + ["", f"![predicted vs gold and residuals ({split})](regression.png)", ""])

    def _scatter(self, points: dict, path: Path, split: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        pred, gold = np.array(points["pred"]), np.array(points["gold"])
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
        a.scatter(gold, pred, s=6, alpha=0.4)
        lo, hi = float(min(gold.min(), pred.min())), float(max(gold.max(), pred.max()))
        a.plot([lo, hi], [lo, hi], color="grey", ls="--")
        if self.radius is not None and math.isfinite(self.radius):
            xs = np.linspace(lo, hi, 200)
            r = self._radii(xs)
            a.fill_between(xs, xs - r, xs + r, color="tab:orange", alpha=0.15, label=f"{self.level:.0%} interval")
            a.legend()
        a.set(xlabel="gold", ylabel="predicted", title=f"predicted vs gold ({split})")
        b.scatter(pred, pred - gold, s=6, alpha=0.4)
        b.axhline(0, color="grey", ls="--")
        b.set(xlabel="predicted", ylabel="predicted - gold", title="residuals")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
