"""The config keys of task joint (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class JointConfig:
    """The `joint` config section, owned by task joint (registered in lmtune/registrations.py).

    Why 1.0 and 1.0: JointBERT (Chen et al. 2019) adds the two cross-entropies unweighted, and here both
    terms are on the same scale (the intent's cross-entropy per utterance, the slots' mean cross-entropy
    per word of the utterance), so equal weights favour neither head. Raise slot_weight when the slots
    lag behind the intent (many slot types, few examples of each)."""
    intent_weight: float = option(1.0, "task joint: weight of the intent head's cross-entropy in the loss.", ge=0)
    slot_weight: float = option(1.0, "task joint: weight of the slot head's cross-entropy (mean over each utterance's words) "
                                     "in the loss.", ge=0)
    slot_loss: str = option("utterance", "task joint: how the slot term weighs words: utterance (the mean cross-entropy of "
                                         "each utterance's words: every utterance alike) or word (every word alike across the "
                                         "batch, as NER and JointBERT weigh them; scaled by train's mean words per utterance).",
                            ("utterance", "word"))
    unseen_labels: str = option("error", "task joint: an intent or slot type that dev or test has and train has not: error (stop "
                                         "at its file and line), or count_wrong (kept, and counted as an error in every joint "
                                         "figure, as JointBERT's UNK label counts them: ATIS's test set has such rows).",
                                ("error", "count_wrong"))


@dataclass
class JointColumns:
    """data.* keys task joint reads (they join the data section; registered in lmtune/registrations.py). A
    JointBERT folder (seq.in, seq.out, label) needs none of them."""
    tokens_column: str = option("tokens", "task joint: the column of an utterance's words (a JSON list, or one string split "
                                          "on whitespace); rows without it are read from data.text_column (unlabeled input).")
    slot_tags_column: str = option("tags", "task joint: the column of one slot tag per word (a JSON list, or one string split "
                                           "on whitespace), in data.tag_scheme.")
    intent_column: str = option("intent", "task joint: the column of the utterance's intent label.")
