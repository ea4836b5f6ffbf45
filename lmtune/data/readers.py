"""Readers for labeled text files (CSV, TSV, JSONL).

Every example remembers the file and line it came from, so every later error (an unseen label,
an empty text) can point the user at the exact row to fix.
"""
from __future__ import annotations

import csv
import io
import json
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmtune.data.hf_datasets import dataset_rows, is_dataset_source
from lmtune.errors import InputError


PAIR_MARK = "\u241e"  # the separator word between a pair's two texts in an edit view (never edited or moved)


@dataclass
class Example:
    text: str
    label: str | None
    source: str  # "file:line"
    text_pair: str | None = None
    # a teacher's soft targets over the labels at the distillation temperature (lmtune.distill; classification:
    # log-probabilities), which a task with the distill capability trains towards; keyword-only, so the
    # subclasses' positional fields keep their places
    soft_targets: tuple[float, ...] | None = field(default=None, kw_only=True)

    # What data tools see of an example (audit, label-noise search, attacks, augmentation): each kind
    # of example declares it, so those tools never ask which kind they hold.
    labels_per_token = False  # one label for the whole text (a rewrite of the text keeps it)

    def audit_text(self) -> str:
        return self.text + (f" [SEP] {self.text_pair}" if self.text_pair else "")

    def audit_units(self) -> list[str]:
        """What the audit counts for balance: the class."""
        return [self.label] if self.label is not None else []

    def audit_gold(self) -> str | None:
        return self.label

    def edit_view(self, cjk: bool | None = None):
        """The words attacks and augmentation may edit: of the text, and of the pair's second text after a
        protected separator word, so either text can change and the two come apart again."""
        from lmtune.robust.text import Words, text_words
        w = text_words(self.text, cjk)
        if self.text_pair is None:
            return w
        p = text_words(self.text_pair, cjk)
        return Words(w.words + [PAIR_MARK] + p.words, w.protected + [True] + p.protected, w.joiner)

    def explain_view(self) -> tuple[tuple[str, ...], list[tuple[int, int, int]]]:
        """What an explanation colours: the texts (a pair's two) and their words as (text index, start, end)."""
        from lmtune.robust.text import word_spans
        texts = (self.text,) if self.text_pair is None else (self.text, self.text_pair)
        return texts, [(s, a, b) for s, t in enumerate(texts) for a, b in word_spans(t)]

    def with_words(self, w) -> Example:
        if self.text_pair is None:
            return replace(self, text=w.joiner.join(w.words))
        cut = w.words.index(PAIR_MARK)
        return replace(self, text=w.joiner.join(w.words[:cut]), text_pair=w.joiner.join(w.words[cut + 1:]))


# Delimited text by format name. data.format offers csv and tsv; semicolon and pipe tables are only
# recognised by detection (.txt and unknown extensions).
DELIMITERS = {"csv": ",", "tsv": "\t", "semicolon": ";", "pipe": "|"}
_DELIMITER_WORDS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
SNIFF_CHARS = 64 * 1024  # the first lines detection looks at
_SNIFF_ROWS = 50


def detect_format(path: Path, fmt: str = "auto", text: str | None = None) -> str:
    """The format of a data file: data.format when set, else by extension; .txt and unknown extensions
    (public data sets ship TSV and JSONL as .txt) by their first lines (`text`, or the head of the file)."""
    if fmt != "auto":
        return fmt
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext in (".tsv", ".tab"):
        return "tsv"
    if ext == ".csv":
        return "csv"
    return sniff_format(text if text is not None else _head(path))


