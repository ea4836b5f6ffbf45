"""Stratified, seeded train/dev/test splitting.

Hand-written rather than sklearn's train_test_split because that one refuses classes with fewer
than two examples; here a rare class simply stays in train, and the split stays reproducible.
"""
from __future__ import annotations

import numpy as np


def stratified_split(labels: list, fractions: list[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices for train/dev/test; every class is divided in the same proportions."""
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, dev, test = [], [], []
    for y in sorted(by_class, key=str):
        idx = np.array(by_class[y])
        rng.shuffle(idx)
        n = len(idx)
        n_dev = round(n * fractions[1])
        n_test = round(n * fractions[2])
        while n - n_dev - n_test < 1 and (n_dev or n_test):  # train keeps at least one of each class
            if n_dev >= n_test:
                n_dev -= 1
            else:
                n_test -= 1
        dev += idx[:n_dev].tolist()
        test += idx[n_dev:n_dev + n_test].tolist()
        train += idx[n_dev + n_test:].tolist()
    return sorted(train), sorted(dev), sorted(test)


def resample_indices(labels: list, mode: str, seed: int) -> list[int]:
    """Indices of a class-balanced training set: every class repeated up to the largest one
    (oversample) or cut down to the smallest one (undersample); seeded, order shuffled."""
    rng = np.random.default_rng([seed, 7])
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    sizes = [len(v) for v in by_class.values()]
    target = max(sizes) if mode == "oversample" else min(sizes)
    out: list[int] = []
    for y in sorted(by_class, key=str):
        idx = np.array(by_class[y])
        reps = np.concatenate([rng.permutation(idx) for _ in range(-(-target // len(idx)))])
        out += reps[:target].tolist()
    return rng.permutation(out).tolist()
