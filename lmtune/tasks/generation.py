"""Generation: supervised fine-tuning of a decoder (causal LM) on instructions, chat turns or
source -> target pairs (dialogue -> summary), with output that is measured and kept under control.

What this module gets right that the usual scripts do not:
- the loss is on the response tokens only (the prompt is context, not something to learn), and the
  LM head is applied only where there is a target: transformers' boolean `logits_to_keep` projects
  those positions alone, so the 49k-wide vocabulary is never computed for prompt tokens (on a
  dialogue -> summary set ~85% of the tokens); a plain SFT script computes and discards them;
- optional packing of short examples into one row, with position ids restarting at each example:
  transformers then builds a block-diagonal causal mask, so no example attends to another's tokens
  (concatenating rows without that leaks context between examples);
- prompts go through the tokenizer's own chat template when it has one (the format the instruct
  model was tuned on), else a plain "### Instruction / ### Response" template; a prompt too long for
  data.max_length loses the middle of its text, never the response header or the target;
- after training, decoding settings (repetition penalty, no-repeat n-gram size, sampling) are
  chosen on dev by a seeded search that maximises ROUGE-L among settings whose outputs do not loop
  and keep a sane length (lmtune.generate_control), saved with the model and used by predict/serve;
- the test split is generated and scored with ROUGE-1/2/L (rouge-score; characters for Chinese)
  against every reference, with the control checks (repetition loops, distinct-n, length, invented
  entities and numbers, format adherence) in generation.json and report.md;
- structured output (generate.schema / choices / regex, lmtune.structured): decoding constrained by a
  grammar wherever the run generates, and the test outputs scored with and without the constraint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lmtune.config import Config
from lmtune.data.readers import Example, read_rows, row_unit
from lmtune.errors import InputError
from lmtune.models import load_config, load_pretrained
from lmtune.tasks.base import GENERATE, Encoded, Splits, Task, dev_and_test
from lmtune.tasks.generation_config import GenerateConfig  # noqa: F401  (re-exported: code and saved configs name it here)
from lmtune.tasks.preference import is_pair_row, pair_losses, response_log_probs

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class GenerationExample(Example):
    messages: list[dict] = field(default_factory=list)  # the prompt as chat turns (the last one the user's)
    references: list[str] = field(default_factory=list)  # every acceptable target ([] when unlabeled)
    context: str = ""  # the input text the output may draw names and numbers from
    rejected: str | None = None  # a preference pair's worse output (train.objective dpo / orpo; label is the chosen one)

    def audit_units(self) -> list[str]:
        return []  # no classes

    def audit_gold(self) -> str | None:
        return self.label


class GenerationTask(Task):
    name = "generation"
    headline = ("loss", "perplexity", "rougeL", "rouge1", "rouge2")
    peft_task_type = "CAUSAL_LM"
    hub_pipeline = "text-generation"
    capabilities = frozenset({GENERATE})
    decision_key = "output"
    # LoRA by default (a decoder's full fine-tuning on a laptop-class machine is rarely what one wants),
    # long enough for a dialogue and its summary, 8 per step. The learning rate is the PEFT method's own
    # (LoRA 1e-3), not the 2e-4 of the usual LoRA SFT recipe, which was set for 7B models: SmolLM2-135M's
    # adapters ended DialogSum's 75 steps at dev loss 1.508 with 2e-4 and 1.391 with 1e-3 (bench/generation.py, README)
    config_defaults = {"peft.method": "lora", "data.max_length": 1024, "train.batch_size": 8, "train.epochs": 1}

    @classmethod
    def defaults_for(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A preference objective (dpo, orpo) trains on few pairs: PREFERENCE_EPOCHS (lmtune.tasks.preference); and a
        pair is two sequences (chosen, rejected), so its micro-batches hold half as many pairs as an SFT batch holds
        rows (PREFERENCE_GRAD_ACCUM): the same optimizer batch, exact accumulation, and the SFT run's peak activation
        memory (DPO on 400-token DialogSum pairs reached 22.7 GB unsplit and was OOM-killed on a 24 GB machine)."""
        from lmtune.tasks.preference import PREFERENCE_EPOCHS, preference_grad_accum
        objective = values.get("train.objective", "sft")
        if objective == "sft":
            return dict(cls.config_defaults)
        batch = values.get("train.batch_size", cls.config_defaults["train.batch_size"])
        split = {"train.grad_accum": preference_grad_accum(batch)} if isinstance(batch, int) else {}  # else the check names it
        return {**cls.config_defaults, "train.epochs": PREFERENCE_EPOCHS, **split}

    def __init__(self) -> None:
        self.format = "source_target"
        self.instruction = ""
        self.max_new_tokens = 64
        self.decoding: dict = {}  # chosen on dev (generate_control.search); greedy until then
        self.label_set: list[str] = []
        self.json_schema: str | None = None
        # structured output (lmtune.structured): the schema itself is kept, not its file, so a saved run
        # enforces it wherever it is served
        self.schema: dict | bool | None = None
        self.regex: str | None = None
        self.choices: list[str] = []
        self.json_layout = "spaced"  # the JSON layout of the training targets (structured.json_layout)
        self.stop: list[str] = []
        self.packing = False
        self.search: dict = {}  # the decoding search's table, for the report and generation.json
        # train.objective and its weights (lmtune.tasks.preference)
        self.objective, self.beta, self.rpo_alpha, self.orpo_lambda = "sft", 0.1, 1.0, 0.1
        self.peft_method = "none"  # peft.method: whether a loaded dpo run can switch its adapter off for its reference

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": self.format, "instruction": self.instruction, "max_new_tokens": self.max_new_tokens,
                "decoding": self.decoding, "label_set": self.label_set, "json_schema": self.json_schema, "stop": self.stop,
                "schema": self.schema, "regex": self.regex, "choices": self.choices, "json_layout": self.json_layout,
                "objective": self.objective, "peft_method": self.peft_method}

    def set_state(self, state: dict) -> None:
        for k in ("format", "instruction", "max_new_tokens", "decoding", "label_set", "json_schema", "stop", "schema", "regex",
                  "choices", "json_layout", "objective", "peft_method"):
            if k in state:
                setattr(self, k, state[k])

    @property
    def constraint(self):
        """The structured.Constraint that decoding follows everywhere (predict, evaluate, the decoding
        search, serve, the dashboard), or None: generate.schema, regex, or choices (label_set is choices)."""
        from lmtune.structured import Constraint
        if self.schema is not None:
            return Constraint(schema=self.schema, json_layout=self.json_layout)
        if self.regex:
            return Constraint(regex=self.regex)
        if self.choices or self.label_set:
            return Constraint(choices=tuple(dict.fromkeys(self.choices or self.label_set)))
        return None

    def report_state(self) -> dict:
        return {"search": self.search}

    def set_report_state(self, data: dict) -> None:
        self.search = data.get("search", {})

    def configure(self, cfg: Config) -> None:
        g = cfg.generate
        self.instruction, self.max_new_tokens, self.packing = g.instruction, g.max_new_tokens, g.packing
        self.label_set, self.json_schema, self.stop = list(g.label_set), g.json_schema, list(g.stop)
        self.regex, self.choices = g.regex or None, list(g.choices)  # the schema file is read once, by read()
        t = cfg.train
        self.objective, self.beta, self.rpo_alpha, self.orpo_lambda = t.objective, t.beta, t.rpo_alpha, t.orpo_lambda
        self.peft_method = cfg.peft.method

    def default_lr(self, cfg: Config) -> float | None:
        from lmtune.tasks.preference import preference_lr
        return preference_lr(cfg.peft.method) if cfg.train.objective != "sft" else None

    def before_fit(self, model, features: list[dict], collate, device: torch.device) -> None:
        """dpo: the reference log-probs of every pair (train, dev, test), from the model as built (before any
        step the policy is its own reference, whatever the PEFT method)."""
        if self.objective == "dpo":
            from lmtune.tasks.preference import fill_reference
            fill_reference(model.to(device), [f for f in features if "rejected_ids" in f], collate, device)

    def prepare_outputs(self, model, features: list[dict], collate, device: torch.device) -> None:
        """A loaded dpo run scoring pairs (lmtune evaluate RUN pairs.jsonl): its reference is its model with the
        adapter switched off, which only the methods declared `disables` can do (lmtune/registrations.py)."""
        pairs = [f for f in features if "rejected_ids" in f]
        if self.objective != "dpo" or not pairs:
            return
        from lmtune.peft import can_disable, is_peft
        if not (is_peft(model) and can_disable(self.peft_method)):
            from lmtune.registry import peft_methods
            how = ("was fully fine-tuned and keeps no reference model" if self.peft_method == "none" else
                   f"was trained with peft.method {self.peft_method}, whose adapter cannot be switched off to give back "
                   "its starting model (the reference)")
            raise InputError(f"this dpo run {how}, so its DPO loss on pairs cannot be computed; evaluate it on "
                             f"prompt/reference rows instead (or train with peft.method "
                             f"{' or '.join(peft_methods.names(disables=True))}).")
        from lmtune.tasks.preference import fill_reference
        fill_reference(model, pairs, collate, device, adapter_off=True)

    def reads_pairs(self, cfg: Config) -> bool:
        return False

    # ---- data ----------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[GenerationExample]:
        self.configure(cfg)
        rows = read_rows(path, cfg.data.format, cfg.data.encoding)
        if not rows:
            raise InputError(f"{path}: no rows.")
        unit = row_unit(path)
        if self.objective != "sft" and is_pair_row(rows[0][1]):  # preference pairs (TRL's layout)
            return [self._pair_example(row, f"{path}: {unit} {line}", f"{path}:{line}") for line, row in rows]
        fmt = cfg.generate.format if cfg.generate.format != "auto" else _detect_format(rows[0][1], cfg)
        if fmt is None:
            raise InputError(f"{path}: {row_unit(path)} {rows[0][0]}: cannot tell the format: expected 'instruction' and "
                             f"'output' (Alpaca), 'messages' (chat), or the '{cfg.data.text_column}' column (source_target: "
                             "set data.text_column / data.label_column). Or set generate.format.")
        self.format = fmt
        return [self._example(row, fmt, cfg, f"{path}: {unit} {line}", f"{path}:{line}", require_label) for line, row in rows]

    def _pair_example(self, row: dict, where: str, source: str) -> GenerationExample:
        """A preference pair: its prompt wrapped as an SFT prompt is (the instruction before a text, or the
        chat turns as given), chosen as the label, rejected beside it; its references are the row's own
        when it has them (the data's targets), else chosen."""
        from lmtune.tasks.preference import pair_fields, pair_references
        prompt, chosen, rejected = pair_fields(row, where)
        references = pair_references(row, chosen, where)
        if isinstance(prompt, str):
            self.format = "source_target"  # predict and serve wrap a text the same way
            messages = [{"role": "user", "content": f"{self.instruction}\n\n{prompt}" if self.instruction else prompt}]
            context = prompt
        else:
            self.format = "chat"
            messages, context = list(prompt), "\n".join(m["content"] for m in prompt)
        return GenerationExample(context, chosen, source, messages=messages, references=references, context=context,
                                 rejected=rejected)

    def _example(self, row: dict, fmt: str, cfg: Config, where: str, source: str, require: bool) -> GenerationExample:
        if fmt == "chat":
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                                 and m.get("role") in ("system", "user", "assistant") for m in msgs):
                raise InputError(f"{where}: 'messages' must be a non-empty list of {{role: system|user|assistant, content}}.")
            labeled = msgs[-1]["role"] == "assistant"
            prompt = msgs[:-1] if labeled else msgs
            if not prompt or prompt[-1]["role"] != "user":
                raise InputError(f"{where}: the conversation must end with a user turn (and then, to train on, the assistant's).")
            refs = [msgs[-1]["content"]] if labeled else []
            context = "\n".join(m["content"] for m in prompt)
        elif fmt == "instruction":
            ins = row.get("instruction")
            if not isinstance(ins, str) or not ins.strip():
                raise InputError(f"{where}: needs a non-empty 'instruction'.")
            extra = row.get("input") or ""
            if not isinstance(extra, str):
                raise InputError(f"{where}: 'input' must be text, got {type(extra).__name__}.")
            context = f"{ins}\n\n{extra}" if extra.strip() else ins
            prompt = [{"role": "user", "content": context}]
            out = row.get("output")
            refs = [out] if isinstance(out, str) and out.strip() else []
        else:
            src = row.get(cfg.data.text_column)
            if not isinstance(src, str) or not src.strip():
                raise InputError(f"{where}: no text in column '{cfg.data.text_column}' (data.text_column).")
            context = src
            prompt = [{"role": "user", "content": f"{self.instruction}\n\n{src}" if self.instruction else src}]
            cols = [cfg.data.label_column, *cfg.generate.reference_columns]
            refs = [row[c].strip() for c in cols if isinstance(row.get(c), str) and row[c].strip()]
        if require and not refs:
            raise InputError(f"{where}: no target to train or score on ({_target_name(fmt, cfg)}).")
        return GenerationExample(context, refs[0] if refs else None, source, messages=prompt, references=refs, context=context)

    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        self._read_constraint(cfg)  # a bad schema or regex fails before anything is trained
        train, dev, test, info = dev_and_test(self, cfg, self.read_file(d.train, cfg))
        if self.objective != "sft" and any(ex.rejected is None for ex in train):
            raise InputError(f"{d.train}: line 1: train.objective {self.objective} trains on preference pairs: give rows with "
                             "prompt, chosen, rejected (TRL's layout; `lmtune prefer RUN` makes them), or set train.objective sft.")
        if self.schema is not None:
            from lmtune.structured import json_layout
            self.json_layout = json_layout([ex.label for ex in train if ex.label])
        if not dev:
            raise InputError(f"{d.train}: too few rows to split off a dev set; give data.dev.")
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        info["format"] = self.format
        return Splits(train, dev, test, ["output"], info)

    def _read_constraint(self, cfg: Config) -> None:
        """generate.schema read and checked (kept in the task state), generate.regex checked against
        xgrammar, generate.json_schema (reporting only) checked."""
        from lmtune.structured import check_regex, read_schema
        g = cfg.generate
        if g.json_schema:
            from lmtune.generate_control import load_schema
            load_schema(g.json_schema)
        self.schema = read_schema(g.schema, "generate.schema") if g.schema else None
        if g.regex:
            check_regex(g.regex, "generate.regex")

    def from_texts(self, texts: list) -> list[GenerationExample]:
        out = []
        for t in texts:
            content = f"{self.instruction}\n\n{t}" if self.format == "source_target" and self.instruction else t
            out.append(GenerationExample(t, None, "", messages=[{"role": "user", "content": content}], context=t))
        return out

    def from_messages(self, messages: list[dict]) -> GenerationExample:
        """A conversation so far (ending with the user's turn) as one prompt: `lmtune chat`."""
        return GenerationExample(messages[-1]["content"], None, "", messages=list(messages), context="\n".join(
            m["content"] for m in messages))

    # ---- model ---------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        config = load_config(cfg.model.name, cfg.model.dropout, gguf=cfg.model.gguf_file)
        model, tokenizer = load_pretrained(AutoModelForCausalLM, cfg.model.name, config, cfg.model.gguf_file)
        if cfg.generate.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return _no_forward_cache(model), tokenizer

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        model, tokenizer = load_pretrained(AutoModelForCausalLM, str(model_dir))
        return _no_forward_cache(model), tokenizer

    # ---- encoding --------------------------------------------------------------------------------
    def prompt_ids(self, ex: GenerationExample, tokenizer: Any) -> list[int]:
        """The prompt as the model was tuned to read it: its chat template, or the plain one."""
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = PLAIN_TEMPLATE.format(prompt="\n\n".join(m["content"] for m in ex.messages))
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode(self, examples: list[GenerationExample], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               **options) -> Encoded:
        """Prompt + target + end-of-text; labels on the target tokens only. A prompt that leaves no room
        loses the middle of its tokens (its start and its response header stay); a target longer than
        half of max_length is cut (and counted)."""
        eos = tokenizer.eos_token_id

        def target_ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"][: max_length // 2] + ([eos] if eos is not None else [])

        features, cut = [], 0
        for k, ex in enumerate(examples):
            prompt = self.prompt_ids(ex, tokenizer)
            target = target_ids(ex.label) if ex.label is not None else []
            rejected = target_ids(ex.rejected) if ex.rejected is not None and self.objective != "sft" else None
            room = max_length - max(len(target), len(rejected or []))
            if len(prompt) > room:
                head = room // 2
                prompt = prompt[:head] + prompt[len(prompt) - (room - head):]
                cut += 1
            f = {"input_ids": prompt + target, "length": len(prompt) + len(target), "prompt_length": len(prompt),
                 "example": k}
            if rejected is not None:  # a pair: both outputs after the same prompt, collated as two rows
                f.update(rejected_ids=prompt + rejected, chosen_length=f["length"], rejected_length=len(prompt) + len(rejected),
                         length=len(prompt) + max(len(target), len(rejected)))
            features.append(f)
        return Encoded(features, examples, {"examples": len(examples), "truncated": cut})

    def train_features(self, enc: Encoded) -> list[dict]:
        pairs = any("rejected_ids" in f for f in enc.features)  # a pair's two rows stay side by side, unpacked
        return pack(enc.features, max(f["length"] for f in enc.features)) if self.packing and not pairs else enc.features

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Right-padded rows; labels[i, p] is the token at p + 1 where that is a target (-100 elsewhere),
        and logits_to_keep marks those positions, so the LM head runs on them alone. Packed rows
        (several examples) carry restarting position ids and no attention mask, from which
        transformers builds the block-diagonal causal mask. Preference pairs: n pairs are 2n rows, the
        chosen outputs first, with reference_logps (n, 2) for DPO."""
        if features and "rejected_ids" in features[0]:
            rows = ([{"input_ids": f["input_ids"], "length": f["chosen_length"], "prompt_length": f["prompt_length"]}
                     for f in features] +
                    [{"input_ids": f["rejected_ids"], "length": f["rejected_length"], "prompt_length": f["prompt_length"]}
                     for f in features])
            batch = self.collate(rows, tokenizer)
            batch["reference_logps"] = torch.tensor([f.get("reference", (0.0, 0.0)) for f in features], dtype=torch.float)
            return batch
        width = max(f["length"] for f in features)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        n = len(features)
        ids = torch.full((n, width), pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        packed = any("starts" in f for f in features)
        pos = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            L = f["length"]
            row = torch.tensor(f["input_ids"])
            ids[i, :L] = row
            mask[i, :L] = 1
            starts = f.get("starts", [0])
            bounds = [*starts, L]
            for (a, b), p in zip(zip(bounds, bounds[1:]), f.get("prompt_lengths", [f["prompt_length"]])):
                pos[i, a:b] = torch.arange(b - a)
                t0 = a + p  # first target token of this example
                if t0 < b:
                    labels[i, t0 - 1:b - 1] = row[t0:b]
            if L < width:  # the padding is a sequence of its own (packed rows have no attention mask)
                pos[i, L:] = torch.arange(width - L)
        batch = {"input_ids": ids}
        if packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        if (labels != -100).any():
            batch["labels"] = labels
            batch["logits_to_keep"] = labels != -100
        return batch

    def num_items(self, features: list[dict]) -> int:
        if features and "rejected_ids" in features[0]:
            return len(features)  # the preference loss is per pair
        return sum(f.get("targets", f["length"] - f["prompt_length"]) for f in features)

    def _token_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["labels"][batch["logits_to_keep"]]
        logits = outputs.logits.float().reshape(-1, outputs.logits.size(-1))
        return F.cross_entropy(logits, targets, reduction="none")

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return self._pair_terms(outputs, batch)[0].sum()
        return self._token_losses(outputs, batch).sum()

    def _pair_terms(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per pair: loss, chosen and rejected rewards, the chosen output's summed log-prob and token count."""
        logps, counts = response_log_probs(outputs, batch)
        losses, chosen, rejected = pair_losses(self.objective, logps, counts, batch["reference_logps"], self.beta,
                                               self.orpo_lambda, self.rpo_alpha)
        n = losses.shape[0]
        return losses, chosen, rejected, logps[:n].detach(), counts[:n]

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = batch["logits_to_keep"].nonzero()[:, 0]
        return torch.zeros(batch["input_ids"].shape[0], device=rows.device).index_add_(0, rows, self._token_losses(outputs, batch))

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Per row: [summed negative log-likelihood of its targets, number of targets]."""
        n = batch["input_ids"].shape[0]
        if "reference_logps" in batch:  # per pair: [loss, chosen reward, rejected reward, chosen NLL, chosen tokens]
            parts = torch.stack([t.float() for t in self._pair_terms(outputs, batch)], 1).cpu().numpy()
            parts[:, 3] *= -1
            return list(parts.astype(float))
        if "labels" not in batch:
            return [np.zeros(2) for _ in range(n)]
        nll = self.example_losses(outputs, batch).cpu().numpy()
        count = batch["logits_to_keep"].sum(1).cpu().numpy()
        return [np.array([nll[i], count[i]], dtype=float) for i in range(n)]

    # ---- metrics -------------------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Teacher-forced loss per target token and perplexity; generation metrics are added by
        score_generations after training (generating every dev example at each evaluation would cost
        more than the training). Preference pairs: the mean pair loss, reward accuracy (the share of pairs
        whose chosen output earns the higher reward), the mean reward margin, and the chosen outputs' perplexity."""
        if outputs and len(outputs[0]) == 5:
            a = np.stack(outputs)
            nll = float(a[:, 3].sum() / max(a[:, 4].sum(), 1))
            return {"loss": float(a[:, 0].mean()), "reward_accuracy": float(np.mean(a[:, 1] > a[:, 2])),
                    "reward_margin": float(np.mean(a[:, 1] - a[:, 2])), "perplexity": float(math.exp(min(nll, 50.0))),
                    "n": len(enc.examples), "pairs": len(outputs)}
        total = np.sum(outputs, axis=0) if outputs else np.zeros(2)
        loss = float(total[0] / total[1]) if total[1] else 0.0
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "n": len(enc.examples),
                "target_tokens": int(total[1])}

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        rows = []
        for ex, out in zip(enc.examples, outputs):
            if len(out) == 5:  # a preference pair
                rows.append({"prompt": ex.context, "loss": round(float(out[0]), 6), "chosen_reward": round(float(out[1]), 6),
                             "rejected_reward": round(float(out[2]), 6), **({"source": ex.source} if ex.source else {})})
                continue
            row = {"prompt": ex.context, "loss": round(float(out[0] / out[1]), 6) if out[1] else None}
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"output": (str, "The generated text."),
                "tokens": (int, "Tokens generated."),
                "finished": (bool, "False when generation stopped at max_new_tokens rather than at the end of text.")}

    # ---- generation (GENERATE) ------------------------------------------------------------------
    def generate(self, model, tokenizer: Any, examples: list[GenerationExample], device: torch.device,
                 settings: dict | None = None, progress: str = "auto", max_new_tokens: int | None = None,
                 streamer: Any = None, constraint: Any = "run") -> list[dict]:
        from lmtune.generate_control import generate_outputs
        chosen = {**self.decoding, **(settings or {})}
        if max_new_tokens:  # asked for explicitly (a request, the chat): it replaces the length cap chosen on dev
            chosen.pop("max_new_tokens", None)
        return generate_outputs(self, model, tokenizer, examples, device, chosen, max_new_tokens or self.max_new_tokens,
                                progress, streamer, constraint)

    def compare_unconstrained(self, model, tokenizer: Any, examples: list[GenerationExample], device: torch.device,
                              constrained: list[dict], progress: str = "auto") -> dict:
        """Under a constraint, the same examples generated once more without it (same decoding), and
        {"structured": validity, ROUGE-L and exact match both ways}; {} without one."""
        from lmtune.generate_control import structured_comparison
        if self.constraint is None:
            return {}
        free = self.generate(model, tokenizer, examples, device, progress=progress, constraint=None)
        return {"structured": structured_comparison(examples, constrained, free, self.constraint)}

    def fit_decoding(self, model, tokenizer: Any, examples: list[GenerationExample], device: torch.device, seed: int,
                     trials: int, progress: str = "auto") -> dict:
        from lmtune.generate_control import search_decoding
        self.search = search_decoding(self, model, tokenizer, examples, device, seed, trials, progress)
        self.decoding = self.search["chosen"]
        return self.search

    def score_generations(self, examples: list[GenerationExample], generated: list[dict]) -> dict:
        from lmtune.generate_control import score
        return score(examples, generated, self.label_set, self.json_schema, self.constraint)

    def generation_rows(self, examples: list[GenerationExample], generated: list[dict]) -> list[dict]:
        rows = []
        for ex, g in zip(examples, generated):
            row = {"prompt": ex.context, "output": g["text"], "tokens": g["tokens"], "finished": g["finished"]}
            if ex.references:
                row["references"] = ex.references
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        from lmtune.generate_control import report_section
        text = report_section(split_metrics, self.search, self.decoding)
        pairs = {s: m for s, m in split_metrics.items() if "reward_accuracy" in m}
        if pairs:
            lines = ["", "### Preference tuning", "", "| split | objective | pairs | pair loss | reward accuracy | reward margin |",
                     "|---|---|---|---|---|---|"]
            lines += [f"| {s} | {self.objective} | {m.get('pairs', m.get('n'))} | {m['loss']:.4f} | "
                      f"{m['reward_accuracy']:.3f} | {m['reward_margin']:.4f} |" for s, m in pairs.items()]
            lines += ["", "Reward accuracy: the share of pairs whose chosen output earns the higher reward (DPO: beta x "
                      "the log-prob gain over the reference; ORPO: lambda x the mean log-prob)."]
            text = text + "\n".join(lines) + "\n" + _prefer_lines(run_dir)
        return text


