"""Text-based recommendation on lmtune: `lmtune recommend fit CONFIG` trains a two-tower bi-encoder
(task retrieval; both towers share the encoder) on item -> next item pairs of the users' sequences,
ranks every item for each user with the items they already have excluded, and compares it with
popularity and BM25 on a leave-last-out split. `lmtune recommend rank RUN --user U` recommends for one user.

The user tower is the recency-weighted mean of the embeddings of the user's last `history_items`
items (weight decay**k for the k-th newest), the pooled user representation of two-tower recommenders
(Covington et al. 2016). Every item is embedded once, alone, so a long history costs nothing at query
time and is never cut by max_length. To a user's score of an item is added popularity_weight *
log(1 + the item's count in the training part): in-batch negatives are drawn as often as an item is
bought, so a two-tower model learns to push frequent items down, and the run is also trained with
retrieval.logq_correction (Yi et al. 2019). decay and popularity_weight are chosen on the valid
targets unless the config fixes them.

Split (leave-last-out, the usual protocol of sequential recommendation): per user with at least 3
interactions, test = the last item (history: everything before it), valid = the one before (early
stopping, and the choice of decay and popularity_weight), train = every prefix -> next pair of the
rest. Items already in a user's history are never recommended; a test target that repeats an earlier
item is therefore a miss for every system, and recommend.json counts them. BM25 (the history's text
as the query) gets its number of history items chosen on valid as well.

Outputs in the run directory: the retrieval run itself (model/, index/ of every item with its id),
recommend.json (config, the settings chosen on valid, split sizes, test NDCG@10 / recall@10 /
recall@20 of the model, of the model without the popularity term, and of both baselines) and
recommend_test.jsonl (each test user's top 10).
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
    decay: float | None = None  # weight of the k-th newest history item = decay**k; None: chosen on valid
    popularity_weight: float | None = None  # weight of log(1 + training count) added to a score; None: chosen on valid
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
    if cfg.decay is not None and not 0 <= cfg.decay <= 1:
        raise InputError(f"{path}: decay must be between 0 and 1 (or null: chosen on valid), got {cfg.decay}.")
    if cfg.popularity_weight is not None and cfg.popularity_weight < 0:
        raise InputError(f"{path}: popularity_weight must be >= 0 (or null: chosen on valid), got {cfg.popularity_weight}.")
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
DECAYS = (0.0, 0.3, 0.5, 0.7, 0.85, 1.0)  # 0: the newest item alone; 1: the plain mean of the history
POPULARITY_WEIGHTS = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)  # cosine units per log(1 + count)
BM25_HISTORIES = (1, 2, 3, 5, 10, 20)


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


def log_counts(split: Split, ids: list[str]) -> np.ndarray:
    """log(1 + count) of each item in the training part (every user's items before their last two),
    the part no valid or test target is in."""
    counts = Counter(x for hist, _ in split.valid for x in hist)
    return np.log1p(np.array([counts.get(x, 0) for x in ids], dtype=np.float64))


def user_vectors(histories: list[list[str]], embeddings: np.ndarray, ids: list[str], decay: float, n: int) -> np.ndarray:
    """The user tower: the mean of the last n history items' embeddings, the k-th newest weighted decay**k."""
    where = {x: j for j, x in enumerate(ids)}
    out = np.zeros((len(histories), embeddings.shape[1]), dtype=np.float64)
    for i, hist in enumerate(histories):
        rows = [where[x] for x in reversed(hist[-n:])]
        w = float(decay) ** np.arange(len(rows))  # 0.0 ** 0 == 1: decay 0 is the newest item alone
        out[i] = w @ embeddings[rows] / w.sum()
    return out


@dataclass
class Ranker:
    """How the model scores items for a user: the settings chosen on valid."""
    decay: float
    popularity_weight: float

    def scores(self, histories: list[list[str]], embeddings: np.ndarray, ids: list[str], log_count: np.ndarray,
               n: int) -> np.ndarray:
        return user_vectors(histories, embeddings, ids, self.decay, n) @ embeddings.T + self.popularity_weight * log_count


def ndcg(scores: np.ndarray, ids: list[str], rows: list[tuple[list[str], str]]) -> float:
    return metrics_at(top_items(scores, ids, [set(h) for h, _ in rows], k=K), [t for _, t in rows])["ndcg_10"]


def choose_ranker(cfg: RecommendConfig, valid: list[tuple[list[str], str]], embeddings: np.ndarray, ids: list[str],
                  log_count: np.ndarray, weights: tuple[float, ...] | None = None) -> tuple[Ranker, float]:
    """The (decay, popularity_weight) of the grid (or the config's) with the best valid NDCG@10; ties go to the
    first (the smaller decay, then the smaller weight)."""
    ranker, score, _ = choose_rankers(cfg, valid, embeddings, ids, log_count, weights)
    return ranker, score


def choose_rankers(cfg: RecommendConfig, valid: list[tuple[list[str], str]], embeddings: np.ndarray, ids: list[str],
                   log_count: np.ndarray, weights: tuple[float, ...] | None = None) -> tuple[Ranker, float, Ranker]:
    """choose_ranker's best, its valid NDCG@10, and the best with no popularity term, from one pass over the
    decays (each decay's user vectors are computed once)."""
    weights = weights or ((cfg.popularity_weight,) if cfg.popularity_weight is not None else POPULARITY_WEIGHTS)
    hist = [h for h, _ in valid]
    best: tuple[Ranker, float] | None = None
    text_only: tuple[Ranker, float] | None = None
    for decay in (cfg.decay,) if cfg.decay is not None else DECAYS:
        base = user_vectors(hist, embeddings, ids, decay, cfg.history_items) @ embeddings.T
        for w in dict.fromkeys((*weights, 0.0)):
            score = ndcg(base + w * log_count, ids, valid)
            if w in weights and (best is None or score > best[1]):
                best = (Ranker(decay, w), score)
            if w == 0.0 and (text_only is None or score > text_only[1]):
                text_only = (Ranker(decay, 0.0), score)
    return best[0], best[1], text_only[0]


def choose_bm25_history(valid: list[tuple[list[str], str]], ids: list[str], items: dict[str, str]) -> int:
    """BM25's number of history items (the query text) with the best valid NDCG@10: the baseline gets the same care."""
    hist = [h for h, _ in valid]
    return max(BM25_HISTORIES, key=lambda n: (ndcg(bm25_item_scores([history_text(h, items, n) for h in hist], ids, items),
                                                   ids, valid), -n))


# ---- the commands ---------------------------------------------------------------------------------
def run_config(cfg: RecommendConfig, data_dir: Path) -> dict:
    """The retrieval run's config: the app's defaults (no BM25 hard negatives: item texts of one category
    look alike without being next; log-q correction), under the user's `lmtune` keys."""
    over = cfg.lmtune or {}
    return {**over, "task": "retrieval", "output_dir": cfg.output_dir, "run_name": cfg.run_name or "recommend",
            "data": {**over.get("data", {}), "train": str(data_dir / "train.jsonl"), "dev": str(data_dir / "dev.jsonl")},
            "retrieval": {"hard_negatives": 0, "logq_correction": True, **over.get("retrieval", {}),
                          "corpus": str(data_dir / "items.jsonl"), "corpus_column": "text", "corpus_id_column": "item_id"}}


def fit(config: str | Path | RecommendConfig) -> dict:
    """Train, rank every test user, compare with the baselines; returns (and writes) recommend.json."""
    import lmtune
    cfg = config if isinstance(config, RecommendConfig) else load_config(config)
    items = read_items(cfg)
    split = leave_last_out(read_sequences(cfg, items))
    if len(split.valid) < 2 or not split.train:
        raise InputError(f"{cfg.interactions}: {len(split.test)} user(s) with 3 or more interactions; leave-last-out needs "
                         "several (each gives a train, a valid and a test item).")
    data_dir = Path(cfg.output_dir) / f"{cfg.run_name or 'recommend'}.data"  # the pairs the run was trained on, kept for evaluate / resume
    data_dir.mkdir(parents=True, exist_ok=True)
    # the item tower's pairs: the newest item of a history -> the next item (the user tower pools item embeddings)
    for name, rows in (("train", split.train), ("dev", split.valid)):
        write_jsonl(data_dir / f"{name}.jsonl", [{"query": items[h[-1]], "document": items[t]} for h, t in rows])
    write_jsonl(data_dir / "items.jsonl", [{"item_id": k, "text": v} for k, v in items.items()])
    run = lmtune.train(run_config(cfg, data_dir))
    result = evaluate(run, cfg, items, split)
    write_json(run.run_dir / "recommend.json", result)
    return result


def evaluate(run, cfg: RecommendConfig, items: dict[str, str], split: Split) -> dict:
    users = list(split.test)
    test = [split.test[u] for u in users]
    hist, targets = [h for h, _ in test], [t for _, t in test]
    seen = [set(h) for h in hist]
    index = run.task.index
    ids, emb = index.ids, index.embeddings.astype(np.float64)
    count = log_counts(split, ids)
    ranker, valid_ndcg, text_only = choose_rankers(cfg, split.valid, emb, ids, count)
    bm25_n = choose_bm25_history(split.valid, ids, items)
    model_top = top_items(ranker.scores(hist, emb, ids, count, cfg.history_items), ids, seen)
    systems = {"model": model_top,
               "model_without_popularity": top_items(text_only.scores(hist, emb, ids, count, cfg.history_items), ids, seen),
               "popularity": top_items(popularity_scores(split, ids, len(users)), ids, seen),
               "bm25": top_items(bm25_item_scores([history_text(h, items, bm25_n) for h in hist], ids, items), ids, seen)}
    scores = {name: metrics_at(top, targets) for name, top in systems.items()}
    write_jsonl(run.run_dir / "recommend_test.jsonl",
                [{"user": u, "target": t, "top": top[:K]} for u, t, top in zip(users, targets, model_top)])
    repeats = sum(t in s for t, s in zip(targets, seen))
    log.info("recommend: test NDCG@10 model %.4f (without the popularity term %.4f), popularity %.4f, BM25 %.4f "
             "(%d users, %d repeat targets excluded)", scores["model"]["ndcg_10"], scores["model_without_popularity"]["ndcg_10"],
             scores["popularity"]["ndcg_10"], scores["bm25"]["ndcg_10"], len(users), repeats)
    return {"config": dataclasses.asdict(cfg), "run_dir": str(run.run_dir),
            "chosen_on_valid": {"decay": ranker.decay, "popularity_weight": ranker.popularity_weight, "valid_ndcg_10": valid_ndcg,
                                "decay_without_popularity": text_only.decay, "bm25_history_items": bm25_n},
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
    saved = json.loads(meta.read_text(encoding="utf-8"))
    cfg = RecommendConfig(**saved["config"])
    items = read_items(cfg)
    seqs = read_sequences(cfg, items)
    if history is None:
        if user not in seqs:
            raise InputError(f"user {user!r} has no interactions in {cfg.interactions}.")
        history = seqs[user]
    unknown = [x for x in history if x not in items]
    if unknown:
        raise InputError(f"item {unknown[0]!r} is not in {cfg.items}.")
    index = lmtune.load(run_dir).task.index
    ids, emb = index.ids, index.embeddings.astype(np.float64)
    chosen = saved["chosen_on_valid"]
    ranker = Ranker(chosen["decay"], chosen["popularity_weight"])
    scores = ranker.scores([history], emb, ids, log_counts(leave_last_out(seqs), ids), cfg.history_items)
    top = top_items(scores, ids, [set(history)], k=k)[0]
    where = {x: j for j, x in enumerate(ids)}
    return [{"item_id": x, "text": items[x], "score": float(scores[0, where[x]])} for x in top]
