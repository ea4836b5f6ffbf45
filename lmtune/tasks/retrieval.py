"""Retrieval: a bi-encoder fine-tuned on (query, relevant document) pairs, so that a query's embedding
lands next to its documents' (FAQ matching, search over passages, the user -> item side of a
recommender). Rows: data.text_column holds the query, data.label_column its relevant document
(defaults `query` and `document`); a query with several relevant documents takes one row each.

What this module gets right that the usual scripts do not:
- in-batch negatives with the query's own document masked wherever else it appears in the batch (a
  passage with five questions would otherwise be a "negative" of four of them), plus hard negatives
  mined with BM25 from the training documents (Karpukhin et al. 2020, DPR) or given in a column;
- the encoder's own pooling (sentence-transformers' 1_Pooling/config.json: mean, CLS or last token)
  and cosine similarity at scale 20, as the checkpoint was trained (MultipleNegativesRankingLoss);
- dev/test are scored by ranking every distinct document of the split for every query: recall@1/5/10,
  MRR@10 and NDCG@10 (several relevant documents per query count), not a pairwise accuracy;
- after training, the documents (retrieval.corpus, else every document of the data) are embedded
  into an index saved in the run (lmtune.index); `lmtune search` and predict rank against it.
The training loop is lmtune's own (accumulation, early stopping on NDCG@10, PEFT, resume), so the
sentence-transformers trainer is not used; the saved model/ is a plain transformers encoder.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from lmtune.config import Config
from lmtune.data.readers import Example, read_examples
from lmtune.errors import InputError
from lmtune.models import load_config, load_pretrained, quiet_transformers, resolve_model
from lmtune.tasks.base import INDEX, Encoded, Splits, Task, dev_and_test
from lmtune.tasks.retrieval_config import RetrievalConfig  # noqa: F401  (re-exported: code and saved configs name it here)

RELEVANT = "relevant"  # the one "label": a document is relevant to the query or not
SCALE = 20.0  # cosine similarity x 20: MultipleNegativesRankingLoss's default, what MiniLM was trained with
KS = (1, 5, 10)
QUERY, POSITIVE, NEGATIVE = 0, 1, 2  # the role of a row of a batch
LOGQ_UNIT = 1000  # labels is a long tensor: a row's -log q travels in it as round(-log q * LOGQ_UNIT)


@dataclass
class RetrievalExample(Example):
    """text: the query ("" for a document alone); label: its relevant document (None for a query alone)."""
    negatives: list[str] = field(default_factory=list)

    def audit_units(self) -> list[str]:
        return []  # no classes to balance

    def audit_gold(self) -> str | None:
        return None  # one query with several documents is normal, not a label conflict


def pooling_mode(model_path: str) -> str:
    """The pooling a sentence-transformers checkpoint was trained with (its 1_Pooling/config.json);
    mean when the folder has none."""
    p = Path(model_path) / "1_Pooling" / "config.json"
    if p.is_file():
        conf = json.loads(p.read_text(encoding="utf-8"))
        for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean")):
            if conf.get(key):
                return mode
    return "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Unit-length sentence embeddings [rows, hidden] from token states (right padding)."""
    if mode == "cls":
        emb = hidden[:, 0]
    elif mode == "last":
        emb = hidden[torch.arange(hidden.size(0), device=hidden.device), mask.sum(1) - 1]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(emb.float(), dim=-1)


def ranking_metrics(scores: np.ndarray, relevant: list[set[int]]) -> dict:
    """recall@k, MRR@10 and NDCG@10 (binary relevance) of [queries, documents] scores."""
    k_max = min(max(KS), scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_max]
    rec = {k: [] for k in KS}
    mrr, ndcg = [], []
    discounts = 1 / np.log2(np.arange(2, k_max + 2))
    for row, rel in zip(top, relevant):
        hits = np.array([d in rel for d in row], dtype=float)
        for k in KS:
            rec[k].append(hits[:k].sum() / len(rel))
        first = np.flatnonzero(hits)
        mrr.append(1 / (first[0] + 1) if len(first) and first[0] < 10 else 0.0)
        ideal = discounts[:min(len(rel), k_max)].sum()
        ndcg.append(float((hits[:10] * discounts[:10]).sum() / ideal))
    out = {f"recall_{k}": float(np.mean(v)) for k, v in rec.items()}
    return {**out, "mrr_10": float(np.mean(mrr)), "ndcg_10": float(np.mean(ndcg))}


