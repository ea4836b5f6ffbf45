"""How the model treats different groups: slice metrics and counterfactual term swaps.

Slices (data.slice_columns, or `lmtune fairness --slices`): any column of the data (product, region,
channel, language). Per slice value: accuracy (fairlearn's MetricFrame), its gap to the overall
accuracy with a bootstrap confidence interval (the whole set resampled, so the interval accounts for
both the slice's and the overall's noise), and a flag when the whole interval lies below zero.

Counterfactual swaps (`lmtune fairness RUN_DIR --swap en|zh|FILE`): every text that contains a term of
a swap list gets each such term replaced by its counterpart (he <-> she, 他 <-> 她, ...); the share of
predictions that change and the mean shift in the probability of the original label, per group, with
examples. A model that ignores who the text is about changes nothing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.errors import InputError
from lmtune.tasks.base import EXAMPLE_LABELS

# Built-in swap lists: (group a, group b) and term pairs. A term that pairs with two others ("her": him /
# his) swaps back to the first of them.
SWAP_LISTS: dict[str, tuple[tuple[str, str], list[tuple[str, str]]]] = {
    "en": (("male", "female"), [
        ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
        ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
        ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"), ("king", "queen"),
        ("mr", "mrs"), ("uncle", "aunt"), ("nephew", "niece"), ("gentleman", "lady"), ("gentlemen", "ladies"),
        ("boyfriend", "girlfriend"), ("dad", "mom"), ("male", "female"), ("actor", "actress"), ("actors", "actresses"),
        ("guy", "gal"), ("john", "mary"), ("james", "linda"), ("michael", "susan"), ("david", "sarah"),
        ("robert", "jennifer"), ("william", "elizabeth"), ("richard", "patricia"), ("thomas", "barbara")]),
    "zh": (("male", "female"), [
        ("他们", "她们"), ("他", "她"), ("先生", "女士"), ("男人", "女人"), ("男孩", "女孩"), ("男生", "女生"),
        ("父亲", "母亲"), ("爸爸", "妈妈"), ("儿子", "女儿"), ("哥哥", "姐姐"), ("弟弟", "妹妹"), ("丈夫", "妻子"),
        ("老公", "老婆"), ("男朋友", "女朋友"), ("叔叔", "阿姨"), ("爷爷", "奶奶"), ("王子", "公主"), ("男", "女")]),
}


# ---- swap lists ---------------------------------------------------------------------------------
class SwapList:
    def __init__(self, name: str, groups: tuple[str, str], pairs: list[tuple[str, str]]) -> None:
        self.name, self.groups = name, groups
        self.to: dict[str, str] = {}
        self.group: dict[str, str] = {}
        for a, b in pairs:
            for x, y, g in ((a, b, groups[0]), (b, a, groups[1])):
                self.to.setdefault(x.lower(), y.lower())
                self.group.setdefault(x.lower(), g)
        terms = sorted(self.to, key=len, reverse=True)  # longest first: 他们 before 他
        cjk = any(re.search("[\u4e00-\u9fff]", t) for t in terms)
        body = "|".join(map(re.escape, terms))
        self.pattern = re.compile(body if cjk else rf"\b(?:{body})\b", re.IGNORECASE)

    @classmethod
    def named(cls, spec: str, encoding: str = "utf-8") -> SwapList:
        """A built-in list (en, zh) or a CSV/TSV file: a header naming the two groups, then one term pair a row."""
        if spec in SWAP_LISTS:
            groups, pairs = SWAP_LISTS[spec]
            return cls(spec, groups, pairs)
        from lmtune.data.readers import read_text_file
        lines = read_text_file(spec, encoding).splitlines()
        sep = "\t" if lines and "\t" in lines[0] else ","
        head = [c.strip() for c in lines[0].split(sep)] if lines else []
        if len(head) != 2 or not all(head):
            raise InputError(f"{spec}: line 1: the header must name the two groups (e.g. 'male,female'); built-in lists: "
                             f"{', '.join(SWAP_LISTS)}.")
        pairs = []
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            cells = [c.strip() for c in line.split(sep)]
            if len(cells) != 2 or not all(cells):
                raise InputError(f"{spec}: line {n}: expected two terms separated by '{sep}', got {line.strip()!r}.")
            pairs.append((cells[0], cells[1]))
        if not pairs:
            raise InputError(f"{spec}: no term pairs after the header.")
        return cls(Path(spec).name, (head[0], head[1]), pairs)

    def swap(self, text: str) -> tuple[str, set[str]]:
        """The text with every term replaced by its counterpart (case kept), and the groups it mentioned."""
        found: set[str] = set()

        def repl(m: re.Match) -> str:
            w = m.group(0)
            found.add(self.group[w.lower()])
            out = self.to[w.lower()]
            return out.upper() if w.isupper() and len(w) > 1 else out.capitalize() if w[:1].isupper() else out

        return self.pattern.sub(repl, text), found


def _swapped_example(task: Any, ex: Any, swaps: SwapList) -> tuple[Any, set[str]] | None:
    text, g1 = swaps.swap(ex.text)
    pair, g2 = swaps.swap(ex.text_pair) if getattr(ex, "text_pair", None) is not None else (None, set())
    if not (g1 | g2):
        return None
    return task.from_texts([(text, pair) if pair is not None else text])[0], g1 | g2


def counterfactual(run: Any, examples: list, swaps: SwapList, max_shown: int = 5, rows: list[dict] | None = None) -> dict:
    """Predictions before and after swapping the list's terms in every example that has any (`rows`: the
    examples' predictions when the caller already has them)."""
    run.task.require(EXAMPLE_LABELS, "fairness --swap")
    found = [(i, ex, s) for i, ex in enumerate(examples) if (s := _swapped_example(run.task, ex, swaps)) is not None]
    out: dict = {"list": swaps.name, "groups": list(swaps.groups), "examples": len(examples), "with_terms": len(found)}
    if not found:
        return {**out, "changed": None, "mean_shift": None, "per_group": {}, "shown": []}
    before = [rows[i] for i, _, _ in found] if rows is not None else run.predict_examples([ex for _, ex, _ in found])
    found = [(ex, s) for _, ex, s in found]
    after = run.predict_examples([s[0] for _, s in found])
    key = run.task.decision_key
    changed = np.array([b[key] != a[key] for b, a in zip(before, after)])
    shift = np.array([a["probabilities"][b[key]] - b["probabilities"][b[key]] if "probabilities" in b and b[key] in b["probabilities"]
                      else np.nan for b, a in zip(before, after)])
    groups = [" + ".join(sorted(g)) for _, (_, g) in found]
    per_group = {}
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        per_group[g] = {"n": int(m.sum()), "changed": round(float(changed[m].mean()), 4),
                        "mean_shift": _round(np.nanmean(shift[m]) if np.isfinite(shift[m]).any() else None)}
    shown = [{"text": ex.text, "swapped": s[0].text, "before": b[key], "after": a[key]}
             for (ex, s), b, a, c in zip(found, before, after, changed) if c][:max_shown]
    return {**out, "changed": round(float(changed.mean()), 4),
            "mean_shift": _round(np.nanmean(shift) if np.isfinite(shift).any() else None),
            "mean_abs_shift": _round(np.nanmean(np.abs(shift)) if np.isfinite(shift).any() else None),
            "per_group": per_group, "shown": shown}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ---- slices ------------------------------------------------------------------------------------
