"""distill: `lmtune distill`'s comparison of the student with its teacher and with the same student trained
on hard labels alone (test metric, inference cost). Written by distillation, shown as report.md's
Distillation section.
"""
from __future__ import annotations

from lmtune.analysis import Analysis


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _per_token(alignment: str | None) -> str:
    """How a token-level task's soft targets met the student's tokens (lmtune.distill's `alignment`)."""
    if alignment == "position":
        return ", per word at its first sub-token; teacher and student share the tokenizer: aligned by position"
    if alignment == "word":
        return ", per word at its first sub-token; the student has another tokenizer: aligned by word"
    return ""


def section(d: dict) -> str:
    metric, split = d["metric"], d["split"]
    lines = ["## Distillation (teacher, student, student on hard labels alone)", "",
             f"Soft targets at temperature {d['temperature']:g}, alpha {d['alpha']:g} (loss = alpha * T^2 * KL(teacher || "
             f"student) + (1 - alpha) * cross-entropy{_per_token(d.get('alignment'))}); {d['train_rows']} labeled train rows"
             + (f" and {d['unlabeled_rows']} unlabeled rows ({d['unlabeled']})" if d["unlabeled_rows"] else "")
             + f". Inference cost: seconds per 1000 {split} texts (tokenizing included, the fastest of three passes) on "
             f"{d['device']}.", "",
             f"| model | kind | layers | parameters | {split} {metric} | s / 1000 texts |", "|---|---|---|---|---|---|"]
    for name in ("teacher", "student", "hard_only"):
        r = d.get(name)
        if not r:
            continue
        lines.append(f"| {name.replace('_', ' ')}: {r['model']} | {r['kind']} | {r.get('layers') or '-'} | "
                     f"{r['parameters']:,} | {_cell(r[metric], '.4f')} | {_cell(r['seconds_per_1000'], '.3f')} |")
    lines += ["", f"Cost ratio (student seconds / teacher seconds): {d['cost_ratio']:.3f}"
              + (f"; the models' forward passes alone, without tokenizing: {d['model_cost_ratio']:.3f}." if "model_cost_ratio" in d
                 else ".")]
    if d.get("hard_only"):
        gain = d["student"][metric] - d["hard_only"][metric]
        lines.append(f"The teacher's soft targets {'gain' if gain >= 0 else 'lose'} {abs(gain):.4f} {metric} over "
                     "the hard labels alone (same student, same seed and epochs).")
    return "\n".join(lines) + "\n"


# written by `lmtune distill` (lmtune.distill), which is its command
ANALYSIS = Analysis(section)
