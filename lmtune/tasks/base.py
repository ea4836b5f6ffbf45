"""What a task module provides. The training loop talks only to this interface."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lmtune.config import Config


@dataclass
class Splits:
    train: list
    dev: list
    test: list
    labels: list[str]
    info: dict = field(default_factory=dict)  # how the data was split, sizes, sources


@dataclass
class Encoded:
    features: list[dict]  # model inputs per example, each with a "length"
    examples: list  # the examples they came from, same order
    stats: dict = field(default_factory=dict)  # e.g. {"truncated": 3}

    @property
    def lengths(self) -> list[int]:
        return [f["length"] for f in self.features]

    def windows(self) -> list[list[dict]]:
        """The features of each example, in order. A task that windows long inputs names each
        feature's example under "example"; otherwise features and examples pair one to one."""
        out: list[list[dict]] = [[] for _ in self.examples]
        for k, f in enumerate(self.features):
            out[f.get("example", k)].append(f)
        return out


class Task(Protocol):
    name: str
    headline: tuple[str, ...]  # metric names shown in report.md and the CLI summary

    def read(self, cfg: Config) -> Splits:
        """Read and validate all data; raise InputError before anything is written."""

    def read_file(self, path: str, cfg: Config, labels: list[str] | None, require_label: bool) -> list:
        """Read one extra file (evaluate/predict) against the labels the model knows."""

    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        """Pretrained backbone + a new head, and its tokenizer."""

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        """A trained model saved in save_pretrained layout."""

    def encode(self, examples: list, tokenizer: Any, max_length: int, labels: list[str] | None) -> Encoded:
        """Token ids (+ label ids, -100 where unlabeled) and lengths; counts truncation."""

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]: ...

    def num_items(self, features: list[dict]) -> int:
        """What the loss is averaged over (examples, or labeled tokens)."""

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed (not averaged) loss, so micro-batches add up exactly."""

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Per-example outputs (e.g. logits rows) as numpy arrays."""

    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Metrics from per-feature outputs; a task whose features are windows of an example merges
        them here (enc maps features to examples). Must contain every name usable as train.metric."""

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]: ...

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        """Task-specific Markdown for report.md (tables, plots it writes into run_dir)."""


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                      focal_gamma: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over rows of [N, C] logits (labels -100 ignored), optionally class-weighted
    and focal ((1 - p_true) ** gamma down-weights what the model already gets right)."""
    logits = logits.float()
    if weight is None and not focal_gamma:
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
    ce = F.cross_entropy(logits, labels, weight=None if weight is None else weight.to(logits.device),
                         reduction="none", ignore_index=-100)
    if focal_gamma:  # p_true from the unweighted cross-entropy, which is ce itself when there are no weights
        plain = ce if weight is None else F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
        ce = ce * (1 - torch.exp(-plain)) ** focal_gamma
    return ce.sum()


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency ("balanced") class weights: each class contributes equally overall; a class
    absent from train gets the largest weight of the others rather than infinity."""
    counts = np.asarray(counts, dtype=float)
    w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return np.where(counts > 0, w, w.max() if w.any() else 1.0)
