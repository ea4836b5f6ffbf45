"""The files of the labeling loop: the batch to label (CSV, JSONL, or Label Studio's tasks JSON with the model's
suggestions as pre-annotations and the labeling config XML it needs), and the labeled file that comes back (our
CSV / JSONL with the `label` column filled in, or a Label Studio export), read with each row's file:line."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from lmtune.errors import InputError
from lmtune.io import write_json, write_text

FORMATS = ("csv", "jsonl", "label-studio")
EXTENSIONS = {"csv": ".csv", "jsonl": ".jsonl", "label-studio": ".label-studio.json"}
# the batch file's columns, whatever the run's data columns are called: the import reads these names back
COLUMNS = ("rank", "line", "source", "text", "text_pair", "suggestion", "confidence", "score", "label")
FROM_NAME, TO_NAME = "label", "text"  # the labeling config's Choices and Text names, which results refer to


@dataclass
class Labeled:
    """One labeled row coming back: its text(s), its label(s), and where it was in the labeled file."""
    text: str
    labels: list[str]
    where: str  # "FILE: line N"
    text_pair: str | None = None


# ---- the batch -----------------------------------------------------------------------------------
def write_batch(rows: list[dict], path: Path, fmt: str, labels: list[str], exclusive: bool, separator: str,
                model_version: str) -> list[Path]:
    """Write the batch atomically; returns the files written (Label Studio: the tasks JSON and its config XML)."""
    if fmt == "jsonl":
        write_text(path, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows))
        return [path]
    if fmt == "csv":
        write_text(path, _csv(rows, separator))
        return [path]
    xml = labeling_config_path(path)
    write_json(path, label_studio_tasks(rows, model_version))
    write_text(xml, labeling_config(labels, exclusive, any(r.get("text_pair") is not None for r in rows)))
    return [path, xml]


def _clean(row: dict) -> dict:
    return {k: row[k] for k in COLUMNS if k in row and not (k == "text_pair" and row[k] is None)}


def _csv(rows: list[dict], separator: str) -> str:
    pairs = any(r.get("text_pair") is not None for r in rows)
    names = [c for c in COLUMNS if c != "text_pair" or pairs]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        s = r["suggestion"]
        w.writerow({**r, "suggestion": separator.join(s) if isinstance(s, list) else s,
                    "label": separator.join(r["label"]) if isinstance(r.get("label"), list) else r.get("label", "")})
    return buf.getvalue()


def labeling_config_path(tasks_json: Path) -> Path:
    return tasks_json.with_name(tasks_json.name.removesuffix(".json") + ".xml")


def label_studio_tasks(rows: list[dict], model_version: str) -> list[dict]:
    """Label Studio's import format: `data` (what the labeling config shows: $text) and `predictions`, the model's
    suggestion as a pre-annotation ("Label Studio docs: Import pre-annotated data")."""
    tasks = []
    for r in rows:
        data = {"text": r["text"], **({"text_pair": r["text_pair"]} if r.get("text_pair") is not None else {}),
                "line": r["line"], "source": r["source"], "rank": r["rank"], "score": r["score"]}
        choices = r["suggestion"] if isinstance(r["suggestion"], list) else [r["suggestion"]]
        tasks.append({"data": data, "predictions": [{
            "model_version": model_version, "score": r["confidence"],
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": choices}}]}]})
    return tasks


def labeling_config(labels: list[str], exclusive: bool, pairs: bool = False) -> str:
    """The labeling config the tasks need: their text, and one choice per label of the run."""
    choices = "\n".join(f"    <Choice value={quoteattr(lab)}/>" for lab in labels)
    pair = '  <Text name="text_pair" value="$text_pair"/>\n' if pairs else ""
    return (f'<View>\n  <Text name="{TO_NAME}" value="$text"/>\n{pair}'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="{"single" if exclusive else "multiple"}" '
            f'showInline="true">\n{choices}\n  </Choices>\n</View>\n')


# ---- the labeled file ---------------------------------------------------------------------------
def read_labeled(path: str | Path, known: list[str] | None, exclusive: bool, separator: str = ",") -> tuple[list[Labeled], int]:
    """(the labeled rows, how many rows had no label yet). A Label Studio export (a JSON array of tasks with
    annotations) or our batch file (CSV / TSV / JSONL with a filled-in `label` column). known: the labels
    allowed (None: any). Every bad row is an InputError naming FILE: line N."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file to import.")
    text = path.read_text(encoding="utf-8-sig")
    rows = _label_studio(path, text) if text.lstrip().startswith("[") else _ours(path, separator)
    out, skipped = [], 0
    for item in rows:
        if item is None:
            skipped += 1
            continue
        _check(item, known, exclusive)
        out.append(item)
    if not out:
        raise InputError(f"{path}: no labeled rows (of {skipped}): fill in the label column, or annotate the tasks "
                         "in Label Studio and export them as JSON.")
    return out, skipped


