"""fairness: slice metrics and counterfactual term swaps on a labeled file or a split of the run
(lmtune.fairness); `lmtune fairness RUN_DIR`, RUN_DIR/fairness.json and report.md's Slices and
Counterfactual swaps sections. slices: the per-slice metrics training measures (data.slice_columns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.analysis import Analysis, Param, examples_of
from lmtune.errors import InputError


def fairness(run: Any, data: str | Path | None = None, split: str = "test", swap: str | None = None,
             slices: list[str] | None = None) -> dict:
    """Slice metrics (columns of the data; default data.slice_columns) and counterfactual term swaps (a
    built-in list, en or zh, or a file)."""
    from lmtune.fairness import SwapList, counterfactual, slice_metrics, slices_of
    from lmtune.tasks.base import EXAMPLE_LABELS
    columns = run.config.data.slice_columns if slices is None else slices
    if not columns and not swap:
        raise InputError("fairness: give --swap LIST (en, zh or a file) and/or --slices COLUMNS "
                         "(or set data.slice_columns).")
    swaps = SwapList.named(swap, run.config.data.encoding) if swap else None  # a bad list fails before any work
    examples = examples_of(run, data, split, require_label=bool(columns))
    result: dict = {"data": str(data) if data else split}
    rows = None
    if columns:
        run.task.require(EXAMPLE_LABELS, "fairness --slices")
        values = slices_of(run.config, examples, columns)
        rows = run.predict_examples(examples)
        result["slices"] = slice_metrics(rows, values, seed=run.config.train.seed)
    if swaps:
        result["counterfactual"] = counterfactual(run, examples, swaps, rows=rows)
    return result


def slices_section(result: dict) -> str:
    ci = 100 * (1 - result["alpha"])
    lines = ["## Slices", "", f"Test {result['metric']} {result['overall']:.4f} on {result['n']} examples; per slice, the gap to it "
             f"with a {ci:.0f}% bootstrap interval. Flagged: slices whose whole interval is below zero.", ""]
    for col, table in result["columns"].items():
        lines += [f"| {col} | n | {result['metric']} | gap | {ci:.0f}% interval | |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['value']} | {t['n']} | {t['accuracy']:.4f} | {t['gap']:+.4f} | [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}] | "
                  f"{'**worse**' if t['worse'] else ''} |" for t in table]
        lines.append("")
    worse = [f"{col}={t['value']}" for col, table in result["columns"].items() for t in table if t["worse"]]
    if worse:
        lines += [f"Significantly worse: {', '.join(worse)}. Look at their errors, add training examples like them, "
                  "and watch them after each retraining.", ""]
    return "\n".join(lines)


def counterfactual_section(result: dict) -> str:
    lines = ["## Counterfactual swaps", ""]
    if not result["with_terms"]:
        return "\n".join(lines + [f"None of the {result['examples']} examples contains a term of the {result['list']} list.", ""])
    lines += [f"{result['with_terms']} of {result['examples']} examples contain a term of the {result['list']} list "
              f"({' / '.join(result['groups'])}); swapping the terms changed {100 * result['changed']:.1f}% of the predictions"
              + (f", mean shift of the original label's probability {result['mean_shift']:+.4f}" if result["mean_shift"] is not None
                 else "") + ".", "", "| the text mentioned | n | changed | mean shift |", "|---|---|---|---|"]
    for g, r in result["per_group"].items():
        shift = "" if r["mean_shift"] is None else f"{r['mean_shift']:+.4f}"
        lines.append(f"| {g} | {r['n']} | {100 * r['changed']:.1f}% | {shift} |")
    if result["shown"]:
        lines += ["", "Changed predictions:", ""]
        lines += [f"- {s['text']} → {s['before']}; swapped: {s['swapped']} → {s['after']}" for s in result["shown"]]
    return "\n".join(lines) + "\n"


def section(result: dict) -> str:
    parts = []
    if result.get("slices"):
        parts.append(slices_section(result["slices"]))
    if result.get("counterfactual"):
        parts.append(counterfactual_section(result["counterfactual"]))
    return "\n".join(parts)


def training_slices(result: dict, run_dir: Path, doc: dict) -> str:
    """The slices training measured, unless a fairness result carries its own."""
    return "" if (doc.get("fairness") or {}).get("slices") else slices_section(result)


SLICES = Analysis(slices_section, in_report=training_slices)  # written by training (data.slice_columns)
ANALYSIS = Analysis(
    section, fairness, quiet=True,
    help="per-slice metrics with intervals, and counterfactual term swaps (he <-> she ...)",
    description="Slices: accuracy per value of each --slices column (default data.slice_columns), the gap to "
                "overall with a 95%% bootstrap interval, significantly worse slices flagged. --swap en|zh|FILE: "
                "swaps gendered terms (built-in English / Chinese lists, or a CSV whose header names the "
                "two groups and whose rows are term pairs) and reports how many predictions change. "
                "Writes RUN_DIR/fairness.json and report.md sections.",
    params=(Param("data", help="labeled file with the run's columns (default: the run's --split)"),
            Param("split", default="test", choices=("test", "dev")),
            Param("swap", help="en, zh, or a CSV/TSV file of term pairs (header: the two groups)"),
            Param("slices", list, help="comma-separated columns of the data (default: data.slice_columns)"),
            Param("json", bool, command_only=True)))
