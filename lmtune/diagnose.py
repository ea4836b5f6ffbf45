"""Fit diagnosis: read the logged curves, name what went wrong, and say what to do about it.

Rules, each from the history the loop writes (train loss and grad norm per step, dev metric per
evaluation):
- divergence: a non-finite train loss (the loop stops there and restores the last good checkpoint);
- overfitting: after its best evaluation the dev metric got worse for >= 2 evaluations in a row
  while the train loss kept falling;
- underfitting: the train loss barely moved, or the dev metric ends near the majority baseline;
- loss spikes / gradient explosion: a value far above the running median of the steps before;
- oscillation: the dev metric changes direction again and again by more than noise.
"""
from __future__ import annotations

import math

import numpy as np

ADVICE = {
    "divergence": "Lower train.lr 3-10x, raise train.warmup_ratio (e.g. 0.1-0.2), keep train.max_grad_norm at 1.0, "
                  "and use fp32 or bf16 rather than fp16.",
    "overfitting": "Stop earlier (train.patience 2-3 with train.eval_every), raise train.weight_decay (e.g. 0.05-0.1) or "
                   "model.dropout, train fewer epochs, or add data / augmentation.",
    "underfitting": "Raise train.lr or train.epochs, unfreeze layers (model.freeze_layers 0), check that labels match "
                    "the texts, and check data.max_length is not cutting the informative part.",
    "loss_spikes": "Lower train.lr or raise train.warmup_ratio; keep gradient clipping on (train.max_grad_norm 1.0); "
                   "look for corrupt or extreme examples in the batches around those steps.",
    "gradient_explosion": "Lower train.max_grad_norm (e.g. 0.5) and train.lr; raise train.warmup_ratio.",
    "oscillation": "Lower train.lr, use a larger train.batch_size, or evaluate less often so noise averages out.",
}


def _finding(kind: str, severity: str, evidence: str) -> dict:
    return {"kind": kind, "severity": severity, "evidence": evidence, "advice": ADVICE[kind]}


def diagnose(history: list[dict], metric: str, baseline: float | None = None) -> list[dict]:
    higher = metric != "loss"
    steps = [h for h in history if "train_loss" in h]
    evals = [(h["step"], h[f"dev_{metric}"]) for h in history if f"dev_{metric}" in h]
    losses = np.array([h["train_loss"] for h in steps], dtype=float)
    out: list[dict] = []
    bad = [h["step"] for h in steps if not math.isfinite(h["train_loss"])]
    if bad:
        out.append(_finding("divergence", "critical", f"train loss became non-finite at step {bad[0]}"))
    finite = losses[np.isfinite(losses)]
    if len(finite) >= 20:
        for name, values in (("loss_spikes", finite), ("gradient_explosion",
                                                       np.array([h["grad_norm"] for h in steps if "grad_norm" in h], dtype=float))):
            values = values[np.isfinite(values)]
            factor = 3.0 if name == "loss_spikes" else 10.0
            hits = [i for i in range(10, len(values)) if values[i] > factor * max(np.median(values[max(0, i - 20):i]), 1e-8)]
            if hits:
                what = "train loss" if name == "loss_spikes" else "gradient norm"
                out.append(_finding(name, "warning", f"{what} jumped above {factor:g}x its running median "
                                                     f"{len(hits)} time(s), first at step {steps[hits[0]]['step']}"))
    if len(evals) >= 3:
        vals = [v for _, v in evals]
        best = int(np.argmax(vals) if higher else np.argmin(vals))
        after = vals[best + 1:]
        worse = [v < vals[best] if higher else v > vals[best] for v in after]
        if len(after) >= 2 and all(worse[:2]) and len(finite):
            loss_at = {h["step"]: h["train_loss"] for h in steps}
            b_step, last_step = evals[best][0], evals[-1][0]
            if loss_at.get(last_step, math.inf) < loss_at.get(b_step, -math.inf):
                out.append(_finding("overfitting", "warning",
                                    f"dev {metric} peaked at step {b_step} ({vals[best]:.4f}) and then got worse for "
                                    f"{len(after)} evaluations ({vals[-1]:.4f}) while the train loss kept falling"))
        turns = sum(1 for a, b, c in zip(vals, vals[1:], vals[2:]) if (b - a) * (c - b) < 0 and min(abs(b - a), abs(c - b)) > 0.02)
        if turns >= 3:
            out.append(_finding("oscillation", "warning", f"dev {metric} changed direction {turns} times by more than 0.02"))
    if len(finite) >= 10:
        k = max(1, len(finite) // 10)
        start, end = finite[:k].mean(), finite[-k:].mean()
        flat = end > 0.9 * start
        near_baseline = baseline is not None and evals and higher and evals[-1][1] <= baseline + 0.02
        if flat or near_baseline:
            why = [f"train loss went from {start:.4f} to only {end:.4f}"] if flat else []
            if near_baseline:
                why.append(f"dev {metric} {evals[-1][1]:.4f} is near the majority-class baseline {baseline:.4f}")
            out.append(_finding("underfitting", "critical" if near_baseline else "warning", "; ".join(why)))
    return out


def report_section(findings: list[dict]) -> str:
    if not findings:
        return "## Fit diagnosis\n\nNo problem found in the curves (no divergence, spikes, over- or underfitting).\n"
    lines = ["## Fit diagnosis", "", "| finding | severity | evidence | what to do |", "|---|---|---|---|"]
    lines += [f"| {f['kind']} | {f['severity']} | {f['evidence']} | {f['advice']} |" for f in findings]
    return "\n".join(lines) + "\n"
