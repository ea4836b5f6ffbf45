"""The config keys of task multilabel (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class MultiLabelColumns:
    """data.* keys this task reads (they join the data section; registered in lmtune/registrations.py)."""
    label_separator: str = option(",", "Multi-label: separator of the labels in one column (a JSON list needs none).")
    label_columns: list | None = option(None, "Multi-label: one 0/1 column per label instead of a label column.")
