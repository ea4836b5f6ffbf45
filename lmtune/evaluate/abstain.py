"""Abstention: a confidence threshold chosen on dev for a target, and what it does on any split.

An example is *answered* when the model predicts an in-scope class with confidence >= threshold;
otherwise it abstains (or, with an explicit out-of-scope class, predicts that class). Targets:
- precision: the answered dev examples are right at least `value` of the time (most coverage that does);
- coverage: at least `value` of dev is answered (the strictest threshold that does);
- false_accept: at most `value` of the dev examples that should be refused are answered; those are the
  out-of-scope examples when dev has any, else the misclassified ones;
- accuracy_loss: refuse as much as possible while in-scope accuracy (an abstention counts as an
  error) stays at most `value` below answering everything: the most out-of-scope refused for a
  stated price in accuracy.
Hand-written: a sort and three cumulative sums, nothing a library would add.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lmtune.evaluate.plots import save_figure, plt

DEFAULT_VALUE = {"precision": 0.95, "coverage": 0.9, "false_accept": 0.1, "accuracy_loss": 0.02}


def choose_threshold(conf: np.ndarray, in_scope_pred: np.ndarray, correct: np.ndarray, oos_gold: np.ndarray,
                     target: str, value: float | None) -> dict:
    """The threshold meeting `target` on these (dev) examples, and the dev figures it gives."""
    value = DEFAULT_VALUE[target] if value is None else value
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    eligible = in_scope_pred[order]
    negative = (oos_gold if oos_gold.any() else ~correct)[order] & eligible
    n_neg = max(int((oos_gold if oos_gold.any() else ~correct).sum()), 1)
    answered = np.cumsum(eligible)
    right = np.cumsum((correct & in_scope_pred)[order])
    false = np.cumsum(negative)
    cut = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last index of each group of equal confidences
    cov = answered[cut] / len(conf)
    prec = right[cut] / np.maximum(answered[cut], 1)
    far = false[cut] / n_neg
    if target == "precision":
        ok = np.flatnonzero((prec >= value) & (answered[cut] > 0))
        k = ok[-1] if len(ok) else None
    elif target == "coverage":
        ok = np.flatnonzero(cov >= value)
        k = ok[0] if len(ok) else len(cut) - 1
    elif target == "accuracy_loss":
        n_in = max(int((~oos_gold).sum()), 1)
        ok = np.flatnonzero(right[cut] >= right[-1] - value * n_in)  # right[-1]: correct when answering everything
        k = ok[0] if len(ok) else len(cut) - 1
    else:
        ok = np.flatnonzero(far <= value)
        k = ok[-1] if len(ok) else None
    if k is None:  # nothing meets it: answer nothing
        return {"threshold": float(np.nextafter(c[0], np.inf)) if len(c) else 1.0, "target": target, "value": value,
                "met": False, "dev_coverage": 0.0, "dev_precision": 1.0, "dev_false_accept": 0.0}
    return {"threshold": float(c[cut[k]]), "target": target, "value": value, "met": True,
            "dev_coverage": float(cov[k]), "dev_precision": float(prec[k]), "dev_false_accept": float(far[k])}


def abstention_metrics(conf: np.ndarray, in_scope_pred: np.ndarray, correct: np.ndarray, oos_gold: np.ndarray,
                       threshold: float) -> dict:
    answered = in_scope_pred & (conf >= threshold)
    in_scope = ~oos_gold
    out = {"coverage": float(answered.mean()),
           "selective_accuracy": float((answered & correct).sum() / max(answered.sum(), 1)),
           "in_scope_accuracy": float((answered & correct)[in_scope].mean()) if in_scope.any() else 0.0}
    if oos_gold.any():
        out["oos_recall"] = float((~answered)[oos_gold].mean())
    return out


def coverage_curve(conf: np.ndarray, in_scope_pred: np.ndarray, correct: np.ndarray, points: int = 21) -> list[list[float]]:
    """[coverage, accuracy of the answered] as the threshold sweeps from answering all to answering few."""
    c = np.where(in_scope_pred, conf, -np.inf)
    order = np.argsort(-c, kind="stable")
    right = np.cumsum(correct[order] & in_scope_pred[order])
    n = int(in_scope_pred.sum())
    out = []
    for k in np.unique(np.linspace(max(n // points, 1), n, points).astype(int)):
        out.append([float(k / len(conf)), float(right[k - 1] / k)])
    return out


def coverage_plot(curves: dict[str, list[list[float]]], threshold_points: dict[str, tuple[float, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=name)
    for name, (cov, acc) in threshold_points.items():
        ax.plot([cov], [acc], "o", color="black")
        ax.annotate(f"threshold ({name})", (cov, acc), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("accuracy of answered")
    ax.set_title("Coverage / accuracy")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