def _head(path: Path) -> str:
    """The first SNIFF_CHARS characters of a file, for detection only (decoding errors are reported by
    read_text_file when the file is read); '' when there is no such file (read_text_file says so)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SNIFF_CHARS)
    except OSError:
        return ""
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff")


def sniff_format(text: str) -> str:
    """jsonl when the first non-blank line is a JSON object, else the table format of sniff_delimiter."""
    first = next((line for line in text[:SNIFF_CHARS].split("\n") if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    return next(name for name, d in DELIMITERS.items() if d == sniff_delimiter(text))


def sniff_delimiter(text: str) -> str:
    """The delimiter of a table from its first rows: of comma, tab, semicolon and pipe, the one that splits
    the header into at least two columns and gives the most of the following rows the header's width
    (comma first on a tie, comma when none splits the header). Unlike csv.Sniffer's character-frequency
    guess, this reads the rows the way the reader will (quotes, CRLF, quoted line breaks), so a TSV whose
    texts are full of commas is still a TSV."""
    sample = text[:SNIFF_CHARS]
    if len(text) > SNIFF_CHARS and "\n" in sample:
        sample = sample[:sample.rindex("\n")]  # no half line at the cut
    best, best_share = ",", -1.0
    for delimiter in DELIMITERS.values():
        try:
            rows = [r for r in csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter)
                    if any(v.strip() for v in r)][:_SNIFF_ROWS]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        share = sum(len(r) == len(rows[0]) for r in rows[1:]) / (len(rows) - 1) if len(rows) > 1 else 1.0
        if share > best_share:
            best, best_share = delimiter, share
    return best


def read_text_file(path: str | Path, encoding: str = "utf-8") -> str:
    """Whole file as text; undecodable bytes are reported with their line number."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        raise InputError(f"{path}: {what}. Check the path (relative paths in a config file "
                         "resolve against the config file's folder).")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not valid {encoding}. "
                         f"Re-save the file as {encoding}, or set data.encoding to its real "
                         "encoding (e.g. latin-1).") from None
    except LookupError:
        raise InputError(f"data.encoding: unknown encoding '{encoding}'.") from None
    return text.removeprefix("\ufeff")


# control, format (zero-width, bidi marks), separators: characters that show nothing
_INVISIBLE = ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")


def is_invisible(text: str) -> bool:
    """True if no character of the text would show: empty, NUL, zero-width or whitespace only."""
    return all(unicodedata.category(c) in _INVISIBLE for c in text)


def cell_text(value: object, col: str, where: str, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{where}: empty value in column '{col}'. Fill it in or remove the row.")
        return None
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: column '{col}' holds a {type(value).__name__}, expected text.")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # JSON 1 and 1.0 are the same number, so the same class
    return str(value).strip() if isinstance(value, str) else str(value)


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, (int, float)) else "string" if isinstance(value, str) else type(value).__name__


def _check_label_types(path: Path, rows: list[tuple[int, dict]], label_column: str | None) -> None:
    """One typed label space per file: numbers and strings are not mixed (is "1" the class 1?)."""
    first: dict[str, tuple[int, object]] = {}
    for line, row in rows:
        value = row.get(label_column) if label_column else None
        if value is None:
            continue
        kind = _json_kind(value)
        first.setdefault(kind, (line, value))
        if len(first) > 1:
            (k0, (l0, v0)), (k1, (l1, v1)) = sorted(first.items(), key=lambda kv: kv[1][0])[:2]
            raise InputError(f"{path}: line {l1}: label {json.dumps(v1)} is a {k1}, but line {l0} has the {k0} {json.dumps(v0)}. "
                             f"Write every label of '{label_column}' as one type (all numbers or all strings).")


def row_unit(path: str | Path) -> str:
    """What a row number counts in error messages: lines of a text file, rows of a dataset."""
    return "row" if is_dataset_source(path) else "line"


