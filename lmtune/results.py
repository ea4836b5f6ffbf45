"""results.json: a run's results as data (versioned), and report.md rendered from it.

Training writes the document once (summary, metrics per split, the dev metric, diagnosis, audit, the
task's report data); the run analyses (lmtune.analysis, registered in lmtune.registry.analyses) add
their results under their names, and the report is rendered again from the whole document, never
patched as text: each registered analysis present in it renders its own section.
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
from lmtune.registry import analyses
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
    for name in analyses.names():  # registration order; a section that is not in the document is not shown
        if results.get(name):
            text = analyses.get(name).report(results[name], rd.root, results)
            if text:
                sections.append("\n" + text)
    history = [json.loads(line) for line in rd.history.read_text().splitlines()] if rd.history.is_file() else []
    render_card(rd.root, results)
    return write_report(rd.root, results["summary"], results["metrics"], history, results["metric"], "\n".join(sections),
                        tuple(results["headline"]))
