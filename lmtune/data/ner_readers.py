"""Readers for token-labeled data: CoNLL columns, one character per line (Chinese), JSONL tokens+tags
and JSONL text+entity spans. Every sentence keeps its file:line; tags are converted to BIO."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmtune.data.hf_datasets import is_dataset_source
from lmtune.data.readers import jsonl_lines, parse_jsonl_line, read_rows, read_text_file
from lmtune.data.tagging import check_tag, detect_scheme, split_tag, to_bio
from lmtune.errors import InputError


@dataclass
class NerExample:
    tokens: list[str]
    tags: list[str] | None  # BIO; None when unlabeled
    source: str
    text: str | None = None  # the original text, when known (spans input, --text)
    offsets: list[tuple[int, int]] | None = None  # character span of each token in `text`
    # a teacher's soft targets (lmtune.distill): float32 [words, tags], each word's log-probabilities at the
    # distillation temperature; an array, not tuples: CoNLL's 200,000 words x 9 tags as Python floats cost ~50 MB
    soft_targets: Any = field(default=None, kw_only=True)

    labels_per_token = True  # tags follow words: edits must move them, whole-text rewrites cannot

    def audit_text(self) -> str:
        return " ".join(self.tokens)

    def audit_units(self) -> list[str]:
        """What the audit counts for balance: the entity types (tags are BIO inside)."""
        return [t[2:] for t in self.tags or [] if t.startswith("B-")]

    def audit_gold(self) -> str | None:
        return " ".join(self.tags or [])

    def edit_view(self, cjk: bool | None = None):
        from lmtune.robust.text import token_words
        return token_words(self.tokens, self.tags, cjk)

    def explain_view(self) -> tuple[tuple[str, ...], list[tuple[int, int, int]]]:
        """The example's own words (entity word indices match): in its text when known, else joined by spaces."""
        if self.text is not None and self.offsets is not None:
            return (self.text,), [(0, a, b) for a, b in self.offsets]
        spans, pos = [], 0
        for tok in self.tokens:
            spans.append((0, pos, pos + len(tok)))
            pos += len(tok) + 1
        return (" ".join(self.tokens),), spans

    def with_words(self, w) -> NerExample:
        return replace(self, tokens=list(w.words), tags=list(w.tags) if w.tags is not None else None, text=None, offsets=None)


_CJK = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]"
_WORD = re.compile(rf"{_CJK}|(?:(?!{_CJK})[^\W_])+|\S", re.UNICODE)


