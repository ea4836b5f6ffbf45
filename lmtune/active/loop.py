"""The labeling loop over run directories: ask (`query`: the next batch of a pool file to label, with the model's
suggestions), take the labels back (`import_labeled`: a grown train file beside the run, never the user's, and a
retrain of the run's config on it), and keep the learning curve (labels vs the dev metric over the loop's runs).

RUN_DIR/active.json holds the loop as this run knows it: the batches asked (strategy, size, pool rows), the imports,
the learning curve and the run it grew from (parent). A run trained on a grown train file inherits its parent's
record (its data.train lies in the parent's RUN_DIR/active/), so a retrain started anywhere (the label command,
the dashboard's job, or `lmtune train RUN_DIR/active/config-K.yaml` by hand) continues the same loop.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.active.files import EXTENSIONS, FORMATS, Labeled, read_labeled, write_batch
from lmtune.active.strategies import PoolView
from lmtune.artifacts import RunDir, read_meta
from lmtune.errors import InputError
from lmtune.io import write_json, write_text
from lmtune.registry import query_strategies

log = logging.getLogger("lmtune")

VERSION = 1
LABELED_SAMPLE = 5000  # coreset: labeled rows embedded as the first centres at most (a seeded sample beyond)
GROWABLE = ("csv", "tsv", "jsonl")  # train files the import copies row by row, every column kept


# ---- the loop's record ---------------------------------------------------------------------------
def new_state() -> dict:
    return {"version": VERSION, "parent": None, "batches": [], "imports": [], "curve": []}


def read_state(run_dir: str | Path) -> dict:
    """The run's active.json, or the record it inherits from the run whose grown train file it trained on."""
    rd = RunDir(run_dir)
    if rd.active.is_file():
        return json.loads(rd.active.read_text())
    return _inherited(rd) or new_state()


def _inherited(rd: RunDir) -> dict | None:
    import yaml
    if not rd.config.is_file():
        return None
    train = ((yaml.safe_load(rd.config.read_text()) or {}).get("data") or {}).get("train")
    if not isinstance(train, str):
        return None
    train_path = Path(train).resolve()
    parent = RunDir(train_path.parent.parent)
    if train_path.parent.name != "active" or not parent.active.is_file():
        return None
    state = json.loads(parent.active.read_text())
    if not any(Path(i["train_file"]).resolve() == train_path for i in state["imports"]):
        return None
    return {**state, "parent": str(parent.root.resolve())}


def curve_point(run_dir: str | Path) -> dict:
    """One point of the learning curve: the run's labeled train rows and its dev metric."""
    rd = RunDir(run_dir)
    m = rd.read_metrics()
    metric = m.get("metric")
    sizes = json.loads(rd.splits.read_text()).get("sizes", {}) if rd.splits.is_file() else {}
    value = (m.get("dev") or {}).get(metric)
    return {"run_dir": str(rd.root.resolve()), "run": rd.root.name, "labels": sizes.get("train"), "metric": metric,
            "dev": None if value is None else float(value)}


def with_point(state: dict, run_dir: str | Path) -> dict:
    here = str(Path(run_dir).resolve())
    if not any(p["run_dir"] == here for p in state["curve"]):
        state["curve"].append(curve_point(run_dir))
    return state


def save_state(run_dir: str | Path, state: dict) -> None:
    """active.json, the learning curve's PNG, and the `active` section of results.json (report.md)."""
    from lmtune import results
    from lmtune.evaluate.plots import active_learning_curve
    rd = RunDir(run_dir)
    write_json(rd.active, state)
    points = [p for p in state["curve"] if p["labels"] is not None and p["dev"] is not None]
    if points:
        active_learning_curve(points, points[-1]["metric"], rd.active_curve)
    if rd.results.is_file():
        results.update(rd.root, active=summary(state))


def summary(state: dict) -> dict:
    """What results.json keeps of the loop (the batches' rows stay in active.json)."""
    return {"parent": state["parent"], "curve": state["curve"],
            "batches": [{k: b[k] for k in ("index", "strategy", "size", "pool", "file", "format", "created")} for b in state["batches"]],
            "imports": [{k: i.get(k) for k in ("index", "file", "rows", "skipped", "duplicates", "train_file", "run_dir")}
                        for i in state["imports"]]}


# ---- asking for labels ---------------------------------------------------------------------------
def _key(source: str) -> str:
    """A pool row's identity across batches: its file (resolved) and line."""
    file, _, line = source.rpartition(":")
    return f"{Path(file).resolve()}:{line}"


