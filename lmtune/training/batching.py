"""Batch order: a pure function of (seed, epoch), so a resumed run replays exactly the same batches."""
from __future__ import annotations

import numpy as np


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of example indices.

    With group_by_length, the shuffled order is cut into chunks of `mega` batches, each chunk is
    sorted by length and cut into batches, and the batch order is shuffled again: batches hold
    examples of similar length (little padding, fast on CPU and GPU) yet stay random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    lens = np.asarray(lengths)
    span = batch_size * mega
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def eval_batches(lengths: list[int], tokens_per_batch: int = 8192, max_batch: int = 256) -> list[list[int]]:
    """Inference batches sorted by length under a token budget (callers restore the order)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, cur, width = [], [], 0
    for i in order.tolist():
        w = max(width, lengths[i])
        if cur and (w * (len(cur) + 1) > tokens_per_batch or len(cur) >= max_batch):
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches
