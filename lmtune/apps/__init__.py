"""Applications built only on lmtune's public API (lmtune.train, lmtune.load, Run.search / embed): each
lives in its own folder with an example config, and nothing in the core names them."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from lmtune.errors import InputError


def load_app_config(path: str | Path, cls: type, path_keys: tuple[str, ...], example: Path) -> Any:
    """An app's YAML as its config dataclass: unknown keys are errors, and the file paths among
    `path_keys` resolve against the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found. Start from {example}.")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a mapping of keys to values. Start from {example}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}.")
    cfg = cls(**raw)
    for key in path_keys:
        value = getattr(cfg, key)
        if value and not Path(value).is_absolute():
            setattr(cfg, key, str(path.parent / value))
    return cfg