def _prefer_lines(run_dir: Path) -> str:
    """A run made by `lmtune prefer`: how its pairs were made (prefer.json), chosen against rejected."""
    import json
    path = Path(run_dir) / "prefer.json"
    if not path.is_file():
        return ""
    p = json.loads(path.read_text())
    lines = ["", f"Pairs made by `lmtune prefer` from {p['from_run']}: the greedy output and {p['train']['k']} samples per "
             "prompt, ranked by ROUGE-L minus penalties, best against worst.", "",
             "| split | prompts | pairs | | ROUGE-L | loops | hit max tokens | invented |", "|---|---|---|---|---|---|---|---|"]
    for split in ("train", "dev"):
        s = p[split]
        for side in ("chosen", "rejected"):
            m = s.get(side) or {}
            if m:
                lines.append(f"| {split} | {s['prompts']} | {s['pairs']} | {side} | {m['rougeL']:.4f} | {m['loop_share']:.1%} | "
                             f"{m['capped_share']:.1%} | {m['invented_share']:.1%} |")
    return "\n".join(lines) + "\n"


def _no_forward_cache(model: torch.nn.Module) -> torch.nn.Module:
    """A plain forward pass (training, dev loss) builds no KV cache: transformers only reads packed rows'
    restarting position ids as example boundaries when there is no cache, and a cache there is waste.
    generate() turns it on for itself (GenerationConfig.use_cache)."""
    model.config.use_cache = False
    return model


