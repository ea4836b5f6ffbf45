"""Structured output: decoding constrained to a JSON Schema, a regular expression or a fixed set of
strings, so that a program parsing the output always can (`generate.schema`, `generate.regex`,
`generate.choices`; `generate.label_set` is choices too).

Why xgrammar: it is maintained, and it is the structured-output engine of vLLM, SGLang and
TensorRT-LLM; it compiles JSON Schema, regular expressions and EBNF (choices are an alternation of
string literals) into grammars over the tokenizer's whole vocabulary, so every tokenization of a valid
output stays allowed, not only the canonical one a token trie would allow; it applies them with one
stateful matcher per sequence and a token bitmask, from a transformers LogitsProcessor; and it ships
CPU wheels that need no triton. outlines does the same with a much heavier stack (its own model
wrappers and dependencies), lm-format-enforcer is slower per token and less maintained.

The one entry point for callers outside lmtune's generation loop (the OpenAI-compatible server's
`response_format`) is `logits_processor(tokenizer, schema=... | regex=... | choices=...)`: a fresh
processor for one `model.generate` call (matchers are stateful: one per row of that call).
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

from lmtune.errors import InputError

# How a schema-constrained output lays out its whitespace: the JSON a model was tuned on was most
# likely written by json.dumps, so the grammar allows exactly that layout (a free layout lets a weak
# model spend its token budget on whitespace, the "endless whitespace" failure known from vLLM).
# The task picks the layout its training targets use (json_layout); "free" when none matches.
JSON_LAYOUTS: dict[str, dict] = {"spaced": {"indent": None, "separators": (", ", ": ")},  # json.dumps' default
                                 "compact": {"indent": None, "separators": (",", ":")},
                                 "indent2": {"indent": 2, "separators": (",", ": ")},
                                 "indent4": {"indent": 4, "separators": (",", ": ")}}
FREE_LAYOUT = "free"
MAX_WHITESPACE = 16  # "free": whitespace characters allowed between two JSON tokens (a newline and deep indentation)
CACHE_BYTES = 64 * 2**20  # compiled grammars kept per tokenizer (a server's per-request schemas stay bounded)


@dataclass(frozen=True)
class Constraint:
    """What the whole output must be: valid JSON under `schema`, a full match of `regex`, or one of
    `choices` (exactly one of the three is set)."""
    schema: dict | bool | None = None
    regex: str | None = None
    choices: tuple[str, ...] = ()
    json_layout: str = "spaced"

    @classmethod
    def of(cls, *, schema: dict | bool | None = None, regex: str | None = None, choices: list[str] | tuple[str, ...] | None = None,
           json_layout: str = "spaced", where: str = "constraint") -> Constraint:
        """A checked constraint: exactly one kind, a schema that is one and that xgrammar can compile, a
        regex both xgrammar and Python read, non-empty distinct choices. Anything else is an InputError
        naming `where` (a config key, a request field)."""
        given = [name for name, v in (("schema", schema), ("regex", regex), ("choices", choices)) if v is not None]
        if len(given) != 1:
            raise InputError(f"{where}: give exactly one of schema, regex, choices (got {', '.join(given) or 'none'}).")
        if json_layout not in (*JSON_LAYOUTS, FREE_LAYOUT):
            raise InputError(f"{where}: json_layout must be one of {', '.join((*JSON_LAYOUTS, FREE_LAYOUT))}, got {json_layout!r}.")
        if choices is not None:
            return cls(choices=check_choices(choices, where), json_layout=json_layout)
        if regex is not None:
            check_regex(regex, where)
            return cls(regex=regex, json_layout=json_layout)
        check_schema(schema, where)
        return cls(schema=schema, json_layout=json_layout)

    @property
    def kind(self) -> str:
        return "schema" if self.schema is not None else "regex" if self.regex is not None else "choices"

    def processor(self, tokenizer: Any) -> GrammarProcessor:
        """A fresh logits processor for one generate() call (its matchers follow that call's rows)."""
        return GrammarProcessor(compiled_grammar(tokenizer, self))

    def is_valid(self, text: str) -> bool:
        """Whether an output meets the constraint: parses and validates (jsonschema-rs), fully matches
        the regex (Python's re), or is one of the choices."""
        if self.kind == "choices":
            return text.strip() in {c.strip() for c in self.choices}
        if self.kind == "regex":
            return re.fullmatch(self.regex, text) is not None
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return _validator(json.dumps(self.schema, sort_keys=True)).is_valid(value)

    def valid_share(self, texts: list[str]) -> float:
        return sum(self.is_valid(t) for t in texts) / len(texts) if texts else 0.0

    def _compile(self, compiler: Any) -> Any:
        if self.kind == "schema":
            return compiler.compile_json_schema(json.dumps(self.schema), strict_mode=True, **_layout_args(self.json_layout))
        if self.kind == "regex":
            return compiler.compile_regex(self.regex)
        return compiler.compile_grammar(choices_ebnf(self.choices))


def logits_processor(tokenizer: Any, *, schema: dict | bool | None = None, regex: str | None = None,
                     choices: list[str] | None = None, json_layout: str = "spaced") -> GrammarProcessor:
    """A transformers LogitsProcessor that keeps one `model.generate` call's outputs valid: JSON under
    `schema` (laid out as json_layout says: json.dumps' default by default), a full match of `regex`, or
    one of `choices`; exactly one of them. Fresh per call (one stateful matcher per row); the grammar
    is compiled once per tokenizer and constraint. A bad constraint is an InputError."""
    return Constraint.of(schema=schema, regex=regex, choices=choices, json_layout=json_layout).processor(tokenizer)


class GrammarProcessor(LogitsProcessor):
    """One xgrammar matcher per row of a batch: at each step it takes the row's last token, and every
    token the grammar does not allow next gets -inf. Once the grammar is complete only the end of text
    is allowed. A row that another criterion ended (a stop string, a client that left) is padded by
    generate(): its matcher refuses the padding and the row is left alone from then on. Logit columns
    past the tokenizer's vocabulary (a model's padded embedding) are never allowed."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.vocab = compiled.tokenizer_info.vocab_size
        self.matchers: list | None = None
        self.released: list[bool] = []
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import xgrammar as xgr
        if self.matchers is None:  # the first step: nothing generated yet
            self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(input_ids.shape[0])]
            self.released = [False] * len(self.matchers)
            self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), self.vocab)
        else:
            last = input_ids[:, -1].tolist()
            for r, m in enumerate(self.matchers):
                if not (self.released[r] or m.is_terminated()) and not m.accept_token(last[r]):
                    self.released[r] = True
        rows = [r for r, m in enumerate(self.matchers) if not (self.released[r] or m.is_terminated())]
        if not rows:
            return scores
        for r in rows:
            self.matchers[r].fill_next_token_bitmask(self.bitmask, r)
        width = min(self.vocab, scores.shape[-1])
        on_cpu = scores.device.type == "cpu"
        # masked on the CPU (xgrammar's C++ kernel): its GPU paths need triton or a compiled CUDA kernel,
        # and one [rows, vocab] copy per step costs little next to a forward pass
        target = scores if on_cpu else scores.cpu()
        xgr.apply_token_bitmask_inplace(target, self.bitmask, vocab_size=width, indices=rows)
        if not on_cpu:
            scores = target.to(scores.device)
        if scores.shape[-1] > self.vocab:
            scores[rows, self.vocab:] = float("-inf")
        return scores


# ---- checks --------------------------------------------------------------------------------------
def check_choices(choices: Any, where: str) -> tuple[str, ...]:
    if not isinstance(choices, (list, tuple)) or not choices:
        raise InputError(f"{where}: choices must be a non-empty list of strings.")
    bad = [c for c in choices if not isinstance(c, str) or not c.strip()]
    if bad:
        raise InputError(f"{where}: every choice must be a non-empty string, got {bad[0]!r}.")
    seen = [c for i, c in enumerate(choices) if c in choices[:i]]
    if seen:
        raise InputError(f"{where}: {seen[0]!r} is listed twice; give each choice once.")
    return tuple(choices)


def check_regex(regex: Any, where: str) -> None:
    """A pattern both sides read: xgrammar enforces it, Python's re checks outputs against it."""
    if not isinstance(regex, str) or not regex:
        raise InputError(f"{where}: regex must be a non-empty string.")
    try:
        re.compile(regex)
    except re.error as e:
        raise InputError(f"{where}: not a valid regular expression ({e}).") from None
    import xgrammar as xgr
    try:
        xgr.Grammar.from_regex(regex)
    except RuntimeError as e:
        raise InputError(f"{where}: xgrammar cannot enforce this regular expression ({_xgrammar_message(e)}); "
                         "rewrite it without that construct.") from None


def check_schema(schema: Any, where: str, enforced: bool = True) -> None:
    """A JSON Schema (jsonschema-rs' meta-schema check) that xgrammar can compile into a grammar when it
    is `enforced`. Keywords xgrammar does not enforce (format, not, if/then) still count when outputs
    are validated."""
    import jsonschema_rs
    import xgrammar as xgr
    if not isinstance(schema, (dict, bool)):
        raise InputError(f"{where}: a JSON Schema is an object (or true/false), got {type(schema).__name__}; give one such "
                         'as {"type": "object", "properties": {...}}.')
    try:
        jsonschema_rs.validator_for(schema)
    except (ValueError, jsonschema_rs.ValidationError) as e:
        raise InputError(f"{where}: not a valid JSON Schema ({str(e).splitlines()[0]}); fix that keyword.") from None
    if not enforced:
        return
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), strict_mode=True)
    except RuntimeError as e:
        raise InputError(f"{where}: xgrammar cannot turn this schema into a grammar ({_xgrammar_message(e)}); remove or "
                         "rewrite that part.") from None