def slice_metrics(rows: list[dict], slices: dict[str, list[str]], alpha: float = 0.05, rounds: int = 1000,
                  seed: int = 0, min_size: int = 10) -> dict:
    """Per slice value of each column: accuracy, gap to overall with a (1 - alpha) bootstrap interval,
    and whether the slice is significantly worse (the interval's upper end below zero)."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame, count
    from sklearn.metrics import accuracy_score
    labelled = [i for i, r in enumerate(rows) if r.get("gold") is not None]
    if not labelled:
        raise InputError("slice metrics need labeled examples.")
    gold = np.array([rows[i]["gold"] for i in labelled], dtype=object)
    pred = np.array([rows[i].get("top_label", rows[i]["label"]) for i in labelled], dtype=object)
    correct = (gold == pred).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(correct), size=(rounds, len(correct)))
    c = correct[draws]
    overall_b = c.mean(1)
    out: dict = {"metric": "accuracy", "overall": round(float(correct.mean()), 4), "n": len(correct), "alpha": alpha,
                 "columns": {}}
    for col, values in slices.items():
        vals = np.array([values[i] for i in labelled], dtype=object)
        frame = MetricFrame(metrics={"accuracy": accuracy_score, "n": count}, y_true=gold, y_pred=pred,
                            sensitive_features=pd.Series(vals, name=col))
        table = []
        for value, r in frame.by_group.iterrows():
            m = vals[draws] == value
            sizes = m.sum(1)
            gaps = np.where(sizes > 0, (c * m).sum(1) / np.maximum(sizes, 1), np.nan) - overall_b
            lo, hi = np.nanpercentile(gaps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            acc = float(r["accuracy"])
            table.append({"value": str(value), "n": int(r["n"]), "accuracy": round(acc, 4),
                          "gap": round(acc - float(correct.mean()), 4), "ci": [round(float(lo), 4), round(float(hi), 4)],
                          "worse": bool(hi < 0 and r["n"] >= min_size)})
        out["columns"][col] = sorted(table, key=lambda t: t["gap"])
    return out


def slices_of(cfg: Any, examples: list, columns: list[str]) -> dict[str, list[str]]:
    from lmtune.data.readers import column_values
    return {col: column_values(examples, col, "data.slice_columns", cfg.data.format, cfg.data.encoding, missing="(missing)")
            for col in columns}
