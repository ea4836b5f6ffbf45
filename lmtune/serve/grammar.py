"""Stand-in for lmtune.structured.logits_processor, used by the OpenAI routes' `response_format` only when
lmtune.structured is not there (the structured-output module is written on another branch; at the merge
that module's function replaces this one, same signature).

xgrammar: a maintained grammar engine (vLLM, SGLang and TensorRT-LLM use it) with JSON Schema and regex
grammars, a transformers LogitsProcessor and CPU wheels that need no triton.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any


_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


@functools.lru_cache(maxsize=4)
def _compiler(tokenizer: Any):
    """One grammar compiler per tokenizer: the vocabulary is scanned once, and compiled grammars are cached."""
    import xgrammar as xgr
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))


def logits_processor(tokenizer: Any, *, schema: dict | None = None, regex: str | None = None,
                     choices: list[str] | None = None):
    """A fresh transformers LogitsProcessor (xgrammar's matchers are stateful: one per generate call) that
    lets the model write only text that follows `schema` (a JSON Schema), matches `regex`, or is one of
    `choices`; exactly one of them. A schema or pattern xgrammar cannot compile raises ValueError."""
    from xgrammar.contrib.hf import LogitsProcessor
    if sum(x is not None for x in (schema, regex, choices)) != 1:
        raise ValueError("give exactly one of schema, regex or choices")
    compiler = _compiler(tokenizer)
    try:
        if schema is not None:
            # compact JSON (no free whitespace between tokens): a weak model cannot spend its tokens on blanks
            grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        elif regex is not None:
            grammar = compiler.compile_regex(regex)
        else:
            grammar = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    except RuntimeError as e:  # xgrammar's message starts with a time stamp and its C++ source line: not the caller's
        raise ValueError(_XGRAMMAR_PREFIX.sub("", str(e)).strip()) from None
    return LogitsProcessor(grammar)
