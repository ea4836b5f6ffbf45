"""Sentence pairs (data.text_pair_column): the checks and the training option that only pairs need.

- Leakage in either order: the generic audit compares "A [SEP] B" strings, so a test pair (B, A)
  whose swap is in train goes unseen, yet for a symmetric relation (paraphrase, similarity) the
  model has been trained on its answer.
- Identical pairs (A, A): trivially positive for paraphrase, usually a data error.
- Symmetric training: each training pair also in the other order, so the model cannot learn an
  order the relation does not have.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lmtune.config import option

_NORM = re.compile(r"\s+")
# label names that mean "the two texts match" (reranking, the bi-encoder's head)
RELEVANT_NAMES = ("1", "true", "yes", "relevant", "positive", "duplicate", "paraphrase", "entailment")


@dataclass
class PairOptions:
    """data.* keys of sentence pairs (they join the data section; registered in lmtune/registrations.py)."""
    symmetric_pairs: bool = option(False, "Sentence pairs whose relation is symmetric (paraphrase, similarity): also train on "
                                          "each pair in the other order; classification also predicts both orders and averages the logits.")
    pair_encoding: str = option("auto", "Sentence pairs: cross (the two texts as one input, read jointly) or bi (each text "
                                        "encoded alone with the checkpoint's pooling, the pair judged by the cosine of the two "
                                        "embeddings). auto: bi for a sentence-embedding checkpoint (sentence-transformers) on a "
                                        "two-label classification pair task, else cross (regression too: see README).", ("auto", "cross", "bi"))


def relevant_positions(labels: list[str]) -> list[int]:
    """The positions of the labels whose name means "the two texts match"."""
    return [i for i, x in enumerate(labels) if x.lower() in RELEVANT_NAMES]


def _key(text: str) -> str:
    return _NORM.sub(" ", text.lower()).strip()


def _unordered(ex) -> frozenset | tuple:
    a, b = _key(ex.text), _key(ex.text_pair)
    return (a, b) if a == b else frozenset((a, b))


def _finding(check: str, severity: str, detail: str, suggestion: str, examples: list[str]) -> dict:
    return {"check": check, "severity": severity, "detail": detail, "suggestion": suggestion, "examples": examples[:5]}


def pair_findings(splits) -> list[dict]:
    """Audit findings for pair data (none when the examples are single texts)."""
    train = [ex for ex in splits.train if ex.text_pair is not None]
    if not train:
        return []
    out = []
    seen = {_unordered(ex) for ex in train}
    for name, exs in (("dev", splits.dev), ("test", splits.test)):
        leaked = [ex for ex in exs if ex.text_pair is not None and _unordered(ex) in seen]
        swapped = [ex for ex in leaked if (_key(ex.text), _key(ex.text_pair)) not in
                   {(_key(t.text), _key(t.text_pair)) for t in train}]
        if leaked:
            out.append(_finding(f"pair_leak_{name}", "critical" if name == "test" else "warning",
                                f"{len(leaked)} {name} pair(s) also in train, {len(swapped)} of them only in the other order",
                                f"Remove them from {name} (a swapped pair is the same question for a symmetric relation); "
                                f"the {name} score is inflated by them.", [ex.source for ex in leaked]))
    sources = {ex.source: ex for ex in train}  # symmetric copies share their source: count each row once
    same = [s for s, ex in sources.items() if _key(ex.text) == _key(ex.text_pair)]
    if same:
        out.append(_finding("identical_pairs", "warning", f"{len(same)} training pair(s) whose two texts are the same",
                            "Check them: an identical pair is trivially a match and is usually a data error.", same))
    return out


def symmetric_copies(train: list, data_cfg) -> list:
    """Each training pair in the other order (data.symmetric_pairs); single texts and identical pairs get none."""
    if not data_cfg.symmetric_pairs:
        return []
    return [dataclasses.replace(ex, text=ex.text_pair, text_pair=ex.text) for ex in train
            if ex.text_pair is not None and ex.text != ex.text_pair]