def _detect_format(row: dict, cfg: Config) -> str | None:
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "instruction"
    if cfg.data.text_column in row:
        return "source_target"
    return None


def _target_name(fmt: str, cfg: Config) -> str:
    return {"chat": "a last turn with role assistant", "instruction": "a non-empty 'output'"}.get(
        fmt, f"column '{cfg.data.label_column}' (data.label_column) or generate.reference_columns")


def pack(features: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing of examples into rows of at most max_length tokens. Each packed row
    keeps where its examples start and their prompt lengths (collate restarts the positions there)."""
    rows: list[dict] = []
    for f in sorted(features, key=lambda f: -f["length"]):
        row = next((r for r in rows if r["length"] + f["length"] <= max_length), None)
        if row is None:
            row = {"input_ids": [], "length": 0, "starts": [], "prompt_lengths": [], "targets": 0, "examples": []}
            rows.append(row)
        row["starts"].append(row["length"])
        row["examples"].append(f["example"])
        row["prompt_lengths"].append(f["prompt_length"])
        row["input_ids"] = row["input_ids"] + f["input_ids"]
        row["length"] += f["length"]
        row["targets"] += f["length"] - f["prompt_length"]
    for r in rows:
        r["prompt_length"] = r["prompt_lengths"][0]
    return rows