def split_words(text: str, cuts: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Character offsets of words: each CJK character alone, runs of letters/digits, single symbols.
    `cuts` forces extra boundaries (entity span edges that fall inside a run)."""
    out = []
    for m in _WORD.finditer(text):
        s, e = m.span()
        inner = sorted(c for c in cuts if s < c < e)
        for a, b in zip([s, *inner], [*inner, e]):
            out.append((a, b))
    return out


def example_from_text(text: str, source: str = "") -> NerExample:
    offsets = split_words(text)
    return NerExample([text[s:e] for s, e in offsets], None, source, text, offsets)


def detect_ner_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "conll"


def read_ner_raw(path: str | Path, fmt: str = "auto", tag_column: int = -1, encoding: str = "utf-8",
                 require_tags: bool = True) -> list[tuple]:
    """Sentences as read, tags still in the file's own scheme: (tokens, tags, source, text, offsets, tag_lines)."""
    if is_dataset_source(path):
        return _dataset(str(path))
    path = Path(path)
    fmt = detect_ner_format(path, fmt)
    text = read_text_file(path, encoding)
    if fmt == "conll":
        raw = _conll(path, text, tag_column)
    elif fmt == "jsonl":
        raw = _jsonl(path, text, require_tags)
    else:
        raise InputError(f"{path}: data.format '{fmt}' is not a token-labeling format; use conll or jsonl.")
    if not raw:
        raise InputError(f"{path}: no sentences found.")
    return raw


def _tag_where(path: Path, source: str, tag_lines: list[int] | None, i: int) -> str:
    return f"{path}: line {tag_lines[i]}" if tag_lines else source


def inconsistencies(tags: list[str], scheme: str) -> list[tuple[int, str]]:
    """Positions where a BIO or IOB1 sequence breaks its own scheme, with what is wrong: in BIO an I-
    that opens an entity (after O or another type); in IOB1 a B- that does not follow its own type."""
    out, prev = [], "O"
    for i, t in enumerate(tags):
        p, typ = split_tag(t)
        prev_typ = split_tag(prev)[1]
        if scheme == "bio" and p == "I" and prev_typ != typ:
            out.append((i, f"'{t}' opens an entity after '{prev}' (not valid BIO); read as B-{typ}, as seqeval's lenient mode does"))
        elif scheme == "iob1" and p == "B" and prev_typ != typ:
            out.append((i, f"'{t}' does not follow a {typ} entity (IOB1 uses B- only there); read as the start of an entity"))
        prev = t
    return out


def convert(path: str | Path, raw: list[tuple], scheme: str, require_tags: bool = True,
            known_types: set[str] | None = None) -> tuple[list[NerExample], list[str]]:
    """Sentences in BIO, and the inconsistent sequences found (file: line: what), repaired on the way.
    `known_types`: refuse entity types that never appear in training, at the line of the tag."""
    path = Path(path)
    examples, repairs = [], []
    for tokens, tags, source, txt, offs, tag_lines in raw:
        if tags is not None:
            tags = list(tags)
            for i, t in enumerate(tags):
                problem = check_tag(t, scheme)
                if problem:
                    raise InputError(f"{_tag_where(path, source, tag_lines, i)}: {problem}. Fix the tag or set data.tag_scheme.")
                typ = split_tag(t)[1]
                if known_types is not None and typ is not None and typ not in known_types:
                    raise InputError(f"{_tag_where(path, source, tag_lines, i)}: entity type '{typ}' (tag '{t}') never appears "
                                     f"in the training data (known types: {', '.join(sorted(known_types))}). "
                                     "Add examples of it to train, or relabel it.")
            for i, what in inconsistencies(tags, scheme):
                repairs.append(f"{_tag_where(path, source, tag_lines, i)}: {what}")
                if scheme == "bio":
                    tags[i] = "B-" + split_tag(tags[i])[1]
            tags = to_bio(tags, scheme)
        elif require_tags:
            raise InputError(f"{source}: no tags. Labeled data needs a tag for every token.")
        examples.append(NerExample(tokens, tags, source, txt, offs))
    return examples, repairs


def read_ner(path: str | Path, fmt: str = "auto", scheme: str = "auto", tag_column: int = -1,
             encoding: str = "utf-8", require_tags: bool = True) -> tuple[list[NerExample], str]:
    """One file's sentences with BIO tags, and the scheme (detected over this file when auto)."""
    raw = read_ner_raw(path, fmt, tag_column, encoding, require_tags)
    if scheme == "auto":
        scheme = detect_scheme([tags for _, tags, *_ in raw if tags is not None])
    return convert(path, raw, scheme, require_tags)[0], scheme


_CJK_CHAR = re.compile(rf"{_CJK}|[\u3000-\u303f\uff00-\uffef]")  # CJK, kana, hangul, CJK and full-width punctuation


def span_text(ex: NerExample, start: int, end: int) -> str:
    """The text of tokens [start, end): the original substring when the input was text; for token
    input (CoNLL, one character per line) the tokens joined as the language writes them: no space
    next to a CJK character (李 + 开 -> 李开), one space between other words."""
    if ex.offsets is not None and ex.text is not None:
        return ex.text[ex.offsets[start][0]:ex.offsets[end - 1][1]]
    out = ""
    for tok in ex.tokens[start:end]:
        if out and not (_CJK_CHAR.match(out[-1]) or _CJK_CHAR.match(tok[0])):
            out += " "
        out += tok
    return out


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _conll(path: Path, text: str, tag_column: int) -> list[tuple]:
    """Whitespace columns, token first and tag in `tag_column`; a blank line ends a sentence.
    One-column lines in a file whose other lines have tags are errors; a file with one column only
    is unlabeled. A one-character-per-line file (MSRA-style Chinese) is the same format."""
    sentences, tokens, tags, lines, start = [], [], [], [], None
    # lines as an editor numbers them: str.splitlines would also break at U+2028, U+0085, form feed ...,
    # and every error after such a character would name the wrong line
    for n, line in enumerate([*_LINE_BREAK.split(text), ""], 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if tokens:
                has_tags = any(t is not None for t in tags)
                if has_tags and None in tags:
                    bad = lines[tags.index(None)]
                    raise InputError(f"{path}: line {bad}: a token without a tag column. Every line needs 'token ... tag'.")
                sentences.append((tokens, tags if has_tags else None, f"{path}:{start}", None, None, lines))
            tokens, tags, lines, start = [], [], [], None
            continue
        start = start or n
        tokens.append(cols[0])
        if len(cols) > 1:
            try:
                tags.append(cols[tag_column])
            except IndexError:
                raise InputError(f"{path}: line {n}: no column {tag_column} (the line has {len(cols)}). "
                                 "Set data.tag_column.") from None
        else:
            tags.append(None)
        lines.append(n)
    return sentences


def _jsonl(path: Path, text: str, require_tags: bool) -> list[tuple]:
    out = []
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        out.append(_sentence(parse_jsonl_line(path, n, line), f"{path}: line {n}", require_tags))
    return out


def _dataset(path: str) -> list[tuple]:
    """A dataset's rows: tokens + tags (or the Hub's usual ner_tags, ClassLabel names), or text + entities."""
    out = []
    for n, obj in read_rows(path):
        if "tags" not in obj and "ner_tags" in obj:
            obj = {**obj, "tags": obj["ner_tags"]}
        out.append(_sentence(obj, f"{path}: row {n}", True))
    return out


def _sentence(obj: object, where: str, require_tags: bool) -> tuple:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with tokens+tags or text+entities.")
    if "tokens" in obj:
        tokens, tags = obj["tokens"], obj.get("tags")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise InputError(f"{where}: 'tokens' must be a non-empty list of non-empty strings.")
        if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)
                                 or not all(isinstance(t, str) for t in tags)):
            raise InputError(f"{where}: 'tags' must be a list as long as 'tokens' ({len(tokens)}), of tag names (strings).")
        return (tokens, tags, where, None, None, None)
    if "text" in obj:
        return _from_spans(obj, where, require_tags)
    raise InputError(f"{where}: expected keys 'tokens' (+ 'tags') or 'text' (+ 'entities').")


