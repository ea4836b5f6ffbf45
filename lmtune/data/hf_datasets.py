"""Rows from Hugging Face `datasets`: parquet and arrow files, folders written by `save_to_disk`,
datasets on the Hub (data.hub) and Dataset objects handed to the Python API.

A source is named by a string, as a file is, so configs, errors and splits.json stay plain text:
- `train.parquet`, `train.arrow`, a saved-dataset folder: by path;
- `hub:NAME:CONFIG:SPLIT`: written by the config for data.hub (datasets.load_dataset, the real
  loading code; it needs the Hub or a populated HF_DATASETS_CACHE);
- `memory:KEY`: a Dataset object passed to lmtune.train(..., data=...), held for this process only.
ClassLabel columns (and lists of them, as NER tags) come back as their names, never as numbers.
Rows are numbered from 1 as `row N`, which is what error messages name.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_MEMORY: dict[str, Any] = {}
_keys = itertools.count(1)


def is_dataset_source(path: str | Path) -> bool:
    s = str(path)
    if s.startswith(("hub:", "memory:")):
        return True
    p = Path(s)
    return p.suffix.lower() in FILE_FORMATS or (p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS))


def hold(dataset: Any, split: str) -> str:
    """Keep a Dataset object for this process; its source string goes into the config."""
    import datasets
    if not isinstance(dataset, datasets.Dataset):
        raise InputError(f"data {split}: expected a datasets.Dataset, got {type(dataset).__name__}.")
    key = f"memory:{split}-{next(_keys)}"
    _MEMORY[key] = dataset
    return key


def hub_source(name: str, config: str | None, split: str) -> str:
    return f"hub:{name}:{config or ''}:{split}"


def load(source: str | Path):
    """The Dataset a source names."""
    import datasets
    s = str(source)
    if s.startswith("memory:"):
        if s not in _MEMORY:
            raise InputError(f"{s}: a dataset object from another process; pass the Dataset again or save it with "
                             "Dataset.to_parquet and give the file.")
        return _MEMORY[s]
    if s.startswith("hub:"):
        _, name, config, split = s.split(":", 3)
        try:
            return datasets.load_dataset(name, config or None, split=split)
        except Exception as e:  # the library's errors differ by cause (offline, no such split, no such repo)
            raise InputError(f"data.hub: cannot load {name!r}{f' ({config})' if config else ''} split {split!r}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the name, "
                             "data.hub_config and data.hub_split_map, or save the data to parquet and give the file.") from None
    p = Path(s)
    if not p.exists():
        raise InputError(f"{p}: file not found. Check the path (relative paths in a config file resolve against the "
                         "config file's folder).")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise InputError(f"{p}: a saved DatasetDict with splits {', '.join(ds)}; give one split's folder "
                                 f"(e.g. {p / next(iter(ds))}).")
            return ds
        if FILE_FORMATS[p.suffix.lower()] == "arrow":
            return datasets.Dataset.from_file(str(p))  # memory-mapped, nothing copied to the cache
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable
        return datasets.Dataset(InMemoryTable(pq.read_table(p)))  # features (ClassLabel names) from the file's metadata
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: not a readable {p.suffix or 'dataset'} file ({type(e).__name__}: {e}).") from None


def _decoder(feature: Any):
    """A function turning a column's stored values into what a labeled file would hold."""
    from datasets import ClassLabel
    if isinstance(feature, ClassLabel):
        return lambda v: feature.int2str(v) if isinstance(v, int) and v >= 0 else None
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):  # List / Sequence of ClassLabel: NER tags, multi-label sets
        return lambda vs: [inner.int2str(v) for v in vs] if isinstance(vs, list) else vs
    return None


def dataset_rows(source: str | Path) -> list[tuple[int, dict]]:
    ds = load(source)
    decoders = {col: f for col, feat in (ds.features or {}).items() if (f := _decoder(feat)) is not None}
    rows = []
    for i, row in enumerate(ds, 1):
        for col, f in decoders.items():
            row[col] = f(row[col])
        rows.append((i, row))
    if not rows:
        raise InputError(f"{source}: the dataset has no rows.")
    return rows