def query(run_dir: str | Path, pool: str | Path, batch: int, strategy: str = "entropy", fmt: str = "csv",
          out: str | Path | None = None, seed: int = 0) -> dict:
    """Pick the next `batch` rows of the pool file to label; write them (with the model's suggestion, its
    confidence and the strategy's score) to `out` (default RUN_DIR/active/batch-K.EXT) and record the batch."""
    from lmtune.api import load
    from lmtune.tasks.base import ACTIVE
    query_strategies.check(strategy)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose from {', '.join(FORMATS)}.")
    if batch < 1:
        raise InputError(f"--batch {batch}: give the number of rows to label (1 or more).")
    run = load(run_dir)
    run.task.require(ACTIVE, "label")
    run.config.train.progress = "none"
    state = with_point(read_state(run_dir), run_dir)
    asked = {s for b in state["batches"] for s in b["sources"]}
    rows = run.task.read_file(str(pool), run.config, None, require_label=False)
    labeled = run.task.read(run.config).train
    known = {ex.text for ex in labeled}
    candidates = [ex for ex in rows if _key(ex.source) not in asked and ex.text not in known]
    if not candidates:
        raise InputError(f"{pool}: no rows left to ask about ({len(rows)} rows, all in the run's train data or asked "
                         "in an earlier batch).")
    enc = run.encode(candidates)
    scores = run.task.label_scores(run.outputs(enc), enc, run.labels)
    if not scores.exclusive and not query_strategies.meta(strategy, "multilabel"):
        raise InputError(f"--strategy {strategy}: has no multi-label form; choose from "
                         f"{', '.join(query_strategies.names(multilabel=True))}.")
    view = PoolView(scores, seed, embed_pool=lambda: _embed(run, candidates),
                    embed_labeled=lambda: _embed(run, _sample(labeled, LABELED_SAMPLE, seed)),
                    penultimate=lambda: penultimate_features(run, enc))
    picks = query_strategies.get(strategy)(view, batch)
    batch_rows = _rows(picks, candidates, scores, run.labels)
    index = len(state["batches"]) + 1
    path = Path(out) if out else RunDir(run_dir).active_dir / f"batch-{index}{EXTENSIONS[fmt]}"
    files = write_batch(batch_rows, path, fmt, run.labels, scores.exclusive, run.config.data.label_separator,
                        f"lmtune:{Path(run_dir).name}")
    record = {"index": index, "strategy": strategy, "size": len(batch_rows), "requested": batch, "seed": seed,
              "pool": str(Path(pool).resolve()), "pool_rows": len(rows), "candidates": len(candidates),
              "file": str(path.resolve()), "files": [str(f.resolve()) for f in files], "format": fmt,
              "exclusive": scores.exclusive, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "sources": [_key(r["source"]) for r in batch_rows], "rows": batch_rows}
    state["batches"].append(record)
    save_state(run_dir, state)
    return record


def _sample(examples: list, n: int, seed: int) -> list:
    if len(examples) <= n:
        return examples
    keep = np.random.default_rng(seed).choice(len(examples), n, replace=False)
    return [examples[i] for i in sorted(keep)]


def _embed(run, examples: list) -> np.ndarray:
    """The run's fine-tuned encoder's mean-pooled last hidden state (the drift test's embedding)."""
    from lmtune.drift import embed
    return embed(run.model, run.task, run.tokenizer, run.config, run.labels, examples)


def _rows(picks: list[tuple[int, float]], candidates: list, scores, labels: list[str]) -> list[dict]:
    decided = scores.decided()
    rows = []
    for rank, (i, score) in enumerate(picks, 1):
        ex, p = candidates[i], scores.probs[i]
        chosen = [lab for lab, d in zip(labels, decided[i]) if d]
        if scores.exclusive:
            suggestion, confidence = chosen[0], float(p.max())
        else:  # the least sure of the label decisions
            suggestion, confidence = chosen, float(np.where(decided[i], p, 1 - p).min())
        line = ex.source.rpartition(":")[2]
        rows.append({"rank": rank, "line": int(line) if line.isdigit() else None, "source": ex.source, "text": ex.text,
                     "text_pair": ex.text_pair, "suggestion": suggestion, "confidence": round(confidence, 6),
                     "score": round(float(score), 6), "label": ""})
    return rows


