"""Text-based recommendation on lmtune: `lmtune recommend fit CONFIG` trains a two-tower bi-encoder
(task retrieval; both towers share the encoder) from the text of a user's history, newest item first,
to the text of the item they took next, ranks every item for each user with the items they already
have excluded, and compares it with popularity and BM25 on a leave-last-out split.
`lmtune recommend rank RUN --user U` recommends for one user.

Split (leave-last-out, the usual protocol of sequential recommendation): per user with at least 3
interactions, test = the last item (history: everything before it), valid = the one before (early
stopping), train = every prefix -> next pair of the rest. Items already in a user's history are
never recommended; a test target that repeats an earlier item is therefore a miss for every system,
and recommend.json counts them.

Outputs in the run directory: the retrieval run itself (model/, index/ of every item with its id),
recommend.json (config, split sizes, test NDCG@10 / recall@10 / recall@20 of the model and of both
baselines) and recommend_test.jsonl (each test user's top 10).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.apps import load_app_config
from lmtune.data.readers import read_rows
from lmtune.errors import InputError
from lmtune.io import write_json, write_jsonl

log = logging.getLogger("lmtune")
EXAMPLE = Path(__file__).with_name("example.yaml")
K = 10


@dataclass
class RecommendConfig:
    items: str = ""
    interactions: str = ""
    item_id_column: str = "item_id"
    item_text_column: str = "text"
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str | None = None
    history_items: int = 20
    output_dir: str = "runs"
    run_name: str | None = None
    lmtune: dict = field(default_factory=dict)


def load_config(path: str | Path) -> RecommendConfig:
    """The app's YAML: unknown keys are errors; relative paths resolve against the file's folder."""
    cfg = load_app_config(path, RecommendConfig, ("items", "interactions"), EXAMPLE)
    for key in ("items", "interactions"):
        if not getattr(cfg, key):
            raise InputError(f"{path}: '{key}' is missing: give the {key} file.")
    if cfg.history_items < 1:
        raise InputError(f"{path}: history_items must be at least 1, got {cfg.history_items}.")
    return cfg


# ---- data ---------------------------------------------------------------------------------------
def read_items(cfg: RecommendConfig) -> dict[str, str]:
    items: dict[str, str] = {}
    for line, row in read_rows(cfg.items):
        for col in (cfg.item_id_column, cfg.item_text_column):
            if col not in row:
                raise InputError(f"{cfg.items}: line {line}: no column '{col}' (columns are: {', '.join(map(repr, row))}). "
                                 f"Set item_id_column / item_text_column.")
        key, text = str(row[cfg.item_id_column]), str(row[cfg.item_text_column] or "").strip()
        if not text:
            raise InputError(f"{cfg.items}: line {line}: item {key} has no text. Give every item a text (title, category ...).")
        if key in items:
            raise InputError(f"{cfg.items}: line {line}: item id {key} appears twice. Keep one row per item.")
        items[key] = text
    if len(items) < 2:
        raise InputError(f"{cfg.items}: {len(items)} item(s); there is nothing to rank.")
    return items


def read_sequences(cfg: RecommendConfig, items: dict[str, str]) -> dict[str, list[str]]:
    """Each user's items in time order (file order, or time_column's, ties in file order)."""
    rows: dict[str, list[tuple[Any, int, str]]] = {}
    for n, (line, row) in enumerate(read_rows(cfg.interactions)):
        for col in (cfg.user_column, cfg.item_column, *([cfg.time_column] if cfg.time_column else [])):
            if col not in row:
                raise InputError(f"{cfg.interactions}: line {line}: no column '{col}' (columns are: {', '.join(map(repr, row))}). "
                                 "Set user_column / item_column / time_column.")
        item = str(row[cfg.item_column])
        if item not in items:
            raise InputError(f"{cfg.interactions}: line {line}: item {item} is not in {cfg.items}. Add its text or drop the row.")
        rows.setdefault(str(row[cfg.user_column]), []).append((row[cfg.time_column] if cfg.time_column else 0, n, item))
    return {u: [it for _, _, it in sorted(r, key=lambda x: (x[0], x[1]))] for u, r in rows.items()}


@dataclass
class Split:
    train: list[tuple[list[str], str]]  # (history, next item)
    valid: list[tuple[list[str], str]]
    test: dict[str, tuple[list[str], str]]  # user -> (history, held-out last item)


def leave_last_out(seqs: dict[str, list[str]]) -> Split:
    train, valid, test = [], [], {}
    for user, seq in seqs.items():
        if len(seq) < 3:
            continue
        train += [(seq[:i], seq[i]) for i in range(1, len(seq) - 2)]
        valid.append((seq[:-2], seq[-2]))
        test[user] = (seq[:-1], seq[-1])
    return Split(train, valid, test)


def history_text(history: list[str], items: dict[str, str], n: int) -> str:
    """The query: the last n items' texts, newest first (truncation then drops the oldest)."""
    return " | ".join(items[i] for i in reversed(history[-n:]))


# ---- ranking and metrics --------------------------------------------------------------------------
def metrics_at(ranked: list[list[str]], targets: list[str]) -> dict:
    ndcg, r10, r20 = [], [], []
    for row, t in zip(ranked, targets):
        pos = row.index(t) if t in row else None
        ndcg.append(1 / np.log2(pos + 2) if pos is not None and pos < K else 0.0)
        r10.append(pos is not None and pos < 10)
        r20.append(pos is not None and pos < 20)
    return {"ndcg_10": float(np.mean(ndcg)), "recall_10": float(np.mean(r10)), "recall_20": float(np.mean(r20))}