def read_schema(path: str, key: str, enforced: bool = True) -> dict | bool:
    """The JSON Schema in the file that config key `key` names; an unreadable file, bad JSON, an invalid
    schema or (`enforced`) one xgrammar cannot compile is an InputError naming the file (and the line,
    for JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the JSON Schema file of {key} ({e.strerror}).") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; {key} needs a JSON Schema file.") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); {key} needs a JSON Schema file.") from None
    check_schema(schema, path, enforced)
    return schema


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's error without its '[time] file.cc:line:' prefix."""
    line = next((s for s in str(e).splitlines() if s.strip()), str(e))
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line).strip()


# ---- grammars ------------------------------------------------------------------------------------
def choices_ebnf(choices: tuple[str, ...]) -> str:
    """An EBNF alternation of the choices as string literals (JSON escapes are xgrammar's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _layout_args(layout: str) -> dict:
    if layout == FREE_LAYOUT:
        return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE}
    return {"any_whitespace": False, **JSON_LAYOUTS[layout]}


def json_layout(texts: list[str]) -> str:
    """The layout (JSON_LAYOUTS) that json.dumps reproduces the most of `texts` with, exactly; "free"
    when it reproduces none (hand-written JSON, or no JSON at all)."""
    counts = dict.fromkeys(JSON_LAYOUTS, 0)
    for t in texts:
        try:
            value = json.loads(t)
        except ValueError:
            continue
        for name, args in JSON_LAYOUTS.items():
            if t.strip() in (json.dumps(value, **args), json.dumps(value, ensure_ascii=False, **args)):
                counts[name] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else FREE_LAYOUT


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its xgrammar GrammarCompiler
_LOCK = threading.Lock()  # a server compiles from its worker threads


def compiled_grammar(tokenizer: Any, constraint: Constraint) -> Any:
    """The constraint compiled against the tokenizer's vocabulary: the tokenizer's info is read once,
    and the compiler's own cache (bounded) keeps each grammar compiled once."""
    import xgrammar as xgr
    with _LOCK:  # only while the compiler is made: a slow grammar must not hold up every other compile
        compiler = _COMPILERS.get(tokenizer)
        if compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=_stop_ids(tokenizer))
            compiler = _COMPILERS[tokenizer] = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
    return constraint._compile(compiler)  # GrammarCompiler is thread-safe (xgrammar's docs)


def _stop_ids(tokenizer: Any) -> list[int] | None:
    """The end of text lmtune's generation stops at (generate_outputs' eos_token_id)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None


_VALIDATORS: dict[str, Any] = {}


def _validator(schema_json: str) -> Any:
    import jsonschema_rs
    if schema_json not in _VALIDATORS:
        if len(_VALIDATORS) > 64:
            _VALIDATORS.clear()
        _VALIDATORS[schema_json] = jsonschema_rs.validator_for(json.loads(schema_json))
    return _VALIDATORS[schema_json]