@torch.inference_mode()
def penultimate_features(run, enc) -> np.ndarray:
    """What the output layer reads, per example (a long text's windows averaged): the input of the last Linear
    with one output per label. A forward hook is the one way to read it for every architecture's head
    (BERT's classifier, RoBERTa's out_proj, a PEFT wrapper's copy) without a head of our own."""
    from lmtune.training.batching import eval_batches
    from lmtune.training.loop import inputs
    model = run.model
    if not isinstance(model, torch.nn.Module):
        raise InputError("label --strategy badge: reads the model's last layer; use the run's torch model.")
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(run.labels)]
    if not heads:
        raise InputError("label --strategy badge: the model has no output layer with one output per label to read.")
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.__setitem__("h", args[0])) for m in heads]
    collate = functools.partial(run.task.collate, tokenizer=run.tokenizer)
    device = next(model.parameters()).device
    per_feature: list = [None] * len(enc.features)
    try:
        model.eval()
        for idx in eval_batches(enc.lengths, 1024, 32):
            batch = {k: t.to(device) for k, t in collate([enc.features[i] for i in idx]).items()}
            model(**inputs(batch))
            h = seen["h"].float()
            h = h[:, 0] if h.dim() == 3 else h  # a head that reads the whole sequence: its first token
            for i, v in zip(idx, h.cpu().numpy()):
                per_feature[i] = v
    finally:
        for hook in hooks:
            hook.remove()
    index = {id(f): k for k, f in enumerate(enc.features)}
    return np.stack([np.mean([per_feature[index[id(f)]] for f in fs], 0) for fs in enc.windows()]).astype(np.float32)


