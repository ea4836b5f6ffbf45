"""drift: does a new file differ from the run's training data (lmtune.drift)? `lmtune drift RUN_DIR --data
NEW_FILE`; RUN_DIR/drift.json and the Drift section of report.md."""
from __future__ import annotations

from typing import Any

from lmtune.analysis import Analysis, Param


def drift(run: Any, data: str, alpha: float = 0.05, max_examples: int = 1000, permutations: int = 500) -> dict:
    from lmtune.drift import check
    return check(run, data, alpha, max_examples, permutations)


def section(r: dict) -> str:
    verdict = "shift found" if r["shifted"] else "no shift found"
    lines = ["## Drift", "", f"`{r['new']['source']}` ({r['new']['examples']} examples) against the run's data (labels: train, "
             f"{r['reference'].get('train_examples', '?')}; inputs and confidence: dev, {r['reference']['examples']}): **{verdict}** "
             f"(alpha {r['alpha']}).", "",
             "| view | statistic | p-value | shifted |", "|---|---|---|---|"]
    i = r["input_shift"]
    lines.append(f"| input (embeddings) | MMD² {i['mmd2']:.4g}, domain AUC {i['domain_auc']:.3f} | {i['p_value']:.3g} | "
                 f"{'yes' if i['shifted'] else 'no'} |")
    if "label_shift" in r:
        ls = r["label_shift"]
        lines.append(f"| labels | chi² {ls['chi2']:.1f} (dof {ls['dof']}) | {ls['p_value']:.3g} | {'yes' if ls['shifted'] else 'no'} |")
    if "confidence_shift" in r:
        c = r["confidence_shift"]
        lines.append(f"| confidence | {c['mean_confidence_reference']:.3f} -> {c['mean_confidence_new']:.3f}, abstained "
                     f"{c['abstain_rate_reference']:.1%} -> {c['abstain_rate_new']:.1%} | {c['p_value']:.3g} | "
                     f"{'yes' if c['shifted'] else 'no'} |")
    v = r["vocabulary_shift"]
    lines.append(f"| vocabulary / length | unseen words {v['reference']['unseen_word_rate']:.1%} -> {v['new']['unseen_word_rate']:.1%}, "
                 f"tokens {v['train']['mean_tokens']:.1f} (train) -> {v['new']['mean_tokens']:.1f} | - | {'yes' if v['shifted'] else 'no'} |")
    for f in r["findings"]:
        lines += ["", f"- **{f['kind'].replace('_', ' ')}**: {f['evidence']}. {f['advice']}"]
    return "\n".join(lines) + "\n"


ANALYSIS = Analysis(
    section, drift, quiet=True,
    help="does new data differ from a run's training data? labels, inputs, confidence, vocabulary",
    description="Compares --data with the run's training data (re-read from its recorded sources): "
                "label shift (chi-squared), input shift (MMD on the fine-tuned encoder's embeddings, "
                "permutation p-value; domain-classifier AUC), confidence shift, vocabulary and length. "
                "Writes RUN_DIR/drift.json and a Drift section in report.md.",
    params=(Param("data", required=True, help="the new file, with the run's text column (labels optional)"),
            Param("alpha", float, 0.05, "significance level of the tests"),
            Param("max_examples", int, 1000, "examples sampled from each side"),
            Param("permutations", int, 500),
            Param("json", bool, help="print the whole result as JSON", command_only=True)))