def _from_spans(obj: dict, where: str, require_tags: bool) -> tuple:
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: empty 'text'.")
    ents = obj.get("entities")
    if ents is None:
        offsets = split_words(text)
        return ([text[s:e] for s, e in offsets], None, where, text, offsets, None)
    if not isinstance(ents, list):
        raise InputError(f"{where}: 'entities' must be a list of {{start, end, label}} objects.")
    checked = []
    for k, ent in enumerate(ents):
        try:
            s, e, lab = int(ent["start"]), int(ent["end"]), str(ent["label"])
        except (KeyError, TypeError, ValueError, OverflowError):  # (OverflowError: a start of Infinity)
            raise InputError(f"{where}: entity {k + 1} needs integer 'start', 'end' and a 'label'.") from None
        if not 0 <= s < e <= len(text):
            raise InputError(f"{where}: entity {k + 1} ({s}-{e}) is out of range for a text of {len(text)} characters.")
        if not text[s:e].strip():
            raise InputError(f"{where}: entity {k + 1} ({s}-{e}) covers only whitespace.")
        checked.append((s, e, lab))
    checked.sort()
    for (s1, e1, _), (s2, e2, _) in zip(checked, checked[1:]):
        if s2 < e1:
            raise InputError(f"{where}: entities {s1}-{e1} and {s2}-{e2} overlap; nested entities are not supported.")
    offsets = split_words(text, {c for s, e, _ in checked for c in (s, e)})
    tags = ["O"] * len(offsets)
    for s, e, lab in checked:
        inside = [i for i, (a, b) in enumerate(offsets) if a >= s and b <= e]
        for j, i in enumerate(inside):
            tags[i] = ("B-" if j == 0 else "I-") + lab
    return ([text[s:e] for s, e in offsets], tags, where, text, offsets, None)
