"""Data audit: problems in the labeled data that make a model behave unpredictably, each with a
severity and what to do. Runs at the start of `lmtune train` (audit.json, report.md) and as
`lmtune audit CONFIG`.

Checks: class balance and rare classes (NER: entity types), exact and normalized duplicates, the
same text with conflicting labels (NER: tags), train/dev/test overlap (leakage), empty or
symbol-only texts, and (with a tokenizer) what truncation at max_length cuts. Label-noise
candidates (confident learning, classification) join the audit from noise.py when asked for.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

_NORM = re.compile(r"[\W_]+", re.UNICODE)


def _text(ex) -> str:
    return ex.audit_text()


def _norm(text: str) -> str:
    return _NORM.sub(" ", text.lower()).strip()


def _f(check: str, severity: str, detail: str, suggestion: str, examples: list[str] | None = None) -> dict:
    return {"check": check, "severity": severity, "detail": detail, "suggestion": suggestion, "examples": (examples or [])[:5]}


def audit(splits, truncation: dict[str, dict] | None = None, max_length: int | None = None) -> list[dict]:
    train = splits.train
    classification = bool(train) and not train[0].labels_per_token
    groups: dict[str, list] = defaultdict(list)  # train texts after normalization: duplicates and leakage
    for ex in train:
        groups[_norm(_text(ex))].append(ex)
    return (_balance_findings(splits, classification) + _duplicate_findings(train, groups, classification)
            + _leakage_findings(splits, groups) + _garbage_findings(train)
            + _truncation_findings(truncation or {}, max_length))


def _units(exs) -> Counter:
    """Classes, or entity types."""
    return Counter(u for ex in exs for u in ex.audit_units())


def _balance_findings(splits, classification: bool) -> list[dict]:
    out: list[dict] = []
    what = "training examples" if classification else "training entities"
    counts = _units(splits.train)
    if not counts:
        return out
    most, least = counts.most_common()[0], counts.most_common()[-1]
    ratio = most[1] / max(least[1], 1)
    if ratio >= 3:
        out.append(_f("imbalance", "critical" if ratio >= 20 else "warning",
                      f"'{most[0]}' has {most[1]} {what}, '{least[0]}' {least[1]} (ratio {ratio:.1f})",
                      "Watch per-class recall and macro-F1 (train.metric macro_f1), collect more of the rare classes, "
                      "or re-weight / re-sample them."))
    rare = [lab for lab, n in counts.items() if n < 10]
    if rare:
        out.append(_f("rare_labels", "warning", f"{len(rare)} label(s) with fewer than 10 {what}: "
                      + ", ".join(f"{lab} ({counts[lab]})" for lab in rare[:10]),
                      "Add examples, merge them into a related class, or expect unreliable scores for them."))
    for name, exs in (("dev", splits.dev), ("test", splits.test)):
        c = _units(exs)
        thin = [lab for lab in counts if c.get(lab, 0) < 2]
        if exs and thin:
            out.append(_f(f"rare_labels_{name}", "warning",
                          f"{len(thin)} label(s) have fewer than 2 {name} examples: {', '.join(thin[:10])}",
                          f"Per-class {name} scores for them mean little; give a larger {name} set."))
    return out


def _duplicate_findings(train: list, groups: dict[str, list], classification: bool) -> list[dict]:
    """Duplicates and conflicting labels inside train."""
    out: list[dict] = []
    exact = sum(len(v) - len({_text(e) for e in v}) for v in groups.values())
    near = sum(len(v) - 1 for v in groups.values()) - exact
    if exact:
        out.append(_f("duplicates", "warning", f"{exact} exact duplicate row(s) in train",
                      "Remove them: they over-weight those examples and inflate scores if they reach dev/test.",
                      [e.source for v in groups.values() if len(v) > 1 for e in v[1:]]))
    if near > 0:
        out.append(_f("near_duplicates", "info", f"{near} row(s) in train equal another after lower-casing and "
                      "removing punctuation", "Check whether they are the same example."))
    if not train:
        return out
    same = groups
    if not classification:  # tags follow tokens: only the very same token sequence must carry the same tags
        same = defaultdict(list)
        for ex in train:
            same[_text(ex)].append(ex)
    conflicts = [v for v in same.values() if len({e.audit_gold() for e in v}) > 1]
    if conflicts:
        out.append(_f("conflicting_labels", "critical" if len(conflicts) > 0.01 * len(same) else "warning",
                      f"{len(conflicts)} text(s) appear with different labels",
                      "Decide the right label for each and fix the file; the model cannot learn both.",
                      [f"{e.source}={e.audit_gold()}" for v in conflicts for e in v]))
    return out


def _leakage_findings(splits, groups: dict[str, list]) -> list[dict]:
    out: list[dict] = []
    for name, exs in (("dev", splits.dev), ("test", splits.test)):
        leaked = [ex for ex in exs if _norm(_text(ex)) in groups]
        if leaked:
            share = len(leaked) / len(exs)
            out.append(_f(f"leakage_{name}", "critical" if share > 0.01 else "warning",
                          f"{len(leaked)} of {len(exs)} {name} example(s) ({share:.1%}) also appear in train",
                          f"Remove them from {name} (or train): scores on seen examples overstate quality.",
                          [ex.source for ex in leaked]))
    return out


def _garbage_findings(train: list) -> list[dict]:
    """Empty or symbol-only texts."""
    garbage = [ex for ex in train if not _norm(_text(ex))]
    if not garbage:
        return []
    return [_f("garbage_rows", "warning", f"{len(garbage)} training text(s) have no letters or digits",
               "Remove or fix them.", [ex.source for ex in garbage])]


def _truncation_findings(truncation: dict[str, dict], max_length: int | None) -> list[dict]:
    out: list[dict] = []
    for name, stats in truncation.items():
        if stats.get("truncated"):
            share = stats["truncated"] / max(stats["examples"], 1)
            out.append(_f(f"truncation_{name}", "warning" if share > 0.01 else "info",
                          f"{stats['truncated']} of {stats['examples']} {name} example(s) ({share:.1%}) are longer than "
                          f"max_length {max_length} (longest {stats.get('max_tokens', '?')} tokens) and get cut",
                          "Raise data.max_length, or set data.long_text windows, if the rest of the text matters."))
        if stats.get("windowed") and "long_tokens" in stats:  # classification with data.long_text windows
            long = stats["long_tokens"]
            out.append(_f(f"long_texts_{name}", "info",
                          f"{stats['windowed']} of {stats['examples']} {name} text(s) are longer than the {max_length}-token "
                          f"window: median {long['median']} tokens ({long['median'] / max_length:.1f}x the window), longest "
                          f"{long['max']}; cut into {stats['windows']} overlapping windows in all",
                          "Nothing is cut; every token is in some window. Raise data.max_length for more context per window."))
    return out


def report_section(findings: list[dict]) -> str:
    if not findings:
        return "## Data audit\n\nNo problem found.\n"
    lines = ["## Data audit", "", "| check | severity | finding | what to do |", "|---|---|---|---|"]
    for f in findings:
        ex = f" (e.g. {', '.join(f['examples'][:2])})" if f["examples"] else ""
        lines.append(f"| {f['check']} | {f['severity']} | {f['detail']}{ex} | {f['suggestion']} |")
    return "\n".join(lines) + "\n"
