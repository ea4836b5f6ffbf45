"""The training history as it grows: a loop callback that appends each new history row (per-step train
loss, per-evaluation dev metrics) to the run's events.jsonl, so that a dashboard can chart a run while it
trains. history.jsonl is still written once, atomically, when training ends; this file is the live view.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def _finite(row: dict) -> dict:
    """NaN and infinities as null: JSON readers (a browser's JSON.parse) refuse the bare NaN token."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class LiveEvents:
    """callback(state) for train_loop: appends state.history's new rows to `path`, one JSON object a line.

    Appending (not temp+rename) is the point: a reader tails the file while it grows, and a line is
    written whole with one write call, so a reader sees complete lines or a partial last line it skips.
    The first call rewrites the file from the whole history, so a resumed run's file matches its state."""

    def __init__(self, path: Path) -> None:
        self.path, self.done = Path(path), None

    def __call__(self, state) -> None:
        rows = state.history
        if self.done is None:
            self.path.write_text("", encoding="utf-8")
            self.done = 0
        if len(rows) <= self.done:
            return
        text = "".join(json.dumps(_finite(r)) + "\n" for r in rows[self.done:])
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
        self.done = len(rows)
