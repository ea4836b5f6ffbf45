"""Calibration: expected calibration error, temperature scaling fitted on dev, reliability diagram.

Temperature scaling is one scalar, so it is fitted by hand (LBFGS on the dev NLL) rather than
through a library; it never changes the predicted label. It is applied only when it lowers the ECE
on dev examples the temperature was not fitted on (choose_temperature): the NLL it minimises is not
the ECE, and one confidently wrong dev example can drive it to a temperature (160 on a real run)
that flattens every probability.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.evaluate.plots import save_figure, plt


def ece(probs: np.ndarray, gold: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over equal-width confidence bins."""
    return _binned_ece(probs.max(-1), probs.argmax(-1) == gold, bins)


def _binned_ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    n = len(conf)
    finite = np.isfinite(conf)  # a diverged model's NaN rows fall in no bin
    conf, correct = conf[finite], correct[finite]
    if not n:
        return 0.0
    b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # bins (lo, hi]
    gap = np.bincount(b, correct.astype(float), bins) - np.bincount(b, conf, bins)
    return float(np.abs(gap).sum() / n)


def ece_noise(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of the ECE that a perfectly calibrated model with these confidences
    would show on this many examples (each answer right with probability = its confidence).

    Why: binned ECE is biased upwards on small sets (on SST-2 dev, 872 sentences, a perfectly
    calibrated MiniLM would score 0.025 on average and above 0.03 one time in five), so an ECE
    inside this band is no evidence of miscalibration, and the report says so."""
    conf = probs.max(-1)
    rng = np.random.default_rng(seed)
    sims = np.array([_binned_ece(conf, rng.random(len(conf)) < conf, bins) for _ in range(draws)])
    return (float(sims.mean()), float(np.percentile(sims, 95))) if len(conf) else (0.0, 0.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double() / temperature, -1).numpy()


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on held-out data."""
    x = torch.from_numpy(logits).double()
    y = torch.from_numpy(gold).long()
    log_t = torch.zeros(1, dtype=torch.double, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) else 1.0


def choose_temperature(logits: np.ndarray, gold: np.ndarray, fit: Callable[[np.ndarray, np.ndarray], Any],
                       ece_of: Callable[[np.ndarray, np.ndarray], float], identity: Any = 1.0, seed: int = 0) -> dict:
    """Temperature scaling only where it helps on examples it was not fitted on: 2-fold cross-validation
    on dev. A seeded random half fits a temperature that scales the other half, and the reverse; the
    ECE of those held-out scaled logits, pooled, is compared with the ECE of the raw logits of the same
    examples. Applied: the temperature fitted on the whole of dev; skipped: `identity` (no scaling).
    Test is never looked at.

    fit(logits, gold) -> temperature (a scalar, or one per column); ece_of(logits, gold) -> the ECE
    of unscaled logits. Returns {"applied", "temperature", "dev_ece_before", "dev_ece_after", "method",
    "decision"}, the decision in words for results.json and report.md."""
    n = len(gold)
    before = after = ece_of(logits, gold)
    if n >= 4:  # fewer: no half to fit on
        order = np.random.default_rng(seed).permutation(n)
        halves = (order[: n // 2], order[n // 2:])
        scaled = [logits[held] / np.asarray(fit(logits[fitted], gold[fitted]))
                  for held, fitted in (halves, halves[::-1])]
        after = ece_of(np.concatenate(scaled), np.concatenate([gold[h] for h in halves]))
    applied = bool(after < before)
    words = "applied," if applied else "skipped: would worsen" if after > before else "skipped: would not improve"
    return {"applied": applied, "temperature": fit(logits, gold) if applied else identity,
            "dev_ece_before": float(before), "dev_ece_after": float(after),
            "method": f"2-fold cross-validation on dev (seed {seed})",
            "decision": f"{words} dev ECE {before:.3f} -> {after:.3f}"}


def reliability_bins(probs: np.ndarray, gold: np.ndarray, bins: int = 15) -> list[list[float]]:
    """[mean confidence, accuracy, count] for every non-empty equal-width confidence bin."""
    conf, correct = probs.max(-1), probs.argmax(-1) == gold
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            out.append([float(conf[inside].mean()), float(correct[inside].mean()), int(inside.sum())])
    return out


def reliability_diagram(curves: dict[str, tuple[list[list[float]], float]], path: Path) -> None:
    """Accuracy per confidence bin against the diagonal; curves: name -> (reliability_bins, ECE)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for name, (points, err) in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{name} (ECE {err:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def metrics(raw_logits: np.ndarray, gold: np.ndarray, temperature: float) -> dict:
    """ECE before/after temperature scaling, the estimator's noise level and the reliability bins."""
    raw, cal = softmax(raw_logits), softmax(raw_logits, temperature)
    return {"ece": ece(cal, gold), "ece_uncalibrated": ece(raw, gold),
            "ece_noise": list(ece_noise(cal)),  # what a perfectly calibrated model would score
            "reliability": reliability_bins(cal, gold), "reliability_uncalibrated": reliability_bins(raw, gold)}


def decision_line(calibration: dict) -> str:
    """What calibration did, in words: applied or skipped, with the held-out dev ECE (runs from before
    the held-out check say only the temperature)."""
    if "decision" not in calibration:
        return f"Temperature {calibration['temperature']:.3f} fitted on dev."
    how = calibration.get("method", "held-out dev")
    if calibration["applied"]:
        return (f"Calibration: {calibration['decision']} (held-out: {how}); temperature {calibration['temperature']:.3f} "
                "fitted on dev.")
    return f"Calibration: {calibration['decision']} (held-out: {how}); probabilities are the model's own softmax."


def report_section(calibration: dict, split_metrics: dict[str, dict], run_dir: Path, what: str = "") -> list[str]:
    """Markdown for report.md (and reliability.png beside it); what: what the probabilities are of."""
    folded = (" and folded into the classifier's weights, so transformers.pipeline and ONNX give the same probabilities"
              if calibration.get("folded") else "")
    lines = ["### Calibration", "", decision_line(calibration), "",
             *([f"The temperature is saved with the model{folded}; predict and evaluate return calibrated "
                f"probabilities{what}.", ""] if calibration.get("applied", True) else []),
             "ECE of a perfectly calibrated model with the same confidences on as many examples (the "
             "binned estimator's own noise; an ECE below its 95% level is no evidence of miscalibration): "
             "mean / 95%.", "",
             "| split | ECE before | ECE after | noise level |", "|---|---|---|---|"]
    lines += [f"| {split} | {m['ece_uncalibrated']:.4f} | {m['ece']:.4f} | {m['ece_noise'][0]:.4f} / {m['ece_noise'][1]:.4f} |"
              for split, m in split_metrics.items() if "ece" in m]
    curves = {}
    for split, m in split_metrics.items():
        if "ece" in m:
            curves[f"{split} raw"] = (m["reliability_uncalibrated"], m["ece_uncalibrated"])
            curves[f"{split} calibrated"] = (m["reliability"], m["ece"])
    reliability_diagram(curves, run_dir / "reliability.png")
    return [*lines, "", "![reliability diagram](reliability.png)", ""]
