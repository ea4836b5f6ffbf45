"""comparison: peft.compare_full's table, full fine-tuning on the same splits next to the PEFT run
(trainable share, artifact size, memory, speed and the dev metric). Written by training, shown as
report.md's PEFT vs full fine-tuning section.
"""
from __future__ import annotations

from lmtune.analysis import Analysis


def section_for(table: dict[str, dict], metric: str) -> str:
    lines = ["## PEFT vs full fine-tuning (same data, same epochs)", "",
             f"| method | dev {metric} | trainable % | artifact MB | peak memory MB | s / epoch |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r[metric]:.4f} | {r['trainable_pct']:.2f} | {r['artifact_mb']:.1f} | {r['peak_mem_mb']:.0f} | "
              f"{r['seconds_per_epoch']:.1f} |" for name, r in table.items()]
    return "\n".join(lines) + "\n"


def section(table: dict[str, dict]) -> str:
    """The table's metric is each row's first key (the others are the compared figures)."""
    return section_for(table, next(iter(next(iter(table.values())))))


# written by training (peft.compare_full); report.md names the run's own metric
ANALYSIS = Analysis(section, in_report=lambda table, run_dir, doc: section_for(table, doc["metric"]))