def read_rows(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> list[tuple[int, dict]]:
    """A data file's rows as (line, {column: value}), with the same checks as read_examples (for
    tasks whose labels are not one string per row). Datasets (parquet, arrow, saved, hub) give
    (row, {column: value}) with ClassLabel values as names."""
    if is_dataset_source(path):
        return dataset_rows(path)
    rows, _ = _file_rows(Path(path), fmt, encoding)
    if not rows:
        raise InputError(f"{path}: no data rows found. The file needs a header and at least one row.")
    return rows


def column_values(examples: list, column: str, key: str, fmt: str = "auto", encoding: str = "utf-8",
                  missing: str | None = None) -> list[str]:
    """Another column's value for each example, read from the example's source file (its row number is
    in ex.source): data.group_column, data.slice_columns. A row without it is an error naming `key`,
    or gets `missing` when given."""
    rows: dict[str, dict] = {}
    out = []
    for ex in examples:
        path, _, line = ex.source.rpartition(":")
        if path not in rows:
            rows[path] = {str(n): r for n, r in read_rows(path, fmt, encoding)}
        row = rows[path].get(line, {})
        if column not in row or row[column] is None or str(row[column]).strip() == "":
            if missing is None or column not in row:
                cols = ", ".join(map(repr, row)) or "none"
                raise InputError(f"{ex.source}: no value in column '{column}' ({key}; columns are: {cols}). "
                                 f"Fill it in or change {key}.")
            out.append(missing)
        else:
            out.append(str(row[column]))
    return out


def read_examples(path: str | Path, text_column: str = "text", label_column: str | None = "label",
                  text_pair_column: str | None = None, fmt: str = "auto", encoding: str = "utf-8",
                  require_label: bool = True) -> list[Example]:
    """Read one file (or dataset). `require_label=False` allows unlabeled input (prediction)."""
    unit = row_unit(path)
    if unit == "row":
        rows = read_rows(path)
    else:
        path = Path(path)
        rows, fmt = _file_rows(path, fmt, encoding)
        if fmt == "jsonl":
            _check_label_types(path, rows, label_column)
    wanted = [c for c in (text_column, text_pair_column) if c] + ([label_column] if require_label and label_column else [])
    examples = []
    for line, row in rows:
        where = f"{path}: {unit} {line}"
        for col in wanted:
            if col not in row:
                cols = ", ".join(map(repr, row)) or "none"
                key = {text_column: "data.text_column", text_pair_column: "data.text_pair_column"}.get(col, "data.label_column")
                raise InputError(f"{where}: no column '{col}' (columns are: {cols}). "
                                 f"Rename the column or set {key}.")
        has_label = label_column is not None and label_column in row
        for col in (text_column, text_pair_column):
            if col and isinstance(row.get(col), str) and row[col].strip() and is_invisible(row[col]):
                raise InputError(f"{where}: the text in column '{col}' is only invisible characters (NUL, zero-width, "
                                 "control). Remove the row or fix its text.")
        examples.append(Example(
            text=cell_text(row[text_column], text_column, where, True),
            text_pair=cell_text(row[text_pair_column], text_pair_column, where, True) if text_pair_column else None,
            label=cell_text(row[label_column], label_column, where, require_label) if has_label else None,
            source=f"{path}:{line}",
        ))
    if not examples:
        raise InputError(f"{path}: no data rows found. The file needs a header and at least one row.")
    return examples


def _file_rows(path: Path, fmt: str, encoding: str) -> tuple[list[tuple[int, dict]], str]:
    """A text file's rows and the format they were read in (data.format, the extension, or detection)."""
    text = read_text_file(path, encoding)
    fmt = detect_format(path, fmt, text)
    if fmt == "jsonl":
        return _jsonl_rows(path, text), fmt
    return _table_rows(path, text, DELIMITERS.get(fmt, ",")), fmt  # (conll outside NER: read as before, as CSV)


def _width_hint(delimiter: str) -> str:
    """What a row of the wrong width says: the delimiter it was read with, and the data.format that reads
    the other common one (a TSV read as CSV shows up as exactly this error)."""
    word = _DELIMITER_WORDS[delimiter]
    other = "data.format: csv if the file is comma-separated" if delimiter == "\t" else \
        "data.format: tsv if the file is tab-separated" if delimiter == "," else \
        "data.format: csv or tsv if the file is comma- or tab-separated"
    return f"read as {word}-separated; set {other}, or quote texts that contain a {word}"


def _table_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}: the file is empty. It needs a header row and data rows.") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise InputError(f"{path}: line 1: the header row is empty. The first line must name the columns "
                         "(e.g. text,label).")
    seen = set()
    for h in header:
        if h in seen:
            raise InputError(f"{path}: line 1: the column name '{h}' appears more than once in the header; "
                             "rename one of them (only one column can be the text or the label).")
        seen.add(h)
    rows, last = [], reader.line_num
    try:
        for values in reader:
            start, last = last + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise InputError(f"{path}: line {start}: {len(values)} fields but the header has "
                                 f"{len(header)} ({_width_hint(delimiter)}).")
            rows.append((start, dict(zip(header, values))))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: malformed row ({e}).") from None
    return rows


def jsonl_lines(text: str) -> list[str]:
    """JSONL lines: split on \\n only (str.splitlines would also split on U+2028, U+0085 ..., which
    are valid inside a JSON string)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _unique_keys(path: Path, line: int):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        obj: dict = {}
        for k, v in pairs:
            if k in obj:
                raise InputError(f"{path}: line {line}: the key '{k}' appears more than once in one object; keep one.")
            obj[k] = v
        return obj
    return hook


def parse_jsonl_line(path: Path, i: int, line: str) -> object:
    try:
        return json.loads(line, object_pairs_hook=_unique_keys(path, i))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {i}: not valid JSON ({e.msg} at column {e.colno}). "
                         "Each line must be one JSON object.") from None


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        obj = parse_jsonl_line(path, i, line)
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {i}: expected a JSON object like {{\"text\": ..., \"label\": ...}}.")
        rows.append((i, obj))
    return rows
