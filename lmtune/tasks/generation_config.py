"""The config keys of task generation (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class GenerateConfig:
    """The `generate` config section, owned by this task (registered in lmtune/registrations.py)."""
    format: str = option("auto", "task generation: how rows are read: instruction (Alpaca: instruction, input, output), chat "
                                 "(messages: [{role, content}], the last assistant turn is the target), source_target "
                                 "(data.text_column -> data.label_column, e.g. dialogue -> summary); auto picks by the first row's keys.",
                         ("auto", "instruction", "chat", "source_target"))
    instruction: str = option("Summarize the following text.", "source_target: the instruction put before each source text.")
    reference_columns: list = option([], "source_target: extra reference columns of an eval file (e.g. [summary1, summary2, summary3]); "
                                         "ROUGE takes the best reference per example.")
    packing: bool = option(False, "Pack several short training examples into one row (position ids restart at each example, so "
                                  "attention never crosses examples); fewer pad tokens, same loss.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, about 30% more time.")
    max_new_tokens: int = option(64, "Most tokens generated per output (the server caps requests at its own limit).", ge=1)
    search_trials: int = option(6, "Decoding settings tried on dev after training (seeded; greedy is always one): the best ROUGE-L "
                                   "among settings that pass the repetition and length checks is saved for predict and serve; 0 = greedy.",
                                ge=0)
    search_examples: int = option(40, "Dev examples the decoding search generates for.", ge=1)
    eval_examples: int = option(0, "Test examples generated for ROUGE after training (0 = all).", ge=0)
    label_set: list = option([], "Targets that are labels: decoding is constrained to these strings and exact match is reported.")
    json_schema: str | None = option(None, "A JSON schema file the outputs must follow: the share that parses and validates is reported.")
    stop: list = option([], "Stop strings: generation ends when one is produced (it is cut from the output).")