class RetrievalTask(Task):
    name = "retrieval"
    headline = ("ndcg_10", "recall_1", "recall_5", "recall_10", "mrr_10")
    hub_pipeline = "sentence-similarity"
    peft_task_type = "FEATURE_EXTRACTION"
    output_names = ("last_hidden_state",)
    decision_key = "results"
    capabilities = frozenset({INDEX})
    config_defaults = {"data.text_column": "query", "data.label_column": "document"}

    def __init__(self) -> None:
        self.pooling = "mean"
        self.index = None  # lmtune.index.Index of the run, set by load()
        self._corpus: list[dict] | None = None  # retrieval.corpus as read (and checked) before training
        self._neg_log_q: dict[str, float] = {}  # retrieval.logq_correction: -log(share of train positives) per document

    def state(self) -> dict:
        return {"pooling": self.pooling}

    def set_state(self, state: dict) -> None:
        self.pooling = state.get("pooling", "mean")

    def set_index(self, index) -> None:
        self.index = index

    def reads_pairs(self, cfg: Config) -> bool:
        return False  # a query alone; its documents come from the index

    # ---- data -------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[RetrievalExample]:
        d, r = cfg.data, cfg.retrieval
        rows = read_examples(path, d.text_column, d.label_column, None, d.format, d.encoding, require_label=require_label)
        negatives = self._negative_column(path, cfg, len(rows)) if r.negative_column and require_label else None
        return [RetrievalExample(ex.text, ex.label, ex.source, None, negatives=negatives[i] if negatives else [])
                for i, ex in enumerate(rows)]

    @staticmethod
    def _negative_column(path: str, cfg: Config, n: int) -> list[list[str]]:
        """retrieval.negative_column: one hard negative per row, or a JSON list of them."""
        rows = read_examples(path, cfg.retrieval.negative_column, None, None, cfg.data.format, cfg.data.encoding,
                             require_label=False)
        out = []
        for ex in rows:
            t = ex.text.strip()
            if t.startswith("["):
                try:
                    items = json.loads(t)
                except json.JSONDecodeError:
                    items = None
                if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                    file, line = ex.source.rsplit(":", 1)
                    raise InputError(f"{file}: line {line}: '{cfg.retrieval.negative_column}' starts with '[' but is not a "
                                     "JSON list of texts. Give one negative text, or a JSON list of texts.")
                out.append([x for x in items if x.strip()])
            else:
                out.append([t])
        return out[:n]

    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        train, dev, test, info = dev_and_test(self, cfg, self.read_file(d.train, cfg))
        if len(dev) < 2:
            raise InputError(f"{d.dev or d.train}: {len(dev)} dev rows; retrieval is scored by ranking dev documents and needs "
                             "at least 2 (a few hundred for a stable NDCG). Give data.dev or more data.")
        r = cfg.retrieval
        self._corpus = read_corpus(r.corpus, r.corpus_column, r.corpus_id_column, cfg) if r.corpus else None  # errors before training
        mined = mine_negatives(train, r.hard_negatives)
        if r.logq_correction:
            counts = Counter(ex.label for ex in train)
            self._neg_log_q = {doc: math.log(len(train) / n) for doc, n in counts.items()}
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        info["documents"] = {split: len({ex.label for ex in rows}) for split, rows in (("train", train), ("dev", dev), ("test", test))}
        info["hard_negatives"] = {"per_query": cfg.retrieval.hard_negatives, "mined": mined,
                                  "given": sum(bool(ex.negatives) for ex in train) - mined}
        return Splits(train, dev, test, [RELEVANT], info)

    def from_texts(self, texts: list) -> list[RetrievalExample]:
        return [RetrievalExample(t, None, "") for t in texts]

    def documents(self, texts: list[str]) -> list[RetrievalExample]:
        """Documents alone (an index's corpus)."""
        return [RetrievalExample("", t, "") for t in texts]

    def corpus(self, cfg: Config, splits: Splits) -> list[dict]:
        """What the run's index holds: retrieval.corpus rows ({"text", "id"?}), else every distinct
        document of train, dev and test."""
        r = cfg.retrieval
        if r.corpus:
            return self._corpus or read_corpus(r.corpus, r.corpus_column, r.corpus_id_column, cfg)
        seen: dict[str, None] = {}
        for ex in (*splits.train, *splits.dev, *splits.test):
            if ex.label is not None:
                seen.setdefault(ex.label)
        return [{"text": t} for t in seen]

    def audit_findings(self, splits: Splits) -> list[dict]:
        n_docs = len({ex.label for ex in splits.train})
        per = len(splits.train) / max(n_docs, 1)
        return [{"check": "retrieval_documents", "severity": "info",
                 "detail": f"train: {len(splits.train)} queries over {n_docs} distinct documents ({per:.1f} queries per document)",
                 "suggestion": "A document shared by many queries is masked from their in-batch negatives; a very small "
                               "document set gives few negatives per step.", "examples": []}]

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        self.pooling = pooling_mode(resolve_model(cfg.model.name))
        config = load_config(cfg.model.name, cfg.model.dropout, gguf=cfg.model.gguf_file)
        return load_pretrained(AutoModel, cfg.model.name, config, cfg.model.gguf_file)

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return load_pretrained(AutoModel, str(model_dir))

    # ---- encoding and batching --------------------------------------------------------------
    def encode(self, examples: list[RetrievalExample], tokenizer: Any, max_length: int,
               labels: list[str] | None = None) -> Encoded:
        texts = list(dict.fromkeys([ex.text for ex in examples if ex.text] + [ex.label for ex in examples if ex.label is not None]
                                   + [n for ex in examples for n in ex.negatives]))
        with quiet_transformers():
            full = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        too_long = {t for t, ids in zip(texts, full) if len(ids) > max_length}
        ids = dict(zip(texts, full))
        if too_long:
            cut = list(too_long)
            ids.update(zip(cut, tokenizer(cut, truncation=True, max_length=max_length)["input_ids"]))
        doc_id = {t: i for i, t in enumerate(texts)}  # the same text is the same document, wherever it appears
        features, seen = [], set()
        for ex in examples:
            first = ex.label is not None and (ex.label not in seen or not ex.text)  # a document alone is always embedded
            seen.add(ex.label)
            f = {"query": ids[ex.text] if ex.text else None,
                 "doc": ids[ex.label] if ex.label is not None else None, "doc_first": first,
                 "doc_id": doc_id[ex.label] if ex.label is not None else -1,
                 "neg_log_q": round(self._neg_log_q.get(ex.label, 0.0) * LOGQ_UNIT),
                 "negatives": [ids[n] for n in ex.negatives], "negative_ids": [doc_id[n] for n in ex.negatives]}
            f["train_length"] = max(len(x) for x in (f["query"], f["doc"], *f["negatives"]) if x is not None)
            f["length"] = max(len(x) for x in (f["query"], f["doc"] if first else None, *f["negatives"]) if x is not None)
            features.append(f)
        stats = {"truncated": sum(ex.text in too_long or ex.label in too_long for ex in examples), "examples": len(examples),
                 "max_tokens": max((len(x) for x in full), default=0)}
        return Encoded(features, examples, stats)

    def train_features(self, enc: Encoded) -> list[dict]:
        # every query's own document row, even a repeated one
        return [{**f, "train": True, "length": f["train_length"]} for f in enc.features]

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Queries, then documents, then hard negatives, as rows of one padded batch (one forward
        pass); "labels" says each row's role, example, document id and -log q (LOGQ_UNIT; 0 without
        retrieval.logq_correction) (the loop never feeds it to
        the model). Outside training a document is embedded once, at its first example: a passage
        with five questions costs one row, not five."""
        rows, roles = [], []
        for i, f in enumerate(features):
            if f["query"] is not None:
                rows.append(f["query"])
                roles.append((QUERY, i, -1, 0))
        for i, f in enumerate(features):
            if f["doc"] is not None and (f.get("train") or f["doc_first"]):
                rows.append(f["doc"])
                roles.append((POSITIVE, i, f["doc_id"], f.get("neg_log_q", 0)))
        for i, f in enumerate(features):
            for ids, did in zip(f["negatives"], f["negative_ids"]):
                rows.append(ids)
                roles.append((NEGATIVE, i, did, 0))  # mined, not sampled by frequency: no correction
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(roles, dtype=torch.long)}

    def num_items(self, features: list[dict]) -> int:
        return sum(f["query"] is not None and f["doc"] is not None for f in features)

    def _embeddings(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(outputs.last_hidden_state, batch["attention_mask"], self.pooling)

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of each query over every document row of the batch (its own positive, the other
        queries' positives and all hard negatives); rows holding the query's own document under
        another example are masked out, so a shared document is never a negative of its own query."""
        emb, roles = self._embeddings(outputs, batch), batch["labels"]
        q_rows = (roles[:, 0] == QUERY).nonzero().squeeze(1)
        d_rows = (roles[:, 0] != QUERY).nonzero().squeeze(1)
        q_example = roles[q_rows, 1]
        is_pos = (roles[d_rows, 0] == POSITIVE).unsqueeze(0) & (roles[d_rows, 1].unsqueeze(0) == q_example.unsqueeze(1))
        keep = is_pos.any(1)  # queries whose positive is in the batch (all, when training)
        q_rows, q_example, is_pos = q_rows[keep], q_example[keep], is_pos[keep]
        target = is_pos.float().argmax(1)
        own_doc = roles[d_rows, 2][target]
        same_doc = roles[d_rows, 2].unsqueeze(0) == own_doc.unsqueeze(1)
        scores = SCALE * emb[q_rows] @ emb[d_rows].T + roles[d_rows, 3].to(emb.dtype).unsqueeze(0) / LOGQ_UNIT
        scores = scores.masked_fill(same_doc & ~is_pos, float("-inf"))
        return F.cross_entropy(scores, target, reduction="none")

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.example_losses(outputs, batch).sum()

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Per example: [2, hidden] = its query's and its document's embedding (NaN where it has none)."""
        emb, roles = self._embeddings(outputs, batch).cpu().numpy(), batch["labels"].cpu().numpy()
        n = int(roles[:, 1].max()) + 1
        out = np.full((n, 2, emb.shape[1]), np.nan, dtype=np.float32)
        for row, (role, i, *_) in enumerate(roles):
            if role in (QUERY, POSITIVE):
                out[i, 0 if role == QUERY else 1] = emb[row]
        return list(out)

    # ---- metrics and outputs ------------------------------------------------------------------
    @staticmethod
    def _split_corpus(outputs: list[np.ndarray], enc: Encoded) -> tuple[list[str], np.ndarray, dict[str, int]]:
        """The distinct documents of a split and their embeddings (first occurrence)."""
        where: dict[str, int] = {}
        rows = []
        for ex, out in zip(enc.examples, outputs):
            if ex.label is not None and ex.label not in where:
                where[ex.label] = len(rows)
                rows.append(out[1])
        return list(where), (np.stack(rows) if rows else np.zeros((0, 1), np.float32)), where

    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        docs, doc_emb, where = self._split_corpus(outputs, enc)
        queries: dict[str, tuple[np.ndarray, set[int]]] = {}
        for ex, out in zip(enc.examples, outputs):
            if ex.text and ex.label is not None:
                queries.setdefault(ex.text, (out[0], set()))[1].add(where[ex.label])
        if not queries:
            return {"n": 0, "documents": len(docs), **{m: 0.0 for m in self.headline}}
        q_emb = np.stack([q for q, _ in queries.values()])
        m = ranking_metrics(q_emb @ doc_emb.T, [rel for _, rel in queries.values()])
        return {**m, "n": len(queries), "documents": len(docs)}

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], k: int = 10) -> list[dict]:
        """Each query's top documents: among the split's own documents when the examples carry them (dev,
        test), else from the run's index."""
        docs, doc_emb, where = self._split_corpus(outputs, enc)
        ids: list | None = None
        if not docs and self.index is not None:
            docs, doc_emb, ids = self.index.texts, self.index.embeddings, self.index.ids
        rows = []
        for ex, out in zip(enc.examples, outputs):
            if not ex.text:
                continue
            row: dict[str, Any] = {"query": ex.text}
            if len(docs):
                s = doc_emb @ out[0]
                top = np.argsort(-s, kind="stable")[:k]
                row["results"] = [{"document": docs[j], "score": round(float(s[j]), 6), **({"id": ids[j]} if ids else {})}
                                  for j in top]
                if ex.label is not None:
                    row["gold"] = ex.label
                    row["gold_rank"] = int((s > s[where[ex.label]]).sum()) + 1
            else:
                row["results"] = []
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"results": (list[dict], "The best documents of the run's index, best first: {document, score (cosine), id?}.")}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        lines = ["### Retrieval", "", "| split | queries | documents | NDCG@10 | recall@1 | recall@5 | recall@10 | MRR@10 |",
                 "|---|---|---|---|---|---|---|---|"]
        for split, m in split_metrics.items():
            lines.append(f"| {split} | {m['n']} | {m['documents']} | {m['ndcg_10']:.4f} | {m['recall_1']:.4f} | {m['recall_5']:.4f} "
                         f"| {m['recall_10']:.4f} | {m['mrr_10']:.4f} |")
        lines += ["", "Each query ranks every distinct document of its split (cosine similarity of the embeddings); a query with "
                  "several relevant documents counts each. The run's index (index/) holds the documents `lmtune search` ranks.", ""]
        return "\n".join(lines)


