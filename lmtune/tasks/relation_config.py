"""The config keys of task relation (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class RelationColumns:
    """data.* keys this task reads (they join the data section; registered in lmtune/registrations.py)."""
    head_column: str = option("head", "Relation: column (or JSON key) with the first entity, as its text (located in the sentence) "
                                      "or a [start, end] character span; without it the text carries <e1>..</e1> <e2>..</e2> markers.")
    tail_column: str = option("tail", "Relation: column (or JSON key) with the second entity (as head_column).")
