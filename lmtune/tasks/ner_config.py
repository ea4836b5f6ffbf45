"""The config keys of task ner (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class NerColumns:
    """data.* keys this task reads (they join the data section; registered in lmtune/registrations.py)."""
    tag_scheme: str = option("auto", "NER tag scheme of the files; auto detects it. Output uses the same scheme.",
                             ("auto", "bio", "iob1", "bioes", "bilou", "bmes"))
    tag_column: int = option(-1, "NER (CoNLL): column holding the tag; -1 = last. The token is column 0.", ge=-1)
    label_all_subtokens: bool = option(False, "NER: train on every sub-token of a word (default: the first only).")