def mine_negatives(train: list[RetrievalExample], per_query: int) -> int:
    """Give each training query without given negatives its `per_query` best-scoring BM25 documents
    among the training documents that are not relevant to it; returns how many queries got some."""
    from lmtune.bm25 import BM25, tokenize
    if per_query <= 0:
        return 0
    docs = list(dict.fromkeys(ex.label for ex in train))
    if len(docs) < 2:
        return 0
    relevant: dict[str, set[int]] = {}
    index = {d: i for i, d in enumerate(docs)}
    for ex in train:
        relevant.setdefault(ex.text, set()).add(index[ex.label])
    todo = [ex for ex in train if not ex.negatives]
    bm25 = BM25([tokenize(d) for d in docs])
    top = bm25.top([tokenize(ex.text) for ex in todo], per_query + len(max(relevant.values(), key=len)))
    for ex, row in zip(todo, top):
        ex.negatives = [docs[j] for j in row if j not in relevant[ex.text]][:per_query]
    return sum(bool(ex.negatives) for ex in todo)


def read_corpus(path: str, column: str, id_column: str | None, cfg: Config) -> list[dict]:
    """retrieval.corpus: the documents an index holds, one per row ({"text", "id"?}). Without ids a repeated text
    is kept once; with ids each id is kept once, so two items that share a text stay two rankable items."""
    rows = read_examples(path, column, id_column, None, cfg.data.format, cfg.data.encoding, require_label=bool(id_column))
    if not rows:
        raise InputError(f"{path}: the corpus holds no documents.")
    seen: dict[str, dict] = {}
    for ex in rows:
        seen.setdefault(ex.label if id_column else ex.text, {"text": ex.text, **({"id": ex.label} if id_column else {})})
    return list(seen.values())

