"""fewshot: which few-shot method trained a classification run and why (lmtune.fewshot, the recipe's fewshot stage):
the rule, the class counts, SetFit's pairs, steps and the embedding cosines before and after. Written by training,
shown as report.md's Few-shot section. Kept apart from lmtune.fewshot so that building the command line (which
loads every registered analysis) imports no ML library.
"""
from __future__ import annotations

from lmtune.analysis import Analysis


def section(r: dict) -> str:
    lines = ["## Few-shot", "",
             f"Method: **{r['method']}** ({r['why']}). Training data: {r['train_examples']} labeled examples in "
             f"{r['classes']} classes, {r['median_per_class']:g} in the median class"
             + (f", {r['mean_per_class']:.1f} on average" if "mean_per_class" in r else "")  # records before the mean rule lack it
             + f" (min {r['min_per_class']}, max {r['max_per_class']}).", "", f"Rule: {r['rule']}."]
    if r.get("pseudo_labels"):  # a self-training student's record (lmtune.fewshot.given_decision)
        lines += ["", f"Self-training student: its train split adds {r['pseudo_labels']} pseudo-labels, which the rule does "
                      "not count (the method is the run's, decided on its labels); SetFit's pairs are drawn from both."]
    if r["method"] == "setfit":
        b, a = r["cosine_before"], r["cosine_after"]
        same = (f"{b['same_class']:.3f} -> {a['same_class']:.3f}" if b["same_class"] is not None else "-")
        lines += ["", "SetFit: contrastive pair fine-tuning of the sentence embedding "
                      f"({r['pooling']} pooling), then a {r['head']}.", "",
                  "| pairs | contrastive epochs | steps | seconds | mean cosine, same class | mean cosine, different class |",
                  "|---|---|---|---|---|---|",
                  f"| {r['pairs']} | {r['contrastive_epochs']} | {r['contrastive_steps']} | {r['contrastive_seconds']:.1f} | "
                  f"{same} | {b['different_class']:.3f} -> {a['different_class']:.3f} |"]
        p = r.get("prototypes")
        if p:
            lines += ["", f"Head started from label prototypes (scale {p['scale']:.3g}) for {len(p['labels'])} labels"
                          + (f", {len(p['from_descriptions'])} of them from fewshot.label_descriptions" if p["from_descriptions"] else "")
                          + "."]
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(section)  # no function: training writes it (the `fewshot` stage)
