"""results.json: a run's results as data (versioned), and report.md rendered from it.

Training writes the document once (summary, metrics per split, the dev metric, diagnosis, audit, the
task's report data); later steps add sections (robustness from `lmtune attack`, the PEFT vs full
comparison) and the report is rendered again from the whole document, never patched as text.
Dashboards, model cards and trackers read the same document. `lmtune report RUN_DIR` re-renders.
metrics.json keeps its own keys for existing readers.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmtune.artifacts import RunDir, read_meta, restore_task_state
from lmtune.audit import report_section as audit_section
from lmtune.card import render_card
from lmtune.diagnose import report_section as diagnosis_section
from lmtune.errors import InputError
from lmtune.evaluate.report import write_report
from lmtune.io import write_json
from lmtune.tasks import get_task

SCHEMA = 1
FILE = "results.json"


def path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).root / FILE


def write(run_dir: str | Path, results: dict) -> None:
    write_json(path(run_dir), {"schema": SCHEMA, **results})


def read(run_dir: str | Path) -> dict:
    p = path(run_dir)
    if not p.is_file():
        raise InputError(f"{run_dir}: no {FILE}; it is written when training finishes.")
    results = json.loads(p.read_text())
    if results.get("schema") != SCHEMA:
        raise InputError(f"{p}: results schema {results.get('schema')} is not {SCHEMA}; this lmtune cannot render it.")
    return results


def update(run_dir: str | Path, **sections) -> None:
    """Add or replace sections, then render report.md again from the whole document."""
    results = read(run_dir)
    results.update(sections)
    write(run_dir, results)
    render(run_dir)


def comparison_section(table: dict[str, dict], metric: str) -> str:
    lines = ["## PEFT vs full fine-tuning (same data, same epochs)", "",
             f"| method | dev {metric} | trainable % | artifact MB | peak memory MB | s / epoch |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r[metric]:.4f} | {r['trainable_pct']:.2f} | {r['artifact_mb']:.1f} | {r['peak_mem_mb']:.0f} | "
              f"{r['seconds_per_epoch']:.1f} |" for name, r in table.items()]
    return "\n".join(lines) + "\n"


def render(run_dir: str | Path) -> Path:
    """report.md and the model card from results.json and the saved model's task state alone."""
    rd = RunDir(run_dir)
    results = read(rd.root)
    meta = read_meta(rd.model)
    task = get_task(meta["task"])
    restore_task_state(task, meta, rd.model)
    task.set_report_state(results.get("task_report", {}))
    sections = [task.report(results["metrics"], meta["labels"], rd.root), diagnosis_section(results["diagnosis"]),
                audit_section(results["audit"])]
    if results.get("comparison"):
        sections.append("\n" + comparison_section(results["comparison"], results["metric"]))
    if results.get("continual"):
        from lmtune.continual import report_section as continual_section
        sections.append("\n" + continual_section(results["continual"]))
    if results.get("drift"):
        from lmtune.drift import report_section as drift_section
        sections.append("\n" + drift_section(results["drift"]))
    if results.get("slices") or results.get("fairness"):
        from lmtune.fairness import report_section as fairness_section
        from lmtune.fairness import slices_section
        if results.get("slices") and not (results.get("fairness") or {}).get("slices"):
            sections.append("\n" + slices_section(results["slices"]))
        if results.get("fairness"):
            sections.append("\n" + fairness_section(results["fairness"]))
    if results.get("explain"):
        from lmtune.explain import report_section as explain_section
        sections.append("\n" + explain_section(results["explain"], rd.root))
    if results.get("robustness"):
        from lmtune.robust.attack import report_section
        sections.append("\n" + report_section(results["robustness"]))
    history = [json.loads(line) for line in rd.history.read_text().splitlines()] if rd.history.is_file() else []
    render_card(rd.root, results)
    return write_report(rd.root, results["summary"], results["metrics"], history, results["metric"], "\n".join(sections),
                        tuple(results["headline"]))
