"""Task multitask: several tasks, each with its own data, head, loss weight and metrics, trained over one shared
encoder (MT-DNN, Liu et al. 2019), so that one model folder answers every task in one encoder pass.

Each sub-task is an ordinary lmtune config file (`multitask.tasks`), read, encoded, scored and reported by its own
registered task, which builds its own head; nothing here names a task. What this module owns is the sharing:

- the model: one encoder, and each sub-task's transformers model with its encoder slot (base_model_prefix) holding
  a stand-in that hands over the shared encoder's output, so every head runs unchanged on one encoder pass;
- the batches: each holds one task (its own collate and loss), the tasks sharing an epoch by `multitask.sampling`
  (training.batching.mixed_batches);
- the views: the run's outputs, examples and labels cut back into each sub-task's own, for its metrics, output
  controls (calibration), predictions and report section.

A sub-task declares SHARED_ENCODER (its model is an encoder plus a head that reads only the encoder's output):
classification (and cross-encoder pairs), multilabel, regression and NER do. Raw text (predict, serve) is encoded
the way the first token-level sub-task encodes it (NER's words and windows), else as the first sub-task does, and
every head reads that one pass. Task joint is the same idea for one file with two label columns.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

import transformers
from lmtune.config import Config, build_config
from lmtune.config import load_config as load_config_file
from lmtune.errors import InputError
from lmtune.models import EncoderModule, load_config, quiet_transformers, resolve_model
from lmtune.tasks import get_task
from lmtune.tasks.base import (CALIBRATE, SHARED_ENCODER, Encoded, Splits, Task, input_pad_values, pad_rows, sub_report,
                               task_options)
from lmtune.training.batching import mixed_batches, task_shares

log = logging.getLogger("lmtune")

HEAD_FILE = "multitask_heads.safetensors"  # every sub-task's head, beside the shared encoder's own weights
CONFIG_KEY = "multitask_heads"  # config.json: {name: {"architecture", "config"}} of each head
KEPT_SECTIONS = ("model", "train")  # what a sub-task takes from the multitask config, not from its own file


@dataclass
class MultiExample:
    """One example of a multi-task run: a sub-task's own example (task >= 0, a labeled row of that task's data), or
    raw text for every sub-task (task -1: `parts` holds each sub-task's reading of it)."""
    task: int
    name: str  # the sub-task's name ("" for raw text)
    example: Any  # the sub-task's example; for raw text the encoding sub-task's
    parts: list[Any] = field(default_factory=list)  # raw text: each sub-task's example of it, in task order

    source = property(lambda self: self.example.source)
    label = property(lambda self: getattr(self.example, "label", None))  # a classification example's; None for NER's
    text_pair = property(lambda self: getattr(self.example, "text_pair", None))

    @property
    def text(self) -> str:
        """The text (the serve drift monitor embeds it)."""
        return _text_of(self.example)

    def audit_text(self) -> str:
        return f"{self.name}\t{self.example.audit_text()}"  # a text shared by two tasks is no leak

    def audit_units(self) -> list[str]:
        return [f"{self.name}: {u}" for u in self.example.audit_units()]

    def audit_gold(self) -> str | None:
        return f"{self.name}: {self.example.audit_gold()}"


class _Given(torch.nn.Module):
    """Stands in for a head's encoder: returns the shared encoder's output of the current forward pass, so a
    sub-task's transformers model runs its own head code on it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise RuntimeError("a multitask head was called outside MultiTaskModel.forward")
        return self.output


class MultiTaskOutput(dict):
    """Each head's own output object under its task name; `NAME_logits` reads one head's logits (the ONNX export's
    output names)."""

    def __getattr__(self, key: str) -> Any:
        if key.endswith("_logits") and key[:-len("_logits")] in self:
            return self[key[:-len("_logits")]].logits
        raise AttributeError(key)


class MultiTaskModel(EncoderModule):
    """One encoder and a head per task. forward runs the encoder once and every head (or, while training, the one
    task the batch's `task_index` names)."""

    def __init__(self, encoder: torch.nn.Module, heads: dict[str, PreTrainedModel]):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        for head in heads.values():
            setattr(head, head.base_model_prefix, _Given())
        self.heads = torch.nn.ModuleDict(heads)
        self.names = list(heads)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                task_index: torch.Tensor | None = None, output_hidden_states: bool | None = None, **_: Any) -> MultiTaskOutput:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           output_hidden_states=output_hidden_states, **kw)
        # training: the batch's one task's head (task_index); otherwise (eval, predict, export) every head
        names = self.names if task_index is None or not self.training else [self.names[int(task_index[0])]]
        result = MultiTaskOutput()
        result.hidden_states = out.hidden_states if output_hidden_states else None  # the drift reference embeds them
        for name in names:
            head = self.heads[name]
            given = getattr(head, head.base_model_prefix)
            given.output = out
            try:
                result[name] = head(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
            finally:
                given.output = None
        return result

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        """The encoder as transformers saves it (AutoModel loads it), each head's architecture and config in its
        config.json, and the heads' weights (the encoder's stand-ins hold none) in HEAD_FILE."""
        setattr(self.encoder.config, CONFIG_KEY, {name: {"architecture": type(head).__name__, "config": head.config.to_dict()}
                                                  for name, head in self.heads.items()})
        self.encoder.save_pretrained(path, **kw)
        save_file({f"{name}/{k}": v.contiguous() for name, head in self.heads.items() for k, v in head.state_dict().items()},
                  str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MultiTaskModel:
        config = AutoConfig.from_pretrained(path)
        with quiet_transformers():
            encoder = AutoModel.from_pretrained(path, config=config)
        weights = load_file(str(Path(path) / HEAD_FILE))
        heads = {}
        for name, spec in getattr(config, CONFIG_KEY).items():
            head_class = getattr(transformers, spec["architecture"])
            with quiet_transformers():
                # the head's own (random) encoder is built and dropped: the stand-in takes its place below
                head = head_class(type(config).from_dict(spec["config"]))
            heads[name] = head
        model = cls(encoder, heads)
        for name, head in model.heads.items():
            head.load_state_dict({k.split("/", 1)[1]: v for k, v in weights.items() if k.startswith(name + "/")})
        return model


class MultiTask(Task):
    name = "multitask"
    # the mean of the sub-tasks' first headline metrics (GLUE's average score): it picks the checkpoint, so no
    # task's best epoch is chosen at another's expense alone
    headline = ("task_mean", "loss")
    hub_loadable = False  # an encoder and several heads: no transformers pipeline reads it (the card shows lmtune.load)
    capabilities = frozenset({CALIBRATE})

    def __init__(self) -> None:
        self.names: list[str] = []
        self.tasks: list[Task] = []
        self.configs: list[Config] = []  # each sub-task's config: its own file's, with the multitask model and train
        self.labels: list[list[str]] = []  # each sub-task's own labels (the run's are "NAME: label", in task order)
        self.weights: list[float] = []
        self.sampling, self.temperature = "temperature", 2.0
        self.output_names = ()

    # ---- sub-tasks and their views ------------------------------------------------------------
    def _configure(self, names: list[str], kinds: list[str], configs: list[Config], labels: list[list[str]],
                   weights: list[float], sampling: str, temperature: float) -> None:
        self.names, self.configs, self.labels, self.weights = names, configs, labels, weights
        if [t.name for t in self.tasks] != kinds:  # a loaded run's sub-tasks (export reads its data again) keep their state
            self.tasks = [get_task(kind) for kind in kinds]
        self.sampling, self.temperature = sampling, temperature
        self.output_names = tuple(f"{n}_logits" for n in names)

    @property
    def primary(self) -> int:
        """The sub-task whose encoding raw text gets: the first token-level one (its words and windows give every
        head what it reads), else the first."""
        return next((k for k, t in enumerate(self.tasks) if t.peft_task_type == "TOKEN_CLS"), 0)

    def _view(self, k: int, outputs: list[np.ndarray], enc: Encoded) -> tuple[list[np.ndarray], Encoded, list[int]]:
        """Sub-task k's outputs and Encoded: its labeled examples, or every raw-text example (read by the primary's
        features), with its head's part of each output row; and the run's example indices they came from."""
        picked = [i for i, ex in enumerate(enc.examples) if ex.task in (k, -1)]
        at = {i: j for j, i in enumerate(picked)}
        rows = [(f, out) for f, out in zip(enc.features, outputs) if f["example"] in at]
        features = [{**f["sub"], "example": at[f["example"]]} for f, _ in rows]
        examples = [ex.example if ex.task == k else ex.parts[k] for ex in (enc.examples[i] for i in picked)]
        stats = {"truncated": 0, "examples": len(examples)}
        return [self._head_part(k, out) for _, out in rows], Encoded(features, examples, stats), picked

    def _sizes(self, row_len: int) -> list[tuple[int, int]]:
        """Each head's (start, end) in a flat output row: a sequence head's width is its label count; the token
        heads share the rest, tokens x labels each."""
        seq = [len(lab) for t, lab in zip(self.tasks, self.labels) if t.peft_task_type != "TOKEN_CLS"]
        per_token = sum(len(lab) for t, lab in zip(self.tasks, self.labels) if t.peft_task_type == "TOKEN_CLS")
        tokens = (row_len - sum(seq)) // per_token if per_token else 0
        spans, start = [], 0
        for t, lab in zip(self.tasks, self.labels):
            width = len(lab) * (tokens if t.peft_task_type == "TOKEN_CLS" else 1)
            spans.append((start, start + width))
            start += width
        return spans

    def _head_part(self, k: int, row: np.ndarray) -> np.ndarray:
        start, end = self._sizes(len(row))[k]
        part = row[start:end]
        return part.reshape(-1, len(self.labels[k])) if self.tasks[k].peft_task_type == "TOKEN_CLS" else part

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"sampling": self.sampling, "temperature": self.temperature,
                "tasks": [{"name": n, "task": t.name, "weight": w, "labels": lab, "state": t.state(),
                           "config": {k: v for k, v in c.redacted_dict().items() if k not in KEPT_SECTIONS}}
                          for n, t, w, lab, c in zip(self.names, self.tasks, self.weights, self.labels, self.configs)]}

    def set_state(self, state: dict) -> None:
        subs = state.get("tasks", [])
        self._configure([s["name"] for s in subs], [s["task"] for s in subs], [build_config(s["config"]) for s in subs],
                        [list(s["labels"]) for s in subs], [float(s["weight"]) for s in subs], state.get("sampling", "temperature"),
                        float(state.get("temperature", 2.0)))
        for task, s in zip(self.tasks, subs):
            task.set_state(s.get("state", {}))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{n}/{k}": v for n, t in zip(self.names, self.tasks) for k, v in t.arrays().items()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for n, t in zip(self.names, self.tasks):
            own = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(n + "/")}
            if own:
                t.set_arrays(own)

    def report_state(self) -> dict:
        return {n: t.report_state() for n, t in zip(self.names, self.tasks)}

    def set_report_state(self, data: dict) -> None:
        for n, t in zip(self.names, self.tasks):
            t.set_report_state(data.get(n, {}))

    @property
    def calibration(self) -> dict:
        return {}

    # ---- data -------------------------------------------------------------------------------
    def read(self, cfg: Config) -> Splits:
        m = cfg.multitask
        if cfg.peft.method != "none" or cfg.adversarial.method != "none":
            key = "peft.method" if cfg.peft.method != "none" else "adversarial.method"
            raise InputError(f"{key}: task multitask trains its shared encoder fully and without an adversary for now; "
                             f"remove {key} (or train the sub-tasks one by one).")
        names = list(m.names) or [Path(p).stem for p in m.tasks]
        if len(set(names)) != len(names):
            raise InputError(f"multitask.tasks: two sub-task files have the same name ({', '.join(names)}); set "
                             "multitask.names.")
        configs, kinds = [], []
        for path in m.tasks:
            sub = load_config_file(path)
            if sub.task == self.name or not get_task(sub.task).supports(SHARED_ENCODER):
                raise InputError(f"{path}: task {sub.task} cannot share an encoder in a multitask run (its model is not "
                                 "one encoder plus a head); sub-tasks can be classification, multilabel, regression or ner.")
            for section in KEPT_SECTIONS:
                setattr(sub, section, copy.deepcopy(getattr(cfg, section)))
            sub.train.metric = None  # task_mean picks the checkpoint; a sub-task's own rules (thresholds) follow its headline
            configs.append(sub)
            kinds.append(sub.task)
        self._configure(names, kinds, configs, [], list(m.weights) or [1.0] * len(names), m.sampling, m.temperature)
        splits = [task.read(sub) for task, sub in zip(self.tasks, configs)]
        self.labels = [s.labels for s in splits]
        wrap = lambda k, exs: [MultiExample(k, names[k], ex) for ex in exs]  # noqa: E731
        info = {"method": "multitask", "sampling": m.sampling, "tasks": {n: s.info for n, s in zip(names, splits)},
                "sizes": {split: sum(len(getattr(s, split)) for s in splits) for split in ("train", "dev", "test")}}
        shares = task_shares([len(s.train) for s in splits], m.sampling, m.temperature)
        log.info("multitask: %s; each epoch's batches: %s", m.sampling, ", ".join(
            f"{n} {100 * share:.1f}% ({len(s.train)} examples)" for n, share, s in zip(names, shares, splits)))
        for name, s in zip(names, splits):
            if not s.dev:
                raise InputError(f"multitask.tasks: sub-task {name} has no dev examples; give its data.dev.")
        return Splits(*([ex for k, s in enumerate(splits) for ex in wrap(k, getattr(s, split))] for split in ("train", "dev", "test")),
                      self._run_labels(), info)

    def audit(self, splits: Splits, truncation: dict[str, dict] | None = None, max_length: int | None = None) -> list[dict]:
        """Each sub-task's data audited on its own, as a run of that task audits it (its balance, duplicates and
        leakage are about its own labels and splits), each finding's detail naming the task; then the truncation
        counts over every task's examples."""
        from lmtune.audit import audit
        out = []
        for k, (name, task) in enumerate(zip(self.names, self.tasks)):
            own = Splits(*([ex.example for ex in getattr(splits, s) if ex.task == k] for s in ("train", "dev", "test")),
                         self.labels[k], splits.info.get("tasks", {}).get(name, {}))
            out += [{**f, "detail": f"{name}: {f['detail']}"} for f in task.audit(own, None, max_length)]
        return out + audit(Splits([], [], [], []), truncation, max_length)

    def _run_labels(self) -> list[str]:
        return [f"{n}: {lab}" for n, labels in zip(self.names, self.labels) for lab in labels]

    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None, require_label: bool = True) -> list:
        """A labeled file belongs to one sub-task: give it as NAME=FILE (evaluate --data intent=test.csv). Unlabeled
        text (predict) is read as every sub-task's input: one text per row of data.text_column, or per line."""
        name, sep, rest = path.partition("=")
        if sep and name in self.names:
            k = self.names.index(name)
            sub_labels = None if labels is None else self.labels[k]
            return [MultiExample(k, name, ex) for ex in self.tasks[k].read_file(rest, self.configs[k], sub_labels, require_label)]
        if require_label:
            raise InputError(f"{path}: a multitask run reads a labeled file as one sub-task's: give NAME=FILE, NAME one "
                             f"of {', '.join(self.names)}.")
        k = self.primary
        examples = self.tasks[k].read_file(path, self.configs[k], None, False)
        texts = [_text_of(ex) for ex in examples]
        return [_with_source(own, src.source) for own, src in zip(self.from_texts(texts), examples)]

    def from_texts(self, texts: list) -> list[MultiExample]:
        parts = [t.from_texts(list(texts)) for t in self.tasks]
        return [MultiExample(-1, "", parts[self.primary][i], [p[i] for p in parts]) for i in range(len(texts))]

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        heads, tokenizer = {}, None
        for k, (name, task, sub) in enumerate(zip(self.names, self.tasks, self.configs)):
            model, tok = task.build_model(sub, self.labels[k])
            if not isinstance(model, PreTrainedModel) or not hasattr(model, model.base_model_prefix):
                raise InputError(f"multitask.tasks: sub-task {name} built a {type(model).__name__}, not a transformers model "
                                 "with an encoder and a head (a bi-encoder pair model cannot share its encoder); use its "
                                 "cross-encoder form.")
            heads[name] = model
            tokenizer = tok if k == self.primary else tokenizer
        path = resolve_model(cfg.model.name)
        config = load_config(cfg.model.name, cfg.model.dropout)
        with quiet_transformers():
            encoder = AutoModel.from_pretrained(path, config=config)  # with its pooler, which sequence heads read
        return MultiTaskModel(encoder, heads), tokenizer

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        with quiet_transformers():
            token_level = self.tasks[self.primary].peft_task_type == "TOKEN_CLS"
            return (MultiTaskModel.from_pretrained(model_dir).eval(),
                    AutoTokenizer.from_pretrained(model_dir, **({"add_prefix_space": True} if token_level else {})))

    # ---- encoding and batches -----------------------------------------------------------------
    def encode(self, examples: list[MultiExample], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               **options: Any) -> Encoded:
        """Each sub-task's examples encoded by it (raw text by the primary); every feature keeps its sub-task's own
        ("sub", which its collate, loss and views read) and names the run's example and its task."""
        features, stats = [], {"truncated": 0, "examples": len(examples)}
        for k, task in enumerate(self.tasks):
            picked = [i for i, ex in enumerate(examples) if ex.task == k or (ex.task == -1 and k == self.primary)]
            if not picked:
                continue
            enc = task.encode([examples[i].example for i in picked], tokenizer, max_length,
                              self.labels[k] if labels else None, **task_options(task, self.configs[k]))
            stats["truncated"] += enc.stats.get("truncated", 0)
            for j, f in enumerate(enc.features):
                features.append({"input_ids": f["input_ids"], "length": f["length"], "sub": f, "task": k,
                                 "example": picked[f.get("example", j)],
                                 **({"token_type_ids": f["token_type_ids"]} if "token_type_ids" in f else {})})
        return Encoded(features, examples, stats)

    def train_features(self, enc: Encoded) -> list[dict]:
        """Each sub-task's own choice of its training features (a windowing task may cap a long text's)."""
        kept = set()
        for k, task in enumerate(self.tasks):
            own = [f for f in enc.features if f["task"] == k]
            if own:
                kept |= {id(f) for f in task.train_features(Encoded([f["sub"] for f in own], [], {}))}
        return [f for f in enc.features if id(f["sub"]) in kept]

    def train_batches(self, features: list[dict], batch_size: int, seed: int, epoch: int,
                      group_by_length: bool = True) -> list[list[int]]:
        groups = [[i for i, f in enumerate(features) if f["task"] == k] for k in range(len(self.tasks))]
        return mixed_batches(groups, [f["length"] for f in features], batch_size, seed, epoch, self.sampling,
                             self.temperature, group_by_length)

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        """A batch of one task's examples (every training batch) is its sub-task's own batch, with the task's index
        (training runs that task's head alone); any other batch (raw text, or dev rows of several tasks, on which
        every head runs) is the inputs alone."""
        tasks = {f["task"] for f in features}
        width = max(f["length"] for f in features)
        if len(tasks) == 1 and (k := tasks.pop()) >= 0:
            batch = self.tasks[k].collate([f["sub"] for f in features], tokenizer)
            batch["task_index"] = torch.full((len(features),), k, dtype=torch.long)
        else:
            batch = {"input_ids": pad_rows([f["input_ids"] for f in features], width, input_pad_values(tokenizer)["input_ids"]),
                     "attention_mask": pad_rows([[1] * f["length"] for f in features], width, 0)}
        # the same inputs in every batch (an ONNX graph's inputs are the first batch's): token types where the
        # tokenizer makes them, 0 (one text) for a task's features that carry none
        if "token_type_ids" in tokenizer.model_input_names and "token_type_ids" not in batch:
            batch["token_type_ids"] = pad_rows([f.get("token_type_ids", [0] * f["length"]) for f in features], width, 0)
        return batch

    def num_items(self, features: list[dict]) -> int:
        return self.tasks[features[0]["task"]].num_items([f["sub"] for f in features])

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's task's own summed loss on its head's output, times its weight."""
        k = int(batch["task_index"][0])
        return self.weights[k] * self.tasks[k].loss(_head(outputs, self.names[k]), batch)

    def unbatch(self, outputs: MultiTaskOutput, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """One flat row per feature: every head's own per-feature output (its task's unbatch) in task order,
        flattened; _head_part cuts them apart again."""
        per_head = [t.unbatch(_head(outputs, n), batch) for n, t in zip(self.names, self.tasks)]
        return [np.concatenate([np.asarray(h[i], dtype=np.float32).ravel() for h in per_head]) for i in range(len(per_head[0]))]

    # ---- output controls, metrics, predictions ------------------------------------------------------
    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Each sub-task that calibrates fits its own temperature on its own dev examples."""
        found = {n: t.calibrate(*self._view(k, outputs, enc)[:2], self.labels[k])
                 for k, (n, t) in enumerate(zip(self.names, self.tasks)) if t.supports(CALIBRATE)}
        temps = [float(np.mean(c["temperature"])) for c in found.values() if "temperature" in c]
        return {"decision": "each sub-task's own", "method": ", ".join(f"{n}: {c.get('method', 'temperature')}"
                                                                       for n, c in found.items()),
                "temperature": float(np.mean(temps)) if temps else 1.0, "tasks": found}

    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Each sub-task's own metrics on its own examples (under "tasks"), its headline figures flattened as
        NAME_METRIC, and task_mean: the mean of every sub-task's first headline metric."""
        per_task, flat = {}, {}
        for k, (name, task) in enumerate(zip(self.names, self.tasks)):
            outs, view, picked = self._view(k, outputs, enc)
            if not picked or any(enc.examples[i].task == -1 for i in picked):
                continue
            m = per_task[name] = task.evaluate(outs, view, self.labels[k])
            flat.update({f"{name}_{key}": float(m[key]) for key in task.headline if isinstance(m.get(key), (int, float))})
        firsts = [per_task[n][t.headline[0]] for n, t in zip(self.names, self.tasks) if n in per_task]
        loss = sum(w * per_task[n].get("loss", 0.0) for n, w in zip(self.names, self.weights) if n in per_task)
        return {"task_mean": float(np.mean(firsts)) if firsts else 0.0, "loss": float(loss), **flat,
                "n": len(enc.examples), "tasks": per_task}

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        """A labeled example's row: its task's name and that task's prediction under it; a raw text's: every task's
        prediction, each under its name."""
        rows: list[dict] = [{} for _ in enc.examples]
        for k, (name, task) in enumerate(zip(self.names, self.tasks)):
            outs, view, picked = self._view(k, outputs, enc)
            if not picked:
                continue
            for i, row in zip(picked, task.predictions(outs, view, self.labels[k])):
                ex = enc.examples[i]
                if ex.task == -1:
                    rows[i].setdefault("text", row.get("text"))
                    rows[i][name] = {key: v for key, v in row.items() if key not in ("text", "source")}
                else:
                    rows[i].update({"task": name, name: row})
        return rows

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"text": (str, "The input text."),
                **{n: (dict, f"Sub-task {n} ({t.name}): its prediction, as a {t.name} run answers.")
                   for n, t in zip(self.names, self.tasks)}}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        heads = [(n, t.headline[0]) for n, t in zip(self.names, self.tasks)]
        lines = ["## Tasks", "", "| split | task mean | " + " | ".join(f"{n} {h}" for n, h in heads) + " |",
                 "|---|---|" + "---|" * len(heads)]
        lines += [f"| {split} | {m['task_mean']:.4f} | " + " | ".join(
            f"{m['tasks'][n][h]:.4f}" if n in m["tasks"] else "" for n, h in heads) + " |" for split, m in split_metrics.items()]
        weights = ", ".join(f"{n} {w:g}" for n, w in zip(self.names, self.weights))
        rule = self.sampling + (f" (T {self.temperature:g})" if self.sampling == "temperature" else "")
        lines += ["", f"One encoder, {len(self.names)} heads. Batches shared out by {rule}; loss weights: {weights}. "
                  "Task mean (the mean of the tasks' first metrics) chooses the checkpoint.", ""]
        for k, (name, task) in enumerate(zip(self.names, self.tasks)):
            own = {s: m["tasks"][name] for s, m in split_metrics.items() if name in m["tasks"]}
            lines += [f"## {name} ({task.name})", "", sub_report(task, own, self.labels[k], run_dir, name)]
        return "\n".join(lines)


def _text_of(example: Any) -> str:
    """A sub-task example's text: a text task's own, or a word task's words joined (NER read from tokens)."""
    text = getattr(example, "text", None)
    return text if text is not None else " ".join(example.tokens)


def _head(outputs: Any, name: str) -> Any:
    """One head's output: from the model's MultiTaskOutput, or from an exported graph's outputs (NAME_logits)."""
    if isinstance(outputs, MultiTaskOutput):
        return outputs[name]
    return SimpleNamespace(logits=getattr(outputs, f"{name}_logits"), hidden_states=None)


def _with_source(example: MultiExample, source: str) -> MultiExample:
    """A raw-text example that keeps the file:line it was read from."""
    return dataclasses.replace(example, example=dataclasses.replace(example.example, source=source),
                               parts=[dataclasses.replace(p, source=source) for p in example.parts])
