"""Active learning: which unlabeled rows to label next, with the model's suggestions, and the loop that takes the
labels back and retrains (`lmtune label`). strategies.py: the query strategies (registered in
lmtune/registrations.py); files.py: the batch and labeled files (CSV, JSONL, Label Studio); loop.py: the loop over
run directories; cold.py: the first batch without a run (k-means on the packaged encoder, zero-shot suggestions)."""
from __future__ import annotations

from lmtune.active.loop import import_labeled, query, read_state, record_round

__all__ = ["import_labeled", "query", "read_state", "record_round"]
