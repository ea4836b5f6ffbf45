"""Tagging schemes, spans and constrained decoding for sequence labeling.

Internally every tag sequence is BIO (IOB2); readers convert from the user's scheme and outputs
are converted back. Hand-written because the conversions, the span arithmetic and the Viterbi
over allowed transitions are small, exact and the part that usually goes subtly wrong.
"""
from __future__ import annotations

import functools

import numpy as np

SCHEMES = ("bio", "iob1", "bioes", "bilou", "bmes")
PREFIXES = {"bio": "BI", "iob1": "BI", "bioes": "BIES", "bilou": "BILU", "bmes": "BMES"}


def split_tag(tag: str) -> tuple[str, str | None]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', None). Also accepts 'B_PER'."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[1] in "-_":
        return tag[0], tag[2:]
    return "?", None


def check_tag(tag: str, scheme: str) -> str | None:
    """An error message for a tag the scheme does not allow, else None."""
    prefix, typ = split_tag(tag)
    if prefix == "O":
        return None
    if typ is None or prefix not in PREFIXES[scheme]:
        return f"tag '{tag}' is not valid in the {scheme.upper()} scheme (expected O or {'/'.join(PREFIXES[scheme])}-TYPE)"
    return None


def detect_scheme(sequences: list[list[str]]) -> str:
    """The scheme of a whole data set (pass train, dev and test together). BIO and IOB1 differ in how
    an entity that follows O starts: B- in BIO, I- in IOB1. Real BIO data has a few stray I- starts,
    so the majority decides, not the first stray tag; the minority are inconsistencies to report."""
    prefixes = {split_tag(t)[0] for seq in sequences for t in seq}
    if prefixes & {"L", "U"}:
        return "bilou"
    if "M" in prefixes:
        return "bmes"
    if prefixes & {"E", "S"}:
        return "bioes"
    b_starts = i_starts = 0
    for seq in sequences:
        prev_typ = None
        for t in seq:
            p, typ = split_tag(t)
            if typ != prev_typ and p == "B":
                b_starts += 1
            elif typ != prev_typ and p == "I":
                i_starts += 1
            prev_typ = typ
    return "iob1" if i_starts > b_starts else "bio"


def spans(tags: list[str], scheme: str = "bio") -> list[tuple[int, int, str]]:
    """Entity spans (start, end exclusive, type) of a tag sequence in any supported scheme."""
    out, start, typ = [], None, None
    bio = to_bio(tags, scheme) if scheme != "bio" else tags
    for i, t in enumerate([*bio, "O"]):
        p, ty = split_tag(t)
        if start is not None and (p != "I" or ty != typ):
            out.append((start, i, typ))
            start = None
        if p == "B" or (p == "I" and start is None):  # a stray I- (invalid BIO) opens an entity, as conlleval does
            start, typ = i, ty
    return out


def to_bio(tags: list[str], scheme: str) -> list[str]:
    if scheme == "bio":
        return list(tags)
    out, prev_type, prev_open = [], None, False
    for t in tags:
        p, typ = split_tag(t)
        if p == "O":
            out.append("O")
            prev_open = False
            continue
        if scheme == "iob1":
            begins = p == "B" or not prev_open or prev_type != typ
        else:  # bioes, bilou, bmes: B/S/U start an entity; I/M/E/L continue one
            begins = p in "BSU" or not prev_open or prev_type != typ
        out.append(("B-" if begins else "I-") + typ)
        ends = scheme != "iob1" and p in "ESLU"
        prev_type, prev_open = typ, not ends
    return out


def from_bio(tags: list[str], scheme: str) -> list[str]:
    if scheme == "bio":
        return list(tags)
    out = ["O"] * len(tags)
    for s, e, typ in spans(tags):
        if scheme == "iob1":
            after_same = s > 0 and out[s - 1] != "O" and split_tag(out[s - 1])[1] == typ
            out[s:e] = [f"I-{typ}"] * (e - s)
            if after_same:
                out[s] = f"B-{typ}"
            continue
        single, begin, inside, end = {"bioes": "SBIE", "bilou": "UBIL", "bmes": "SBME"}[scheme]
        if e - s == 1:
            out[s] = f"{single}-{typ}"
        else:
            out[s] = f"{begin}-{typ}"
            out[s + 1:e - 1] = [f"{inside}-{typ}"] * (e - s - 2)
            out[e - 1] = f"{end}-{typ}"
    return out


def bio_labels(types: set[str]) -> list[str]:
    """The internal label set: O, then B-/I- for every type (I- included even if never seen)."""
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]


def allowed_transitions(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(start_ok[L], trans_ok[L, L]) for BIO: I-X only after B-X or I-X, never first. Cached per label set:
    every decode asks again, and the double loop over a 160-tag set (ATIS) is 25k steps."""
    return _allowed_transitions(tuple(labels))


@functools.lru_cache(maxsize=16)
def _allowed_transitions(labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    parts = [split_tag(lab) for lab in labels]
    start_ok = np.array([p != "I" for p, _ in parts])
    trans = np.ones((n, n), dtype=bool)
    for j, (pj, tj) in enumerate(parts):
        if pj == "I":
            for i, (pi, ti) in enumerate(parts):
                trans[i, j] = pi in "BI" and ti == tj
    start_ok.flags.writeable = trans.flags.writeable = False  # shared by every caller through the cache
    return start_ok, trans


def count_invalid(tags: list[str]) -> bool:
    """True if a BIO sequence has an I- that does not continue an entity of its type."""
    prev = "O"
    for t in tags:
        p, typ = split_tag(t)
        if p == "I" and (split_tag(prev)[0] not in "BI" or split_tag(prev)[1] != typ):
            return True
        prev = t
    return False


def allowed(path: np.ndarray, start_ok: np.ndarray, trans_ok: np.ndarray) -> bool:
    """True if a label-index path obeys the constraints (count_invalid's test, on indices, without strings)."""
    return bool(len(path) == 0 or (start_ok[path[0]] and trans_ok[path[:-1], path[1:]].all()))


def viterbi(log_probs: np.ndarray, start_ok: np.ndarray, trans_ok: np.ndarray) -> list[int]:
    """Best label path under hard BIO constraints (word-level log-probabilities [n, L])."""
    n, L = log_probs.shape
    if n == 0:
        return []
    # the constraints only forbid (a transition scores 0 or -inf), so when the per-word argmax already obeys
    # them it is the best allowed path: exact, and most sentences of a trained tagger take this way (the
    # dynamic programme below was a third of a joint model's prediction time on ATIS)
    best = log_probs.argmax(-1)
    if allowed(best, start_ok, trans_ok):
        return best.tolist()
    neg = -1e9
    trans = np.where(trans_ok, 0.0, neg)
    score = np.where(start_ok, log_probs[0], neg)
    back = np.zeros((n, L), dtype=np.int64)
    for i in range(1, n):
        cand = score[:, None] + trans  # [from, to]
        back[i] = cand.argmax(0)
        score = cand.max(0) + log_probs[i]
    path = [int(score.argmax())]
    for i in range(n - 1, 0, -1):
        path.append(int(back[i, path[-1]]))
    return path[::-1]
