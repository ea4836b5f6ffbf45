"""The config keys of task generation (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option
from lmtune.errors import InputError

CONSTRAINT_KEYS = ("schema", "choices", "regex", "label_set")  # each constrains decoding: at most one is set


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
    schema: str | None = option(
        None, path=True, help="A JSON Schema file the output must follow: decoding is constrained to it (xgrammar) in predict, "
                                      "evaluate, serve and the dashboard, and the share of outputs that validate, and ROUGE-L, are "
                                      "reported with and without the constraint. At most one of schema, choices, regex, label_set.")
    choices: list = option([], "The output is exactly one of these strings (constrained decoding, as for schema); exact match and "
                               "the share inside the set are reported with and without the constraint.")
    regex: str | None = option(None, "A regular expression the whole output must match (constrained decoding, as for schema).")
    label_set: list = option([], "Targets that are labels: the output is one of these strings (the same constraint as choices) "
                                 "and the share inside the set is reported.")
    json_schema: str | None = option(None, path=True, help="A JSON schema file for reporting only: the share of outputs that parse and validate "
                                           "(decoding is not constrained; generate.schema constrains it).")
    stop: list = option([], "Stop strings: generation ends when one is produced (it is cut from the output).")

    def validate(self, cfg, where: str) -> None:
        """At most one constraint, and json_schema (reporting) not beside schema (which reports too); the
        choices and the regex are checked here, the schema file when the data is read (GenerationTask.read)."""
        given = [f"generate.{k}" for k in CONSTRAINT_KEYS if getattr(self, k)]
        if len(given) > 1:
            raise InputError(f"{where}: {' and '.join(given)} each constrain the output; set only one of them "
                             "(label_set is choices whose targets are the labels).")
        if self.schema and self.json_schema:
            raise InputError(f"{where}: generate.schema already reports the share of outputs that validate; "
                             "drop generate.json_schema (reporting only).")
        for key in ("choices", "label_set"):
            values = getattr(self, key)
            bad = next((v for v in values if not isinstance(v, str) or not v.strip()), None)
            if bad is not None:
                raise InputError(f"{where}: generate.{key}: every entry must be a non-empty string, got {bad!r}.")
        twice = next((v for i, v in enumerate(self.choices) if v in self.choices[:i]), None)
        if twice is not None:
            raise InputError(f"{where}: generate.choices: {twice!r} is listed twice; give each string once.")
        if self.regex:
            import re
            try:
                re.compile(self.regex)
            except re.error as e:
                raise InputError(f"{where}: generate.regex: not a valid regular expression ({e}).") from None


OBJECTIVES = ("sft", "dpo", "orpo")


@dataclass
class PreferenceOptions:
    """train.objective and its weights: preference tuning of task generation (registered in lmtune/registrations.py
    into the train section, so the keys read train.objective, train.beta, train.rpo_alpha, train.orpo_lambda)."""
    objective: str = option("sft", "task generation: sft learns the targets; dpo and orpo learn from preference pairs "
                                   "(train/dev rows with prompt, chosen, rejected, TRL's layout): DPO against the starting model "
                                   "(its adapter disabled), ORPO without a reference. `lmtune prefer RUN` makes the pairs. A preference run "
                                   "defaults to 3 epochs and 0.3 x the PEFT method's learning rate.", OBJECTIVES)
    beta: float = option(0.1, "dpo: how far the tuned model may move from the reference (DPO's beta, TRL's default 0.1); "
                              "lower lets it move further.", gt=0)
    rpo_alpha: float = option(1.0, "dpo: weight of the chosen output's length-averaged NLL added to the DPO loss (RPO, "
                                   "Pang et al. 2024, whose default 1.0 this is; TRL: loss_type ['sigmoid', 'sft']). DPO "
                                   "alone lowers the chosen output's likelihood too and the mass moves to outputs no pair "
                                   "shows (longer ones, a late end token); 0 is plain DPO.", ge=0)
    orpo_lambda: float = option(0.1, "orpo: the weight of the odds-ratio term beside the chosen output's NLL "
                                     "(TRL ORPOConfig.beta, default 0.1).", gt=0)
