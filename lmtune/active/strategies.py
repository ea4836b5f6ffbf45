"""Query strategies: which pool rows to label next. Each is one function `(pool: PoolView, k) -> [(row, score)]`
(pool indices in the order picked, each with the strategy's score: higher = more worth labeling) and one
registration in lmtune/registrations.py (`query_strategies.register(NAME, "module:function", multilabel=...)`).

- entropy: the predictive entropy of the calibrated probabilities (multi-label: the sum of each label's binary
  entropy, the labels being independent sigmoids);
- margin: 1 - (best - second best probability) (Scheffer et al. 2001); multi-label: 1 - 2 * the smallest distance
  of a label's probability to its decision threshold (the least sure label decides);
- coreset: greedy k-center on the run's embeddings, the labeled train rows as the first centres (Sener & Savarese
  2018, "Active Learning for Convolutional Neural Networks: A Core-Set Approach"); the score is the distance to the
  nearest centre when picked;
- badge: k-means++ seeding on the gradient embeddings of the last layer, (p - y_hat) (x) h, for the model's own
  prediction y_hat (Ash et al. 2020, "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds"); for
  multi-label the binary cross-entropy's gradient, y_hat the labels above their thresholds; the score is the
  gradient embedding's norm;
- random: a seeded random sample (the baseline every strategy should beat).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmtune.tasks.base import LabelScores

Picks = list[tuple[int, float]]


@dataclass
class PoolView:
    """What a strategy may read about the candidate pool rows; the embeddings are computed on first use, so a
    strategy pays only for what it reads."""
    scores: LabelScores  # the calibrated probabilities of every candidate
    seed: int = 0
    embed_pool: Callable[[], np.ndarray] | None = None  # [candidates, hidden] the run's embeddings
    embed_labeled: Callable[[], np.ndarray] | None = None  # [labeled rows, hidden]
    penultimate: Callable[[], np.ndarray] | None = None  # [candidates, hidden] what the output layer reads
    _cache: dict = field(default_factory=dict)

    def _get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            fn = getattr(self, name)
            if fn is None:
                raise ValueError(f"this pool view has no {name}")
            self._cache[name] = np.asarray(fn(), dtype=np.float32)
        return self._cache[name]

    def pool_embeddings(self) -> np.ndarray:
        return self._get("embed_pool")

    def labeled_embeddings(self) -> np.ndarray:
        return self._get("embed_labeled")

    def penultimate_features(self) -> np.ndarray:
        return self._get("penultimate")

    def __len__(self) -> int:
        return len(self.scores.probs)


def top(score: np.ndarray, k: int) -> Picks:
    """The k highest scores, best first (ties: the earlier pool row first, so picks are deterministic)."""
    order = np.argsort(-score, kind="stable")[:k]
    return [(int(i), float(score[i])) for i in order]


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1)


def entropy(pool: PoolView, k: int) -> Picks:
    p = pool.scores.probs
    if pool.scores.exclusive:
        return top(_entropy(p), k)
    binary = np.stack([p, 1 - p], -1)  # each label a yes/no distribution of its own
    return top(_entropy(binary).sum(-1), k)


def margin(pool: PoolView, k: int) -> Picks:
    p = pool.scores.probs
    if pool.scores.exclusive:
        two = np.sort(p, 1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], 1)
        return top(1.0 - (two[:, 1] - two[:, 0]), k)
    t = 0.5 if pool.scores.thresholds is None else pool.scores.thresholds
    return top(1.0 - 2 * np.abs(p - t).min(1), k)


def coreset(pool: PoolView, k: int) -> Picks:
    """Greedy k-center (Sener & Savarese's k-Center-Greedy): each pick is the candidate farthest from every
    labeled row and every pick before it. Distances from the labeled rows are taken in chunks, so memory stays
    at candidates x chunk."""
    from sklearn.metrics import pairwise_distances
    x = pool.pool_embeddings()
    labeled = pool.labeled_embeddings()
    nearest = np.full(len(x), np.inf, dtype=np.float64)
    for start in range(0, len(labeled), 2048):
        nearest = np.minimum(nearest, pairwise_distances(x, labeled[start:start + 2048]).min(1))
    picks: Picks = []
    for _ in range(min(k, len(x))):
        i = int(np.argmax(nearest))  # inf when nothing is labeled yet: the first candidate, then the farthest
        picks.append((i, float(nearest[i]) if np.isfinite(nearest[i]) else 0.0))
        nearest = np.minimum(nearest, pairwise_distances(x, x[i:i + 1]).ravel())
        nearest[i] = -1.0  # never again
    return picks


def gradient_embeddings(scores: LabelScores, h: np.ndarray) -> np.ndarray:
    """BADGE's g = (p - y_hat) (x) h: the gradient of the loss (softmax cross-entropy; binary cross-entropy per
    label for multi-label) w.r.t. the output layer's weights, taking the model's own prediction y_hat as the label."""
    residual = scores.probs - scores.decided().astype(np.float64)
    return (residual[:, :, None] * h[:, None, :]).reshape(len(h), -1).astype(np.float32)


def badge(pool: PoolView, k: int) -> Picks:
    """k-means++ seeding on the gradient embeddings: each next point drawn in proportion to its squared distance to
    those picked (D^2 sampling), so the batch is uncertain (long gradients) and diverse. Written here rather than
    with scikit-learn's kmeans_plusplus because BADGE starts from the longest gradient (the reference code's
    init_centers), where scikit-learn draws the first centre uniformly (a certain row, with no gradient, may be it)."""
    g = gradient_embeddings(pool.scores, pool.penultimate_features()).astype(np.float64)
    norms = np.linalg.norm(g, axis=1)
    k = min(k, len(g))
    if k == 0:
        return []
    rng = np.random.default_rng(pool.seed)
    chosen = [int(np.argmax(norms))]
    d2 = ((g - g[chosen[0]]) ** 2).sum(1)
    while len(chosen) < k and d2.sum() > 0:  # a picked point is at distance 0: never drawn again
        i = int(rng.choice(len(g), p=d2 / d2.sum()))
        chosen.append(i)
        d2 = np.minimum(d2, ((g - g[i]) ** 2).sum(1))
    rest = [i for i, _ in top(norms, len(g)) if i not in set(chosen)]  # all left sit on picks: the longest gradients
    return [(i, float(norms[i])) for i in (chosen + rest)[:k]]


def random(pool: PoolView, k: int) -> Picks:
    rng = np.random.default_rng(pool.seed)
    order = rng.permutation(len(pool))[:k]
    return [(int(i), 0.0) for i in order]
