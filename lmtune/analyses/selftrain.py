"""selftrain: self-training on data.unlabeled (lmtune.selftrain): each round's threshold, pseudo-labels per
class and dev metric, and why the rounds stopped. Written by training, shown as report.md's Self-training section.
"""
from __future__ import annotations

from lmtune.analysis import Analysis


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def section(s: dict) -> str:
    metric, rounds = s["metric"], s["rounds"]
    lines = ["## Self-training", "",
             f"{s['unlabeled_rows']} unlabeled texts (`{s.get('unlabeled')}`"
             + (f"; its {s['labels_ignored']} labels ignored" if s.get("labels_ignored") else "") + "). "
             f"Threshold each round: the {s['threshold_rule']} ({s['target_precision']}); class balance: {s['balance']}; "
             f"students {'from the pretrained weights' if s['reinit'] else 'from the teacher'}.", "",
             f"| round | threshold | teacher's dev precision above it | pseudo-labels | dev {metric} | kept |",
             "|---|---|---|---|---|---|"]
    for r in rounds:
        name = "0 (no pseudo-labels)" if r["round"] == 0 else str(r["round"])
        support = f" ({r['dev_examples']} dev)" if r.get("threshold") is not None else ""
        lines.append(f"| {name} | {_number(r.get('threshold'), 2)} | {_number(r.get('dev_precision'))}{support} | "
                     f"{r['pseudo_labels']} | {_number(r.get('dev'))} | {'yes' if r['kept'] else 'no'} |")
    lines += ["", f"Stopped: {s['stop_reason']}. The model of round {s['final_round']} is the run's model, trained with "
                  f"{s['pseudo_labels_kept']} pseudo-labels (RUN/pseudo_labels.jsonl lists every one, with its round and "
                  "confidence)."]
    trained = [r for r in rounds if r.get("per_class")]
    if trained:
        lines += ["", "### Pseudo-labels per class and round", "",
                  "| class | " + " | ".join(f"round {r['round']}{'' if r['kept'] else ' (dropped)'}" for r in trained)
                  + " | kept |", "|---|" + "---|" * (len(trained) + 1)]
        for label in s["labels"]:
            counts = [r["per_class"].get(label, 0) for r in trained]
            kept = sum(c for c, r in zip(counts, trained) if r["kept"])
            lines.append(f"| {label} | " + " | ".join(map(str, counts)) + f" | {kept} |")
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(section)  # no function: training measures it (the students are gone after the run)