# ---- taking the labels back ------------------------------------------------------------------------
def import_labeled(run_dir: str | Path, labeled: str | Path, train_out: str | Path | None = None,
                   train: bool = True) -> dict:
    """The labeled rows appended to a copy of the run's train split (RUN_DIR/active/train-K.EXT, or train_out: a
    new file, never an existing one), the run's config with that train file (RUN_DIR/active/config-K.yaml; a dev
    split cut from the train file is written beside it, so every run of the loop is measured on the same dev
    rows), then, with train, the retrain: an ordinary run, whose learning-curve point is recorded."""
    from lmtune.config import build_config
    from lmtune.data.readers import detect_format, read_rows
    from lmtune.tasks import get_task
    from lmtune.tasks.base import ACTIVE, EXAMPLE_LABELS
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    if not rd.finished():
        raise InputError(f"{run_dir}: not a finished lmtune run; the labels go back to the run that asked for them.")
    meta = read_meta(rd.model)
    task = get_task(meta["task"])
    task.require(ACTIVE, "label --import")
    cfg = build_config(meta["config"])
    d = cfg.data
    exclusive = task.supports(EXAMPLE_LABELS)
    items, unlabeled = read_labeled(labeled, meta["labels"], exclusive, d.label_separator)
    fmt = detect_format(Path(d.train), d.format) if d.train else None
    if fmt not in GROWABLE:
        raise InputError(f"data.train {d.train}: label --import grows CSV, TSV or JSONL train files (this one reads as "
                         f"{fmt}); write the train data to one of those and train the run on it.")
    splits = task.read(cfg)
    state = with_point(read_state(run_dir), run_dir)
    known = {ex.text for ex in splits.train}
    new = [it for it in items if it.text not in known and not known.add(it.text)]  # a text once, and not one already labeled
    if not new:
        raise InputError(f"{labeled}: every labeled text is already in the run's train data.")
    index = len(state["imports"]) + 1
    suffix = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}[fmt]
    target = Path(train_out) if train_out else rd.active_dir / f"train-{index}{suffix}"
    if target.exists():
        raise InputError(f"{target}: already exists; label --import writes a new train file and never overwrites one "
                         "(give another --train-out).")
    rows = read_rows(d.train, d.format, d.encoding)
    lines = _split_lines(splits, d.train)
    header = list(rows[0][1]) if rows else []
    keep = [r for n, r in rows if d.dev or n in lines["train"]]
    _write_rows(target, fmt, header, keep + [_row(it, cfg, exclusive, fmt) for it in new])
    data = {"train": str(target.resolve())}
    if not d.dev:  # the dev (and test) rows the run split off the train file, fixed for the rest of the loop
        for split in ("dev", "test") if not d.test else ("dev",):
            if lines[split]:
                path = rd.active_dir / f"{split}{suffix}"
                if not path.exists():
                    _write_rows(path, fmt, header, [r for n, r in rows if n in lines[split]])
                data[split] = str(path.resolve())
    config_path = _retrain_config(cfg, run_dir, data, state, index)
    record = {"index": index, "file": str(Path(labeled).resolve()), "rows": len(new), "skipped": unlabeled,
              "duplicates": len(items) - len(new), "train_file": str(target.resolve()), "config": str(config_path),
              "run_dir": None, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    state["imports"].append(record)
    save_state(run_dir, state)
    if train:
        from lmtune.api import train as train_config
        new_run = train_config(str(config_path))
        record["run_dir"] = str(Path(new_run.run_dir).resolve())
        save_state(run_dir, state)
        record_round(new_run.run_dir)
    return record


def _split_lines(splits, train_file: str) -> dict[str, set[int]]:
    """The train file's line numbers in each split of the run (its examples' sources are FILE:LINE)."""
    def lines(examples: list) -> set[int]:
        out = set()
        for ex in examples:
            file, _, line = ex.source.rpartition(":")
            if file == train_file and line.isdigit():
                out.add(int(line))
        return out
    return {"train": lines(splits.train), "dev": lines(splits.dev), "test": lines(splits.test)}


def _row(item: Labeled, cfg, exclusive: bool, fmt: str) -> dict:
    """A labeled row in the train file's columns (multi-label: a JSON list, the separator, or 0/1 columns)."""
    d = cfg.data
    row: dict[str, Any] = {d.text_column: item.text}
    if d.text_pair_column:
        if item.text_pair is None:
            raise InputError(f"{item.where}: this run reads sentence pairs; the row has no text_pair.")
        row[d.text_pair_column] = item.text_pair
    if exclusive:
        row[d.label_column] = item.labels[0]
    elif d.label_columns:
        row.update({col: 1 if col in item.labels else 0 for col in d.label_columns})
    else:
        row[d.label_column] = item.labels if fmt == "jsonl" else d.label_separator.join(item.labels)
    return row


def _write_rows(path: Path, fmt: str, header: list[str], rows: list[dict]) -> None:
    if fmt == "jsonl":
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return
    names = list(dict.fromkeys(header + [k for r in rows for k in r]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, delimiter="\t" if fmt == "tsv" else ",")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def _retrain_config(cfg, run_dir: Path, data: dict, state: dict, index: int) -> Path:
    """The run's config with the grown train file, a run name of its own beside the run (NAME-alK), written to
    RUN_DIR/active/config-K.yaml."""
    from lmtune.config import build_config
    base = re.sub(r"-al\d+$", "", run_dir.name)
    rounds = len(state["imports"]) + 1
    output_dir = run_dir.resolve().parent
    name = f"{base}-al{rounds}"
    while (output_dir / name).exists():
        rounds += 1
        name = f"{base}-al{rounds}"
    d = cfg.to_dict()
    d["data"] = {**d["data"], **data}
    d["continual"] = {**d.get("continual", {}), "from_run": None}
    d.update(run_name=name, output_dir=str(output_dir))
    path = RunDir(run_dir).active_dir / f"config-{index}.yaml"
    write_text(path, build_config(d).to_yaml())
    return path.resolve()


def record_round(run_dir: str | Path) -> dict:
    """A retrained run's place in the loop: the inherited record with its own curve point (active.json, the
    curve's PNG, results.json's `active` section)."""
    state = with_point(read_state(run_dir), run_dir)
    save_state(run_dir, state)
    return state


# ---- labels given one row at a time (the dashboard) ------------------------------------------------
def labeled_path(run_dir: str | Path, index: int) -> Path:
    return RunDir(run_dir).active_dir / f"batch-{index}.labeled.jsonl"


def batch_of(state: dict, index: int | None) -> dict:
    """A recorded batch (index None: the latest)."""
    if not state["batches"]:
        raise InputError("no batch asked yet: lmtune label RUN_DIR --pool FILE writes one.")
    if index is None:
        return state["batches"][-1]
    for b in state["batches"]:
        if b["index"] == index:
            return b
    raise InputError(f"no batch {index} (batches: {', '.join(str(b['index']) for b in state['batches'])}).")


def saved_labels(run_dir: str | Path, index: int) -> dict[int, list[str]]:
    """The labels saved for a batch so far: rank -> labels."""
    path = labeled_path(run_dir, index)
    if not path.is_file():
        return {}
    return {r["rank"]: r["label"] if isinstance(r["label"], list) else [r["label"]]
            for r in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())}


def save_labels(run_dir: str | Path, index: int, given: dict[int, list[str]]) -> Path:
    """Accepted or corrected labels of a batch's rows (rank -> labels), merged with those saved before, written as
    our JSONL labeled file (RUN_DIR/active/batch-K.labeled.jsonl), which `label --import` takes."""
    rd = RunDir(run_dir)
    meta = read_meta(rd.model)
    batch = batch_of(read_state(run_dir), index)
    by_rank = {r["rank"]: r for r in batch["rows"]}
    for rank, labs in given.items():
        where = f"batch {index}: row {rank}"
        if rank not in by_rank:
            raise InputError(f"{where}: no such row (ranks 1 to {len(by_rank)}).")
        if batch.get("exclusive", True) and len(labs) != 1:
            raise InputError(f"{where}: give exactly one label.")
        bad = [lab for lab in labs if lab not in meta["labels"]]
        if bad:
            raise InputError(f"{where}: label {bad[0]!r} is not one of the run's labels ({', '.join(meta['labels'])}).")
    labels = {**saved_labels(run_dir, index), **given}
    rows = [{**_clean_row(by_rank[k]), "label": v[0] if batch.get("exclusive", True) else v} for k, v in sorted(labels.items())]
    path = labeled_path(run_dir, index)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _clean_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k == "text_pair" and v is None)}
