"""Long texts as overlapping windows, for tasks with one decision per text (classification,
multi-label): `data.long_text: windows`.

Truncation keeps only a text's first max_length tokens; a filing or a long review carries its signal
anywhere. Here every token lands in at least one window of max_length (special tokens included),
consecutive windows share `window_overlap` tokens (so a phrase cut at a window edge is whole in the
next one), each training window carries its text's label, and at prediction the windows' outputs are
pooled into the text's (mean of logits by default: the average evidence, order-invariant; max per
class for a label that one passage alone decides). The HF examples offer nothing for this; NER's
windows (tasks/ner.py) cut at word boundaries and merge per word instead.

A very long text would otherwise dominate an epoch with its windows, so training uses at most
`data.max_windows` windows per text, evenly spread with the first and the last kept; prediction
always uses every window.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lmtune.models import quiet_transformers


def spans(n: int, body: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `body` tokens over n tokens, consecutive ones sharing `overlap`
    tokens; together they cover every token (one empty window for an empty text)."""
    if n <= body:
        return [(0, n)]
    step = max(body - overlap, 1)
    out, start = [], 0
    while True:
        end = min(start + body, n)
        out.append((start, end))
        if end == n:
            return out
        start += step


def spread(k: int, cap: int) -> list[int]:
    """At most `cap` of k window indices, evenly spread, first and last kept."""
    if k <= cap:
        return list(range(k))
    if cap == 1:
        return [0]
    return sorted({round(i * (k - 1) / (cap - 1)) for i in range(cap)})


def encode_windows(texts: list[str], tokenizer: Any, max_length: int, overlap: int | None) -> tuple[list[list[dict]], dict]:
    """Per text, its windows as model inputs ({input_ids, length[, token_type_ids]}), and stats."""
    with quiet_transformers():  # untruncated on purpose: the windows cut it
        bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix, suffix = _special_tokens(tokenizer)
    special = len(prefix) + len(suffix)
    body = max(max_length - special, 1)
    overlap = body // 4 if overlap is None else min(overlap, body - 1)
    with_types = "token_type_ids" in tokenizer.model_input_names
    out, windowed, longest = [], 0, 0
    for ids in bodies:
        longest = max(longest, len(ids) + special)
        cuts = spans(len(ids), body, overlap)
        windowed += len(cuts) > 1
        rows = []
        for w, (s, e) in enumerate(cuts):
            full = prefix + ids[s:e] + suffix
            f = {"input_ids": full, "length": len(full), "window": w}
            if with_types:
                f["token_type_ids"] = [0] * len(full)
            rows.append(f)
        out.append(rows)
    long = [len(ids) + special for ids in bodies if len(ids) > body]
    stats = {"examples": len(texts), "truncated": 0, "windowed": windowed, "windows": sum(map(len, out)), "max_tokens": longest,
             "window_tokens": max_length, "overlap": overlap,
             "long_tokens": {"median": int(np.median(long)), "max": max(long)} if long else {}}
    return out, stats


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] / [SEP], <s> / </s>, or none),
    read off one encoded word (fast tokenizers in transformers 5 have no build_inputs_with_special_tokens)."""
    with quiet_transformers():
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        body = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(body) + 1):
        if full[k:k + len(body)] == body:
            return full[:k], full[k + len(body):]
    return [], []


def pool(outputs: list[np.ndarray], features: list[dict], n_examples: int, how: str = "mean") -> list[np.ndarray]:
    """Per-example outputs from per-window outputs (features name their example under "example")."""
    if not features or "example" not in features[0]:
        return outputs
    groups: list[list[np.ndarray]] = [[] for _ in range(n_examples)]
    for f, o in zip(features, outputs):
        groups[f["example"]].append(o)
    reduce = np.max if how == "max" else np.mean
    return [reduce(np.stack(g), axis=0) for g in groups]


def training_subset(features: list[dict], cap: int) -> list[dict]:
    """The windows trained on: at most `cap` per text (see spread). A text's windows are consecutive and
    start at window 0, so a text that re-sampling repeats keeps each repetition."""
    if not features or "window" not in features[0]:
        return features
    runs: list[list[dict]] = []
    for f in features:
        if f["window"] == 0:
            runs.append([])
        runs[-1].append(f)
    return [run[i] for run in runs for i in spread(len(run), cap)]
