"""Batch order: a pure function of (seed, epoch), so a resumed run replays exactly the same batches."""
from __future__ import annotations

import math

import numpy as np


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of example indices.

    With group_by_length, the shuffled order is cut into chunks of `mega` batches, each chunk is
    sorted by length and cut into batches, and the batch order is shuffled again: batches hold
    examples of similar length (little padding, fast on CPU and GPU) yet stay random.
    """
    return shuffled_batches(np.random.default_rng([seed, epoch]), lengths, batch_size, group_by_length, mega)


def shuffled_batches(rng: np.random.Generator, lengths: list[int], batch_size: int, group_by_length: bool = True,
                     mega: int = 50) -> list[list[int]]:
    """epoch_batches' rule with the random stream given (a multi-task epoch draws one per task)."""
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


SAMPLING = ("temperature", "proportional", "round_robin")  # how a multi-task epoch shares its batches out


def task_shares(sizes: list[int], sampling: str, temperature: float = 2.0) -> np.ndarray:
    """Each task's share of an epoch's batches: proportional to its examples (n_k), to n_k ** (1 / T) (temperature),
    or equal (round_robin). T = 1 is proportional; a larger T moves the shares towards equal."""
    n = np.asarray(sizes, dtype=float)
    if sampling == "round_robin":
        w = np.ones_like(n)
    elif sampling == "proportional":
        w = n
    elif sampling == "temperature":
        w = n ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown sampling rule {sampling!r}; one of {SAMPLING}")
    return w / w.sum()


def _largest_remainder(shares: np.ndarray, total: int) -> list[int]:
    """Whole counts that sum to `total` in the given shares (Hamilton's rule: floors, then the largest remainders)."""
    raw = shares * total
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[:total - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def mixed_batches(groups: list[list[int]], lengths: list[int], batch_size: int, seed: int, epoch: int, sampling: str,
                  temperature: float = 2.0, group_by_length: bool = True) -> list[list[int]]:
    """One multi-task epoch: batches of feature indices, each batch from one task (`groups`: each task's indices into
    `lengths`). The epoch keeps the single-task length, ceil(N / batch_size) batches, so train.epochs and the
    schedule mean what they mean for one task; task_shares says how many batches each task gets. A task given
    more batches than it fills cycles through fresh shuffles of its examples (a small task is seen more than once);
    one given fewer sees a different subset each epoch. Round-robin alternates the tasks; the other rules shuffle
    the order. A pure function of (seed, epoch), as epoch_batches, so a resumed run replays the same batches."""
    sizes = [len(g) for g in groups]
    total = math.ceil(sum(sizes) / batch_size)
    counts = _largest_remainder(task_shares(sizes, sampling, temperature), total)
    own: list[list[list[int]]] = []
    for k, (group, count) in enumerate(zip(groups, counts)):
        batches: list[list[int]] = []
        cycle = 0
        while len(batches) < count and group:
            rng = np.random.default_rng([seed, epoch, k, cycle])
            batches += [[group[i] for i in b] for b in shuffled_batches(rng, [lengths[i] for i in group], batch_size,
                                                                         group_by_length)]
            cycle += 1
        own.append(batches[:count])
    if sampling == "round_robin":
        order = [k for r in range(max(counts, default=0)) for k in range(len(groups)) if r < counts[k]]
    else:
        order = np.random.default_rng([seed, epoch, len(groups)]).permutation(
            [k for k, c in enumerate(counts) for _ in range(c)]).tolist()
    taken = [0] * len(groups)
    out = []
    for k in order:
        out.append(own[k][taken[k]])
        taken[k] += 1
    return out


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
