"""Re-ranking a retrieval run's candidates with a pair run (a cross-encoder).

A bi-encoder embeds query and document apart, so it can search a whole corpus in one matrix
product but never sees the two texts together; a pair run (classification or regression on
data.text_pair_column) reads them jointly and judges relevance better, at one forward pass per
pair. So the index proposes its `depth` best and the pair run re-orders only those, the
retrieve-then-rerank pattern of sentence-transformers' CrossEncoder. (A pair run on a sentence-embedding
checkpoint is a bi-encoder by default, data.pair_encoding auto; a reranker is trained with cross.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class PairScorer(Protocol):
    """What a reranker needs of a pair run (lmtune.api.Run.relevance)."""

    def relevance(self, pairs: Sequence[tuple[str, str]], label: str | None = None) -> list[float]: ...


def rerank(pair_run: PairScorer, queries: list[str], candidates: list[list[dict]], k: int, label: str | None = None) -> list[list[dict]]:
    """Each query's candidates ({document, score, ...}) re-ordered by the pair run's relevance (kept as
    rerank_score), best first, ties in the bi-encoder's order; the k best are returned."""
    pairs = [(q, row["document"]) for q, rows in zip(queries, candidates) for row in rows]
    scores = iter(pair_run.relevance(pairs, label))
    out = []
    for rows in candidates:
        scored = [{**row, "rerank_score": round(next(scores), 6)} for row in rows]
        out.append(sorted(scored, key=lambda r: -r["rerank_score"])[:k])  # sorted is stable: ties keep the index's order
    return out
