"""PNG plots for report.md (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lmtune.io import atomic_path


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curve(history: list[dict], metric: str, path: Path) -> None:
    """Train loss per step and the dev metric at each evaluation, on twin axes."""
    train = [h for h in history if "train_loss" in h]
    evals = [h for h in history if f"dev_{metric}" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in train], [h["train_loss"] for h in train], color="tab:blue", alpha=0.8, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h[f"dev_{metric}"] for h in evals], "o-", color="tab:orange",
                 label=f"dev {metric}")
        ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    ax.set_title("Learning curve")
    fig.tight_layout()
    save_figure(fig, path)


def active_learning_curve(points: list[dict], metric: str, path: Path) -> None:
    """The labeling loop's learning curve: the dev metric of each run against its labeled train rows."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["labels"] for p in points], [p["dev"] for p in points], "o-", color="tab:orange")
    for p in points:
        ax.annotate(p["run"], (p["labels"], p["dev"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("labeled train rows")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title("Active learning: labels vs dev metric")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def confusion_matrix(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    n = len(labels)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if n <= 20:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def optimization_history(numbers: list[int], values: list[float], states: list[str], metric: str, path: Path) -> None:
    """Each trial's dev metric (pruned trials at their last report, hollow) and the best so far."""
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(n, v) for n, v, s in zip(numbers, values, states) if s == "complete"]
    pruned = [(n, v) for n, v, s in zip(numbers, values, states) if s != "complete"]
    if done:
        ax.scatter(*zip(*done), color="tab:blue", label="complete", zorder=3)
        best, run = [], None
        for n, v in done:
            run = v if run is None or v > run else run
            best.append((n, run))
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), facecolors="none", edgecolors="tab:gray", label="pruned (last report)", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"dev {metric}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