def top_items(scores: np.ndarray, ids: list[str], exclude: list[set[str]], k: int = 20) -> list[list[str]]:
    where = {x: j for j, x in enumerate(ids)}
    scores = np.array(scores, dtype=np.float64)
    for i, seen in enumerate(exclude):
        scores[i, [where[x] for x in seen if x in where]] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in top]


def popularity_scores(split: Split, ids: list[str], n_users: int) -> np.ndarray:
    counts = Counter(x for hist, _ in split.test.values() for x in hist)
    return np.tile(np.array([counts.get(x, 0) for x in ids], dtype=np.float64), (n_users, 1))


def bm25_item_scores(queries: list[str], ids: list[str], items: dict[str, str]) -> np.ndarray:
    from lmtune.bm25 import BM25, tokenize
    return BM25([tokenize(items[x]) for x in ids]).scores([tokenize(q) for q in queries])


# ---- the commands ---------------------------------------------------------------------------------
def fit(config: str | Path | RecommendConfig) -> dict:
    """Train, rank every test user, compare with the baselines; returns (and writes) recommend.json."""
    import lmtune
    cfg = config if isinstance(config, RecommendConfig) else load_config(config)
    items = read_items(cfg)
    split = leave_last_out(read_sequences(cfg, items))
    if len(split.valid) < 2 or not split.train:
        raise InputError(f"{cfg.interactions}: {len(split.test)} user(s) with 3 or more interactions; leave-last-out needs "
                         "several (each gives a train, a valid and a test item).")
    run_name = cfg.run_name or "recommend"
    data_dir = Path(cfg.output_dir) / f"{run_name}.data"  # the pairs the run was trained on, kept for evaluate / resume
    data_dir.mkdir(parents=True, exist_ok=True)
    pairs = {name: [{"query": history_text(h, items, cfg.history_items), "document": items[t]} for h, t in rows]
             for name, rows in (("train", split.train), ("dev", split.valid))}
    for name, rows in pairs.items():
        write_jsonl(data_dir / f"{name}.jsonl", rows)
    write_jsonl(data_dir / "items.jsonl", [{"item_id": k, "text": v} for k, v in items.items()])
    over = cfg.lmtune or {}
    run_cfg = {**over, "task": "retrieval", "output_dir": cfg.output_dir, "run_name": run_name,
               "data": {**over.get("data", {}), "train": str(data_dir / "train.jsonl"), "dev": str(data_dir / "dev.jsonl")},
               "retrieval": {**over.get("retrieval", {}), "corpus": str(data_dir / "items.jsonl"), "corpus_column": "text",
                             "corpus_id_column": "item_id"}}
    run = lmtune.train(run_cfg)
    result = evaluate(run, cfg, items, split)
    write_json(run.run_dir / "recommend.json", result)
    return result


def evaluate(run, cfg: RecommendConfig, items: dict[str, str], split: Split) -> dict:
    users = list(split.test)
    hist = [split.test[u][0] for u in users]
    targets = [split.test[u][1] for u in users]
    seen = [set(h) for h in hist]
    queries = [history_text(h, items, cfg.history_items) for h in hist]
    index = run.task.index
    ids = index.ids
    model_top = top_items(run.embed(queries) @ index.embeddings.T, ids, seen)
    systems = {"model": model_top,
               "popularity": top_items(popularity_scores(split, ids, len(users)), ids, seen),
               "bm25": top_items(bm25_item_scores(queries, ids, items), ids, seen)}
    scores = {name: metrics_at(top, targets) for name, top in systems.items()}
    write_jsonl(run.run_dir / "recommend_test.jsonl",
                [{"user": u, "target": t, "top": top[:K]} for u, t, top in zip(users, targets, model_top)])
    repeats = sum(t in s for t, s in zip(targets, seen))
    log.info("recommend: test NDCG@10 model %.4f, popularity %.4f, BM25 %.4f (%d users, %d repeat targets excluded)",
             scores["model"]["ndcg_10"], scores["popularity"]["ndcg_10"], scores["bm25"]["ndcg_10"], len(users), repeats)
    return {"config": dataclasses.asdict(cfg), "run_dir": str(run.run_dir),
            "split": {"users": len(users), "items": len(items), "train_pairs": len(split.train), "valid": len(split.valid),
                      "test": len(users), "repeat_targets_unreachable": repeats},
            "test": scores, "protocol": "leave-last-out; all items ranked; items in the user's history excluded"}


def rank(run_dir: str | Path, user: str | None = None, history: list[str] | None = None, k: int = K) -> list[dict]:
    """The top k items for a user of the training interactions (their whole history), or for a given
    list of item ids; items in the history are excluded."""
    import json

    import lmtune
    run_dir = Path(run_dir)
    meta = run_dir / "recommend.json"
    if not meta.is_file():
        raise InputError(f"{run_dir}: no recommend.json; train it with `lmtune recommend fit CONFIG`.")
    cfg = RecommendConfig(**json.loads(meta.read_text(encoding="utf-8"))["config"])
    items = read_items(cfg)
    if history is None:
        seqs = read_sequences(cfg, items)
        if user not in seqs:
            raise InputError(f"user {user!r} has no interactions in {cfg.interactions}.")
        history = seqs[user]
    unknown = [x for x in history if x not in items]
    if unknown:
        raise InputError(f"item {unknown[0]!r} is not in {cfg.items}.")
    run = lmtune.load(run_dir)
    hits = run.search([history_text(history, items, cfg.history_items)], k, exclude=[
        {j for j, x in enumerate(run.task.index.ids) if x in set(history)}])[0]
    return [{"item_id": h["id"], "text": h["document"], "score": h["score"]} for h in hits]
