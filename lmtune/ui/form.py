"""The training page's form and its YAML view, kept in sync on the server: the YAML text is the one
source of truth (it is what a job is started with), and the form is a view of some of its keys.

form -> YAML: merge_values sets the changed keys in the YAML mapping (the other keys, those typed in the
Advanced view, stay). YAML -> form: form_values reads the form's keys back, after the whole config has
been checked by build_config, so the form changes only when the YAML is a valid config.
PyYAML on the server rather than a YAML library in the browser: one parser for the page and the job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmtune.errors import InputError
from lmtune.ui.confine import Confinement

# The config keys the form has controls for (dotted, as in `lmtune config`); every other key is for the YAML.
FORM_KEYS = ("task", "run_name", "model.name", "data.train", "data.dev", "data.test", "data.text_column",
             "data.text_pair_column", "data.label_column", "data.max_length", "train.lr", "train.epochs",
             "train.batch_size", "train.seed", "train.patience", "train.calibrate", "peft.method")
DATA_FILE_KEYS = ("data.train", "data.dev", "data.test")
Value = str | int | float | bool | None


def load_mapping(text: str) -> dict:
    """The YAML text as a mapping ({} for an empty text); InputError when it is not one."""
    from lmtune.ui.jobs import _mapping
    return _mapping(text) if text.strip() else {}


def merge_values(text: str, values: dict[str, Value], confine: Confinement) -> str:
    """`text` with the form's `values` set (None or "" removes a key, and a section left empty).

    Data files picked in the form are relative to the working directory; they are written as absolute
    paths, because a job resolves relative data paths against its own config's folder (and, confined,
    a path outside the allowed folders is refused here already)."""
    cfg = load_mapping(text)
    for key, value in values.items():
        if key not in FORM_KEYS:
            raise InputError(f"{key}: not a key of the training form ({', '.join(FORM_KEYS)}).")
        if key in DATA_FILE_KEYS and isinstance(value, str) and value.strip() and not value.startswith(("hub:", "memory:")):
            value = str(confine.path(value.strip(), key))
        _set(cfg, key.split("."), value)
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _set(cfg: dict, parts: list[str], value: Value) -> None:
    *sections, leaf = parts
    node = cfg
    for s in sections:
        child = node.setdefault(s, {})
        if child is None:  # "train:" with nothing under it
            child = node[s] = {}
        if not isinstance(child, dict):
            raise InputError(f"{s}: is not a section (a mapping) in the YAML; fix it in the Advanced view.")
        node = child
    if value is None or value == "":
        node.pop(leaf, None)
        if sections and not node:  # no empty "peft: {}" left behind
            _drop_empty(cfg, sections)
    else:
        node[leaf] = value


def _drop_empty(cfg: dict, sections: list[str]) -> None:
    parent = cfg
    for s in sections[:-1]:
        parent = parent[s]
    parent.pop(sections[-1], None)


def form_values(text: str, workdir: Path) -> dict[str, Any]:
    """The form's keys as the YAML gives them, else their defaults; InputError unless the YAML is a valid
    config. Data files inside the working directory come back relative to it (as the file pickers list them)."""
    from lmtune.ui.jobs import _built
    cfg = load_mapping(text)
    built = _built(cfg, workdir)  # every key checked: unknown keys, types, ranges, choices
    out: dict[str, Any] = {}
    for key in FORM_KEYS:
        section, _, leaf = key.rpartition(".")
        raw = cfg.get(section, {}) if section else cfg
        if isinstance(raw, dict) and leaf in raw:
            value = raw[leaf]
        else:
            value = getattr(getattr(built, section) if section else built, leaf)
        if key in DATA_FILE_KEYS and isinstance(value, str) and value:
            value = _relative(value, workdir)
        out[key] = value
    return out


def _relative(path: str, workdir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(workdir))
    except (ValueError, OSError):
        return path


def file_columns(path: Path) -> dict[str, Any]:
    """A data file's column names (a CoNLL file has none: tokens and tags), and lmtune init's guesses for the
    form's keys (task, columns, model, max_length, epochs ...) when it can make them."""
    from lmtune.data.readers import read_rows
    columns: list[str] = []
    if path.suffix.lower() not in (".conll", ".bio", ".iob"):  # as lmtune init tells them apart
        columns = list(dict.fromkeys(k for _, r in read_rows(path)[:200] for k in r))
    guess: dict[str, Any] = {}
    # what `lmtune init FILE` writes: the task, the columns, a backbone for the language, max_length from the lengths
    try:
        from lmtune.scaffold import inspect, render
        init = yaml.safe_load(render(inspect(path)))
    except InputError:  # no label column to guess: the person picks one
        return {"columns": columns, "guess": guess}
    for key in FORM_KEYS:
        section, _, leaf = key.rpartition(".")
        node = init.get(section, {}) if section else init
        if key not in DATA_FILE_KEYS and isinstance(node, dict) and leaf in node:
            guess[key] = node[leaf]
    return {"columns": columns, "guess": guess}
