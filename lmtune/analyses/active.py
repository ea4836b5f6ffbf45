"""active: the labeling loop's record in a run (lmtune.active): the batches asked, the labels imported and the
learning curve (labeled train rows vs the dev metric over the loop's runs). Written by `lmtune label`, shown as
report.md's Active learning section."""
from __future__ import annotations

from pathlib import Path

from lmtune.analysis import Analysis


def section(d: dict) -> str:
    lines = ["## Active learning", ""]
    if d.get("parent"):
        lines += [f"Grown from {d['parent']}.", ""]
    curve = d.get("curve") or []
    if curve:
        metric = curve[-1]["metric"]
        lines += [f"| run | labeled train rows | dev {metric} |", "|---|---|---|"]
        lines += [f"| {p['run']} | {p['labels']} | {'-' if p['dev'] is None else format(p['dev'], '.4f')} |" for p in curve]
        lines.append("")
    if d.get("batches"):
        lines += ["| batch | strategy | rows | file |", "|---|---|---|---|"]
        lines += [f"| {b['index']} | {b['strategy']} | {b['size']} | {b['file']} |" for b in d["batches"]]
        lines.append("")
    if d.get("imports"):
        lines += ["| import | labeled rows | not labeled | duplicates | train file | retrained run |", "|---|---|---|---|---|---|"]
        lines += [f"| {i['index']} | {i['rows']} | {i['skipped']} | {i['duplicates']} | {i['train_file']} | {i['run_dir'] or '-'} |"
                  for i in d["imports"]]
        lines.append("")
    return "\n".join(lines)


def in_report(d: dict, run_dir: Path, _doc: dict) -> str:
    text = section(d)
    if (Path(run_dir) / "active_curve.png").is_file():
        text += "\n![learning curve of the labeling loop](active_curve.png)\n"
    return text


# written by `lmtune label` (lmtune.active), which is its command
ANALYSIS = Analysis(section, in_report=in_report)
