"""continual: a continued run's forgetting (lmtune.continual): the old run's test split measured with
the old model and with this one. Written by training (`lmtune train CONFIG --from RUN_DIR`), shown as
report.md's Continual fine-tuning section.
"""
from __future__ import annotations

from lmtune.analysis import Analysis


def section(c: dict) -> str:
    lines = ["## Continual fine-tuning", "",
             f"Started from `{c['from_run']}`; {c['replayed']} rows of its training data replayed."]
    if c.get("dropped_labels"):
        lines.append(f"Labels dropped: {', '.join(c['dropped_labels'])}.")
    if c.get("kept_without_examples"):
        lines.append(f"Old labels kept without new examples: {len(c['kept_without_examples'])}.")
    if "forgetting" in c:
        lines += ["", f"| old run's test split ({c['old_test_examples']} examples) | {c['metric']} |", "|---|---|",
                  f"| before (old model) | {c['before']:.4f} |", f"| after (this model) | {c['after']:.4f} |",
                  f"| forgetting (before - after) | {c['forgetting']:.4f} |"]
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(section)  # no function: training measures it (the old model is gone after the run)
