"""lengths: how long the run's inputs are in tokens, per split (or for a file), against data.max_length:
a truncation check. `lmtune lengths RUN_DIR [--data FILE]`; RUN_DIR/lengths.json and the Input lengths
section of report.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmtune.analysis import Analysis, Param, examples_of

WARN_SHARE = 0.05  # more than this share of a split over max_length gets a line of advice


def token_lengths(tokenizer: Any, examples: list) -> list[int]:
    """Tokens per example as the model sees it before any cut: special tokens and a pair's second text included."""
    views = [ex.explain_view()[0] for ex in examples]  # every kind of example's own text(s): (text,) or (text, pair)
    pairs = [v[1] for v in views] if any(len(v) > 1 for v in views) else None
    ids = tokenizer([v[0] for v in views], pairs, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]


def distribution(lengths: list[int], max_length: int) -> dict:
    a = np.asarray(lengths)
    over = int((a > max_length).sum())
    return {"n": len(a), "mean": round(float(a.mean()), 2), "median": int(np.median(a)),
            "p90": int(np.percentile(a, 90)), "p99": int(np.percentile(a, 99)), "max": int(a.max()),
            "over_max_length": over, "over_share": round(over / len(a), 4)}


def lengths(run: Any, data: str | Path | None = None) -> dict:
    max_length = run.config.data.max_length
    if data:
        named = {str(data): examples_of(run, data, "test", require_label=False)}
    else:
        splits = run.task.read(run.config)
        named = {s: getattr(splits, s) for s in ("train", "dev", "test") if getattr(splits, s)}
    return {"max_length": max_length,
            "splits": {name: distribution(token_lengths(run.tokenizer, exs), max_length) for name, exs in named.items()}}


def section(r: dict) -> str:
    m = r["max_length"]
    lines = ["## Input lengths", "", f"Tokens per example (special tokens included) against data.max_length {m}; "
             "longer inputs are truncated (or cut into windows by the tasks that window).", "",
             "| data | n | mean | median | p90 | p99 | max | over max_length |", "|---|---|---|---|---|---|---|---|"]
    for name, d in r["splits"].items():
        lines.append(f"| {name} | {d['n']} | {d['mean']:.1f} | {d['median']} | {d['p90']} | {d['p99']} | {d['max']} | "
                     f"{d['over_max_length']} ({d['over_share']:.1%}) |")
    long = [f"{name} {d['over_share']:.1%}" for name, d in r["splits"].items() if d["over_share"] > WARN_SHARE]
    if long:
        lines += ["", f"Over max_length: {', '.join(long)}. Raise data.max_length to about the p99 above (cost grows with "
                      "it), or check that the end of a long text does not carry the label."]
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(
    section, lengths, quiet=True, help="input lengths in tokens per split against data.max_length (a truncation check)",
    description="Counts each example's tokens with the run's tokenizer (special tokens and a pair's second text "
                "included) per split of the run, or for --data FILE: mean, median, p90, p99, max and how many are "
                "longer than data.max_length. Writes RUN_DIR/lengths.json and an Input lengths section in report.md.",
    params=(Param("data", help="a file with the run's columns instead of the run's splits"),
            Param("json", bool, help="print the whole result as JSON", command_only=True)))
