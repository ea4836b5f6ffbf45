"""robustness: accuracy under typo / synonym / word-importance attacks (lmtune.robust.attack);
`lmtune attack RUN_DIR` (and attack.methods after training) writes RUN_DIR/robustness.json and the
Robustness section of report.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmtune.analysis import Analysis, Param, examples_of
from lmtune.errors import InputError
from lmtune.registry import attacks

DEFAULT_METHODS = ["typo", "synonym", "search"]


def robustness(run: Any, data: str | Path | None = None, examples: list | None = None, source: str = "dev",
               **overrides: Any) -> dict:
    """Attack a labeled file (default attack.data, else the run's dev split), or `examples` (named
    `source`); overrides: attack.* keys (None: the run's own)."""
    from lmtune.robust.attack import run_attacks
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for m in overrides.get("methods", []):
        attacks.check(m, "attack: --methods")
    for key in ("budget", "rate"):
        if key in overrides and not 0 < overrides[key] <= 1:
            raise InputError(f"attack: --{key} must be in (0, 1], got {overrides[key]}.")
    if examples is None:
        data = data or run.config.attack.data
        examples, source = examples_of(run, data, "dev"), str(data) if data else "dev"
    cfg = dataclasses.replace(run.config.attack, **overrides)
    if not cfg.methods:
        cfg = dataclasses.replace(cfg, methods=list(DEFAULT_METHODS))
    return {"data": source, **run_attacks(run, examples, cfg)}


def section(r: dict) -> str:
    m = r["metric"]
    lines = ["## Robustness", "",
             f"{r['n']} examples; typo/synonym attacks change {r['settings']['rate']:.0%} of the words (random, seed "
             f"{r['settings']['seed']}); the search attack may change {r['settings']['budget']:.0%} (at least one word); "
             f"substitutes from {r['settings']['synonyms']}. Entities, negations and numbers are never changed.", "",
             f"| attack | {m} | drop | success rate | prediction changed | avg words changed |", "|---|---|---|---|---|---|",
             f"| none (clean) | {r['clean'][m]:.4f} | | | | |"]
    for name, a in r["attacks"].items():
        if "skipped" in a:
            lines.append(f"| {name} | skipped: {a['skipped']} | | | | |")
            continue
        drop = f"{r['clean'][m] - a[m]:+.4f}" if a.get(m) is not None else ""
        sr = f"{a['success_rate']:.1%}" if "success_rate" in a else ""
        val = f"{a[m]:.4f}" if a.get(m) is not None else ""
        changed = f"{a['changed_rate']:.1%}" if "changed_rate" in a else ""
        lines.append(f"| {name} | {val} | {drop} | {sr} | {changed} | {a['avg_words_changed']:.2f} |")
    for name, a in r["attacks"].items():
        if a.get("examples"):
            lines += ["", f"Successful {name} attacks:", ""]
            lines += [f"- {e['gold']} -> {e['prediction'] if 'prediction' in e else e['after']}: \"{e['original']}\" -> "
                      f"\"{e['adversarial']}\"" for e in a["examples"]]
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(
    section, robustness, command="attack", prints_json=True,
    help="robustness report: accuracy under typo / synonym / word-importance attacks",
    description="Attacks a trained run on --data (default: its dev split); writes RUN_DIR/robustness.json "
                "and a Robustness section in report.md. Entities, negations and numbers are never changed.",
    params=(Param("data", help="labeled file with the run's columns (default: the run's dev split)"),
            Param("methods", list, help="comma-separated: typo,synonym,search (default: all three)"),
            Param("rate", float, help="typo/synonym: share of words changed (default 0.2)"),
            Param("budget", float, help="search: most words changed, as a share (default 0.1)"),
            Param("synonyms", choices=("auto", "wordnet", "embedding")),
            Param("max_examples", int),
            Param("seed", int)))