def _check(item: Labeled, known: list[str] | None, exclusive: bool) -> None:
    if exclusive and len(item.labels) != 1:
        raise InputError(f"{item.where}: {len(item.labels)} labels {item.labels}; this run takes exactly one label per text.")
    unknown = [lab for lab in item.labels if known is not None and lab not in known]
    if unknown:
        raise InputError(f"{item.where}: label {unknown[0]!r} is not one of the run's labels ({', '.join(known or [])}); "
                         "correct it (a new class needs training rows of its own: add them to the train file).")


def _ours(path: Path, separator: str) -> list[Labeled | None]:
    from lmtune.data.readers import read_rows, row_unit
    unit = row_unit(path)
    out: list[Labeled | None] = []
    for line, row in read_rows(path):
        where = f"{path}: {unit} {line}"
        if "text" not in row or "label" not in row:
            raise InputError(f"{where}: needs the columns 'text' and 'label' (the batch file's; columns are: "
                             f"{', '.join(map(repr, row))}).")
        text, raw = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: empty text; keep the batch file's text column as it was written.")
        labels = _cell_labels(raw, separator, where)
        pair = row.get("text_pair") or None
        out.append(None if labels is None else Labeled(text.strip(), labels, where, pair.strip() if isinstance(pair, str) else None))
    return out


def _cell_labels(raw: object, separator: str, where: str) -> list[str] | None:
    """A label cell: one label, labels joined by the separator, or a JSON list; None when not labeled yet."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, list):
        if not all(isinstance(x, str) and x.strip() for x in raw):
            raise InputError(f"{where}: 'label' must be a label name or a list of label names.")
        return [x.strip() for x in raw]
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise InputError(f"{where}: 'label' must be a label name or a list of label names, not {type(raw).__name__}.")
    return [x.strip() for x in str(raw).split(separator) if x.strip()]


def json_array_items(path: Path, text: str) -> list[tuple[int, object]]:
    """A JSON array's items, each with the line it starts on. The json module gives no positions; raw_decode
    reads one item at a given offset and says where it ended, which is what line numbers need."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    items: list[tuple[int, object]] = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise InputError(f"{path}: line {text.count(chr(10)) + 1}: the JSON array is not closed (a cut-off export?).")
        if text[i] == "]":
            return items
        line = text.count("\n", 0, i) + 1
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).") from None
        items.append((line, item))


def _label_studio(path: Path, text: str) -> list[Labeled | None]:
    """A Label Studio JSON export: each task's last submitted (not cancelled) annotation's choices
    (annotations[].result[].value.choices); a task nobody annotated is not labeled yet."""
    out: list[Labeled | None] = []
    for line, task in json_array_items(path, text):
        where = f"{path}: line {line}"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not data["text"].strip():
            raise InputError(f"{where}: a task without data.text; export the project as JSON from Label Studio "
                             "(the tasks this command wrote carry their text in data.text).")
        done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            out.append(None)
            continue
        results = done[-1].get("result")
        if not isinstance(results, list):
            raise InputError(f"{where}: annotation without a result list.")
        choices = [c for r in results if isinstance(r, dict) and r.get("type", "choices") == "choices"
                   for c in (r.get("value") or {}).get("choices", [])]
        if not all(isinstance(c, str) for c in choices):
            raise InputError(f"{where}: annotation choices must be label names.")
        pair = data.get("text_pair")
        out.append(Labeled(data["text"].strip(), [c.strip() for c in choices], where, pair if isinstance(pair, str) else None))
    return out
