"""Joint intent + slot filling (JointBERT, Chen et al. 2019): one encoder, a sequence-classification head on
the pooled [CLS] output for the utterance's intent and a token-classification head for its BIO slot tags, so
one forward pass gives both.

The task is the registered combination of classification and NER: it owns the model, the data layout and
the joint figures (sentence accuracy, the loss weights), and delegates the rest to a ClassificationTask (the
intent: probabilities, temperature, confusion matrix, abstention) and a NerTask (the slots: sub-word
alignment and windows, Viterbi decoding, seqeval F1, span output), each given its own view of the outputs.

Data: rows with the utterance's words, one slot tag per word and the intent (data.tokens_column /
slot_tags_column / intent_column: tokens, tags, intent), or a JointBERT folder (seq.in: the space-tokenised
utterance; seq.out: its tags; label: its intent; line-aligned), the layout SNIPS and ATIS ship in.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import ModelOutput

from lmtune.config import Config
from lmtune.data.ner_readers import NerExample, convert, example_from_text, split_words
from lmtune.data.readers import Example, cell_text, read_rows, read_text_file, row_unit
from lmtune.data.splits import stratified_split
from lmtune.data.tagging import bio_labels, detect_scheme, from_bio, split_tag
from lmtune.errors import InputError
from lmtune.models import EncoderModule, load_config, quiet_transformers, resolve_model, set_padding
from lmtune.tasks.base import ABSTAIN, CALIBRATE, Encoded, Splits, Task, input_pad_values, sub_report
from lmtune.tasks.classification import ClassificationTask, _sort_labels
from lmtune.tasks.ner import NerTask

log = logging.getLogger("lmtune")

HEAD_FILE = "joint_heads.safetensors"  # the two heads, beside the encoder's own weights
JOINTBERT_FILES = ("seq.in", "seq.out", "label")  # words, slot tags, intent: one utterance per line

# the sub-tasks' prediction and response keys, as a joint prediction names them (None: left out)
INTENT_KEYS = {"label": "intent", "score": "score", "probabilities": "intent_probabilities", "abstained": "abstained",
               "top_label": "top_intent", "gold": "gold_intent"}
SLOT_KEYS = {"entities": "slots", "abstained_entities": "abstained_slots", "tags": "tags", "gold": "gold_tags"}


@dataclass
class JointExample(NerExample):
    """An utterance's words and slot tags (a NerExample, so NER's encoding and decoding read it as it is) and
    its intent."""
    label: str | None = None  # the intent; None when unlabeled

    def audit_units(self) -> list[str]:
        """What the audit counts for balance: the intent and the slot types."""
        return ([self.label] if self.label is not None else []) + super().audit_units()

    def audit_gold(self) -> str | None:
        return f"{self.label} | {super().audit_gold()}"

    def intent_view(self) -> Example:
        """The utterance as a classification example (what ClassificationTask's evaluation reads)."""
        return Example(self.text if self.text is not None else " ".join(self.tokens), self.label, self.source)


@dataclass
class JointOutput(ModelOutput):
    intent_logits: torch.Tensor | None = None
    slot_logits: torch.Tensor | None = None
    hidden_states: tuple | None = None


class JointModel(EncoderModule):
    """An encoder with two heads: a linear intent classifier on the pooled output (the encoder's pooler where
    it has one, as BertForSequenceClassification does, else the first token) and a linear slot tagger on every
    token. The head sizes are in the encoder's config.json (joint_intents, joint_slots)."""

    def __init__(self, encoder: torch.nn.Module, num_intents: int, num_slots: int, dropout: float = 0.1):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.dropout = torch.nn.Dropout(dropout)
        self.intent_classifier = torch.nn.Linear(encoder.config.hidden_size, num_intents)
        self.slot_classifier = torch.nn.Linear(encoder.config.hidden_size, num_slots)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, **_: Any) -> JointOutput:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           output_hidden_states=output_hidden_states, **kw)
        hidden = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        pooled = hidden[:, 0] if pooled is None else pooled
        return JointOutput(intent_logits=self.intent_classifier(self.dropout(pooled)),
                           slot_logits=self.slot_classifier(self.dropout(hidden)),
                           hidden_states=out.hidden_states if output_hidden_states else None)

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        self.encoder.save_pretrained(path, **kw)
        heads = {f"{name}.{k}": v.contiguous() for name in ("intent_classifier", "slot_classifier")
                 for k, v in getattr(self, name).state_dict().items()}
        save_file(heads, str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> JointModel:
        config = AutoConfig.from_pretrained(path)
        with quiet_transformers():
            model = cls(AutoModel.from_pretrained(path, config=config), len(config.joint_intents), len(config.joint_slots))
        heads = load_file(str(Path(path) / HEAD_FILE))
        for name in ("intent_classifier", "slot_classifier"):
            getattr(model, name).load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith(name + ".")})
        return model


class JointTask(Task):
    name = "joint"
    # sentence accuracy first (it picks the checkpoint): an utterance is handled right only when its intent and
    # every slot are, and it is the one figure that rewards both heads; choosing on one head's metric keeps
    # checkpoints where the other still lags
    headline = ("sentence_accuracy", "intent_accuracy", "slot_f1", "loss")
    hub_pipeline = "token-classification"
    hub_loadable = False  # two heads in one model: no transformers pipeline reads it (the card shows lmtune.load)
    peft_task_type = "TOKEN_CLS"  # a head per token (peft keeps both heads trainable: modules_to_save)
    output_names = ("intent_logits", "slot_logits")
    decision_key = "intent"
    span_key = "slots"
    encode_options = NerTask.encode_options  # the slots' windows and sub-token labels
    capabilities = frozenset({CALIBRATE, ABSTAIN})

    def __init__(self) -> None:
        self.intent = ClassificationTask()
        self.slots = NerTask()
        self.intent_labels: list[str] = []
        self.slot_labels: list[str] = []
        self.intent_weight = self.slot_weight = 1.0
        self.slot_loss = "utterance"  # joint.slot_loss: how the slot term weighs an utterance's words
        self.words_per_utterance = 1.0  # slot_loss word: train's mean labeled positions per window (the term's scale)

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"intent_labels": self.intent_labels, "slot_labels": self.slot_labels, "intent": self.intent.state(),
                "slots": self.slots.state(), "intent_weight": self.intent_weight, "slot_weight": self.slot_weight,
                "slot_loss": self.slot_loss, "words_per_utterance": self.words_per_utterance}

    def set_state(self, state: dict) -> None:
        self.intent_labels, self.slot_labels = list(state["intent_labels"]), list(state["slot_labels"])
        self.intent.set_state(state.get("intent", {}))
        self.slots.set_state(state.get("slots", {}))
        self.intent_weight, self.slot_weight = state.get("intent_weight", 1.0), state.get("slot_weight", 1.0)
        self.slot_loss = state.get("slot_loss", "utterance")
        self.words_per_utterance = float(state.get("words_per_utterance", 1.0))

    def report_state(self) -> dict:
        return {"intent": self.intent.report_state(), "slots": self.slots.report_state()}

    def set_report_state(self, data: dict) -> None:
        self.intent.set_report_state(data.get("intent", {}))
        self.slots.set_report_state(data.get("slots", {}))

    @property
    def calibration(self) -> dict:
        return self.intent.calibration

    def _set_labels(self, intents: list[str], slots: list[str]) -> list[str]:
        """The run's labels: the intents, then the slot tags (lmtune.json keeps them; the state says which is which)."""
        self.intent_labels, self.slot_labels = intents, slots
        return [*intents, *slots]

    # ---- data -------------------------------------------------------------------------------
    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training data given. Set data.train to a file or a JointBERT folder "
                             "(seq.in, seq.out, label).")
        if cfg.joint.intent_weight + cfg.joint.slot_weight <= 0:
            raise InputError("joint.intent_weight, joint.slot_weight: both are 0, so nothing would be trained. Give one a "
                             "positive weight.")
        if cfg.abstain.score != "probability":
            raise InputError(f"abstain.score {cfg.abstain.score}: task joint abstains on the intent's probability only.")
        self.intent.configure(cfg)
        self.intent_weight, self.slot_weight = cfg.joint.intent_weight, cfg.joint.slot_weight
        self.slot_loss = cfg.joint.slot_loss
        files = _split_files(d.train, d.dev, d.test)
        raw = {name: _read_raw(path, cfg, True) for name, path in files.items()}
        # one scheme for the whole data set, as NER detects it
        scheme = d.tag_scheme if d.tag_scheme != "auto" else detect_scheme(
            [r[1] for rows, _ in raw.values() for r in rows if r[1] is not None])
        self.slots.scheme = scheme
        repairs: list[str] = []  # tags that broke the scheme, repaired as NER repairs them (its report lists them)
        train = _examples(files["train"], *raw["train"], scheme, repairs=repairs)
        types = {split_tag(t)[1] for ex in train for t in ex.tags if t != "O"}
        if not types:
            raise InputError(f"{files['train']}: no slots in the training data (every tag is O).")
        intents = _sort_labels({ex.label for ex in train})
        labels = self._set_labels(intents, bio_labels(types))
        read = {name: _examples(files[name], *raw[name], scheme, types, set(intents) | {cfg.abstain.oos_label},
                                unseen=cfg.joint.unseen_labels, repairs=repairs) for name in ("dev", "test") if name in files}
        self.slots.repairs = repairs
        train, dev, test, info = _split(train, read, d.split, cfg.train.seed, files)
        if not dev:
            raise InputError(f"{files['train']}: too few examples to split off a dev set; give data.dev or more data.")
        info.update(sizes={"train": len(train), "dev": len(dev), "test": len(test)}, tag_scheme=scheme,
                    tag_scheme_repairs={"count": len(repairs), "first": repairs[:100]},
                    intents=len(intents), slot_types=len(types))
        return Splits(train, dev, test, labels, info)

    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[JointExample]:
        """A file or JointBERT folder for a trained run (evaluate, predict), read in the run's tag scheme."""
        scheme = cfg.data.tag_scheme if cfg.data.tag_scheme != "auto" else self.slots.scheme
        types = intents = None
        if labels is not None:
            intents, slots = labels[:len(self.intent_labels)], labels[len(self.intent_labels):]
            types = {split_tag(t)[1] for t in slots if t != "O"}
            intents = set(intents) | {cfg.abstain.oos_label}
        return _examples(path, *_read_raw(path, cfg, require_label), scheme, types, intents, require_label,
                         cfg.joint.unseen_labels)

    def from_texts(self, texts: list[str]) -> list[JointExample]:
        out = []
        for t in texts:
            ex = example_from_text(t)
            out.append(JointExample(ex.tokens, None, ex.source, ex.text, ex.offsets))
        return out

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        path = resolve_model(cfg.model.name)
        config = load_config(cfg.model.name, cfg.model.dropout)
        config.joint_intents, config.joint_slots = self.intent_labels, self.slot_labels  # config.json: load knows the heads
        with quiet_transformers():
            # byte-level BPE tokenizers take pre-split words only with a prefix space (as NER loads them)
            tokenizer = AutoTokenizer.from_pretrained(path, add_prefix_space=True)
            encoder = AutoModel.from_pretrained(path, config=config)
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"model.name: {cfg.model.name} has no fast tokenizer; slot tags need word ids for alignment.")
        dropout = getattr(config, "classifier_dropout", None) or getattr(config, "hidden_dropout_prob", None) or 0.1
        model = JointModel(encoder, len(self.intent_labels), len(self.slot_labels), dropout)
        set_padding(model, tokenizer)
        return model, tokenizer

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        with quiet_transformers():
            return JointModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir, add_prefix_space=True)

    # ---- encoding: NER's (sub-word alignment, windows), each window also carrying its utterance's intent -----
    def encode(self, examples: list[JointExample], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               **options: Any) -> Encoded:
        intents, slots = (self._parts(labels) if labels else (None, None))
        known = set(slots or [])
        enc = self.slots.encode([_known_tags(ex, known) for ex in examples] if slots else examples, tokenizer, max_length,
                                slots, **options)
        index = {lab: i for i, lab in enumerate(intents or [])}
        for f in enc.features:
            f["intent"] = index.get(examples[f["example"]].label, -100)  # an intent train never had: no target
        return Encoded(enc.features, examples, enc.stats)

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        """NER's batch, with the targets as one [batch, tokens, 2] tensor: the slot tag, then the intent on every
        token. "labels" stays the one target key the loop keeps from the model, and its sequence dimension is
        padded (pad_values) like the slot tags' were, so the GPU fast path's length buckets work unchanged."""
        batch = self.slots.collate(features, tokenizer)
        slot = batch["labels"]
        intent = torch.tensor([f["intent"] for f in features], dtype=torch.long)[:, None].expand_as(slot)
        batch["labels"] = torch.stack([slot, torch.where(batch["attention_mask"].bool(), intent, -100)], -1)
        return batch

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        return {**input_pad_values(tokenizer), "labels": -100}

    def num_items(self, features: list[dict]) -> int:
        return len(features)  # example_losses is per utterance (window)

    def train_features(self, enc: Encoded) -> list[dict]:
        """All of them (NER's rule); with joint.slot_loss word, their mean count of labeled positions is kept as the
        slot term's scale."""
        features = self.slots.train_features(enc)
        counts = [sum(1 for x in f["labels"] if x != -100) for f in features]
        if counts and any(counts):
            self.words_per_utterance = float(np.mean(counts))
        return features

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """w_intent * CE(intent) + w_slots * the slot term, per utterance (window). joint.slot_loss utterance (default):
        the mean CE of the utterance's labeled words, so both terms are the cross-entropy of one decision (the weights'
        scale). word: the words' summed CE over train's mean words per utterance, so every word weighs alike across the
        batch (NER's loss, and JointBERT's mean over all the batch's tokens) while the term keeps a per-word mean's
        scale. Either way the summed loss adds up exactly over micro-batches."""
        labels = batch["labels"]
        slot_gold, intent_gold = labels[..., 0], labels[:, 0, 1]
        intent_ce = F.cross_entropy(outputs.intent_logits.float(), intent_gold, reduction="none", ignore_index=-100)
        logits = outputs.slot_logits.float()
        token_ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), slot_gold.reshape(-1), reduction="none",
                                   ignore_index=-100).view(slot_gold.shape)
        if self.slot_loss == "word":
            slot_ce = token_ce.sum(1) / self.words_per_utterance
        else:
            slot_ce = token_ce.sum(1) / (slot_gold != -100).sum(1).clamp(min=1)
        return self.intent_weight * intent_ce + self.slot_weight * slot_ce

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.example_losses(outputs, batch).sum()

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """One flat row per window: the intent logits (classification's unbatch), then the [tokens, tags] slot
        log-probabilities (NER's) flattened; _views splits them again. One array per window keeps every
        consumer of outputs (the ONNX check compares rows) working unchanged."""
        intent = self.intent.unbatch(SimpleNamespace(logits=outputs.intent_logits, hidden_states=None), batch)
        slots = self.slots.unbatch(SimpleNamespace(logits=outputs.slot_logits), batch)
        return [np.concatenate([i.astype(np.float32), s.astype(np.float32).ravel()]) for i, s in zip(intent, slots)]

    # ---- the sub-tasks' views ---------------------------------------------------------------------
    def _parts(self, labels: list[str]) -> tuple[list[str], list[str]]:
        n = len(self.intent_labels)
        return labels[:n], labels[n:]

    def decision_labels(self, labels: list[str]) -> list[str]:
        return self._parts(labels)[0]

    def span_types(self, labels: list[str]) -> list[str]:
        return self.slots.span_types(self._parts(labels)[1])

    def _views(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]):
        """(intent outputs, intent Encoded, intent labels), (slot outputs, slot Encoded, slot labels)."""
        intents, slots = self._parts(labels)
        n = len(intents)
        intent_out = [o[:n] for o in outputs]
        slot_out = [o[n:].reshape(-1, len(slots)) for o in outputs]
        intent_enc = Encoded(enc.features, [ex.intent_view() for ex in enc.examples], enc.stats)
        known = set(slots)
        slot_enc = Encoded(enc.features, [_known_tags(ex, known) for ex in enc.examples], enc.stats)
        return (intent_out, intent_enc, intents), (slot_out, slot_enc, slots)

    # ---- output controls --------------------------------------------------------------------------
    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Each head's temperature on dev, as classification and NER fit theirs (the slot one changes no tag)."""
        intent, slots = self._views(outputs, enc, labels)
        found = self.intent.calibrate(*intent)
        return {**found, "slots": self.slots.calibrate(*slots)}

    def fit_threshold(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], target: str,
                      value: float | None, calibrated: bool = True, score: str | None = None) -> dict:
        """The intent's abstention threshold (classification's): below it the intent is the abstain label."""
        return self.intent.fit_threshold(*self._views(outputs, enc, labels)[0], target, value, calibrated, score)

    # ---- metrics and predictions --------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """The joint figures, over every example and its original labels (an intent or slot type train never had,
        kept by joint.unseen_labels count_wrong, counts as an error), and each head's own metrics under "intent"
        and "slots" (classification's and NER's, which leave such labels out)."""
        from seqeval.metrics import f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2
        intent, slots = self._views(outputs, enc, labels)
        im, sm = self.intent.evaluate(*intent), self.slots.evaluate(*slots)
        logits, _ = self.intent.split_outputs(*intent)
        intent_right = logits.argmax(-1) == self.intent._gold(intent[1], intent[2])  # gold -1 (unseen) is never right
        gold = [ex.tags for ex in enc.examples]
        pred = [tags for tags, _ in self.slots.decode(*slots)[0]]
        slots_right = np.array([g == p for g, p in zip(gold, pred)], dtype=bool)
        n = len(enc.examples)
        seq = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        return {"sentence_accuracy": float((intent_right & slots_right).mean()) if n else 0.0,
                "intent_accuracy": float(intent_right.mean()) if n else 0.0, "intent_macro_f1": im["macro_f1"],
                "slot_f1": float(f1_score(gold, pred, **seq)), "slot_precision": float(precision_score(gold, pred, **seq)),
                "slot_recall": float(recall_score(gold, pred, **seq)),
                "slot_exact_match": float(slots_right.mean()) if n else 0.0,
                "loss": self.intent_weight * im["loss"] + self.slot_weight * sm["loss"], "n": n,
                "intent": im, "slots": sm}

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        intent, slots = self._views(outputs, enc, labels)
        rows = []
        for ex, ir, sr in zip(enc.examples, self.intent.predictions(*intent), self.slots.predictions(*slots)):
            row = {k: sr[k] for k in ("text", "tokens") if k in sr}
            row.update({INTENT_KEYS[k]: v for k, v in ir.items() if k in INTENT_KEYS})
            row.update({SLOT_KEYS[k]: v for k, v in sr.items() if k in SLOT_KEYS})
            if ex.tags is not None:  # as given (the slot view reads a type train never had as O)
                row["gold_tags"] = from_bio(ex.tags, self.slots.scheme)
            if "source" in sr:
                row["source"] = sr["source"]
            rows.append(row)
        return rows

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        fields = {INTENT_KEYS[k]: v for k, v in self.intent.response_fields().items() if k in INTENT_KEYS}
        fields["score"] = (float, "Calibrated probability of the predicted intent.")
        return {**fields, **{SLOT_KEYS[k]: v for k, v in self.slots.response_fields().items() if k in SLOT_KEYS}}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        intents, slots = self._parts(labels)
        lines = ["## Intent and slots", "", "| split | sentence accuracy | intent accuracy | slot F1 | slot exact match |", "|---|---|---|---|---|"]
        lines += [f"| {split} | {m['sentence_accuracy']:.4f} | {m['intent_accuracy']:.4f} | {m['slot_f1']:.4f} | "
                  f"{m['slot_exact_match']:.4f} |" for split, m in split_metrics.items()]
        lines += ["", "Sentence accuracy: the intent and every slot tag right (it chooses the checkpoint). Loss weights: "
                  f"intent {self.intent_weight:g}, slots {self.slot_weight:g}.", "",
                  "## Intent", "", sub_report(self.intent, {s: m["intent"] for s, m in split_metrics.items()}, intents,
                                                 run_dir, "intent"),
                  "## Slots", "", sub_report(self.slots, {s: m["slots"] for s, m in split_metrics.items()}, slots,
                                                run_dir, "slots")]
        return "\n".join(lines)


# ---- reading -----------------------------------------------------------------------------------
def _split_files(train: str, dev: str | None, test: str | None) -> dict[str, str]:
    """The train / dev / test sources: as given, or, when data.train is a folder of JointBERT split folders
    (train/, valid/ or dev/, test/ as SNIPS and ATIS ship), those not given."""
    files = {"train": train, **({"dev": dev} if dev else {}), **({"test": test} if test else {})}
    root = Path(train)
    if root.is_dir() and not (root / "seq.in").is_file() and (root / "train" / "seq.in").is_file():
        files["train"] = str(root / "train")
        for name, folders in (("dev", ("valid", "dev")), ("test", ("test",))):
            found = [root / f for f in folders if (root / f / "seq.in").is_file()]
            if name not in files and found:
                files[name] = str(found[0])
    return files


def read_jointbert(folder: str | Path) -> list[dict]:
    """A labeled JointBERT folder (seq.in, seq.out, label) as rows {"tokens", "tags", "intent"}, checked as training
    reads it (line counts, one tag per word): what a bench writes single-task files from (text + intent for
    classification, tokens + tags for NER)."""
    raw, intents = _read_folder(Path(folder), True)
    return [{"tokens": r[0], "tags": r[1], "intent": intent} for r, (intent, _) in zip(raw, intents)]


def _read_raw(path: str, cfg: Config, require_label: bool) -> tuple[list[tuple], list[tuple[str | None, str]]]:
    """The sentences as NER's converter takes them, (tokens, tags, where, text, offsets, None), tags in the file's
    own scheme, and each one's intent with where it was read (file: line)."""
    if Path(path).is_dir():
        return _read_folder(Path(path), require_label)
    d = cfg.data
    raw, intents = [], []
    unit = row_unit(path)
    for line, row in read_rows(path, d.format, d.encoding):
        where = f"{path}: {unit} {line}"
        tokens = _words(row.get(d.tokens_column), d.tokens_column, where)
        text = offsets = None
        if tokens is None:  # unlabeled text: its words as NER splits a text
            text = cell_text(row.get(d.text_column), d.text_column, where, False)
            if text is None:
                raise InputError(f"{where}: no words: give column '{d.tokens_column}' (or '{d.text_column}' for unlabeled "
                                 f"text; columns are: {', '.join(map(repr, row))}). Set data.tokens_column.")
            offsets = split_words(text)
            tokens = [text[s:e] for s, e in offsets]
        tags = _words(row.get(d.slot_tags_column), d.slot_tags_column, where)
        if tags is not None and len(tags) != len(tokens):
            raise InputError(f"{where}: {len(tags)} slot tags for {len(tokens)} words; give one tag per word in "
                             f"'{d.slot_tags_column}'.")
        intent = cell_text(row.get(d.intent_column), d.intent_column, where, False)
        if require_label and (tags is None or intent is None):
            key = "slot_tags_column" if tags is None else "intent_column"
            raise InputError(f"{where}: no value in column '{getattr(d, key)}' (columns are: {', '.join(map(repr, row))}). "
                             f"Labeled data needs words, slot tags and an intent; set data.{key}.")
        raw.append((tokens, tags, where, text, offsets, None))
        intents.append((intent, where))
    return raw, intents


def _words(value: Any, column: str, where: str) -> list[str] | None:
    """A list of words or tags: a JSON list of strings, or one string split on whitespace; None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise InputError(f"{where}: column '{column}' must be a list of non-empty strings or one whitespace-separated string.")
    return words


def _read_folder(folder: Path, require_label: bool) -> tuple[list[tuple], list[tuple[str | None, str]]]:
    """A JointBERT split folder: seq.in, seq.out and label, one utterance per line (seq.out and label are optional
    for unlabeled input)."""
    lines = {}
    for name in JOINTBERT_FILES:
        p = folder / name
        if not p.is_file():
            if name == "seq.in" or require_label:
                raise InputError(f"{p}: file not found. A JointBERT folder holds seq.in (words), seq.out (slot tags) and "
                                 "label (intents), one utterance per line.")
            continue
        text = read_text_file(p)
        lines[name] = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    n = len(lines["seq.in"])
    for name, rows in lines.items():
        if len(rows) != n:
            short = min(len(rows), n)
            raise InputError(f"{folder / name}: line {short + 1}: {len(rows)} lines, but seq.in has {n}; the files of a "
                             "JointBERT folder are line-aligned (one utterance per line in each).")
    raw, intents = [], []
    for i in range(n):
        where = f"{folder / 'seq.in'}: line {i + 1}"
        tokens = lines["seq.in"][i].split()
        if not tokens:
            raise InputError(f"{where}: empty utterance. Remove the line (and the same line of seq.out and label).")
        tags = lines["seq.out"][i].split() if "seq.out" in lines else None
        if tags is not None and len(tags) != len(tokens):
            raise InputError(f"{folder / 'seq.out'}: line {i + 1}: {len(tags)} tags for {len(tokens)} words in seq.in; "
                             "give one tag per word.")
        intent = lines["label"][i].strip() if "label" in lines else None
        if require_label and not intent:
            raise InputError(f"{folder / 'label'}: line {i + 1}: empty intent. Give every utterance its intent.")
        # tag errors name seq.out's line (NER's converter reports them at `where` when there are no tag lines)
        raw.append((tokens, tags, f"{folder / 'seq.out'}: line {i + 1}" if tags is not None else where, None, None, None))
        intents.append((intent or None, f"{folder / 'label'}: line {i + 1}"))
    return raw, intents


def _examples(path: str, raw: list[tuple], intents: list[tuple[str | None, str]], scheme: str,
              types: set[str] | None = None, known_intents: set[str] | None = None, require_label: bool = True,
              unseen: str = "error", repairs: list[str] | None = None) -> list[JointExample]:
    """NER's conversion (tag checks, scheme to BIO, slot types train never had refused) with each sentence's
    intent, an intent train never had refused as classification refuses an unknown label; with unseen
    "count_wrong" both are kept (the evaluation counts them as errors)."""
    keep = unseen == "count_wrong"
    for intent, where in intents:  # classification's check of the intents, then NER's of the tags (convert)
        if not keep and known_intents is not None and intent is not None and intent not in known_intents:
            raise InputError(f"{where}: intent '{intent}' never appears in the training data (known intents: "
                             f"{', '.join(sorted(i for i in known_intents if i))}). Add training examples for it, remove "
                             "the row, or set joint.unseen_labels count_wrong.")
    examples, fixed = convert(path, raw, scheme, require_label, None if keep else types)
    if fixed:
        log.warning("%s: %d slot tag(s) inconsistent with %s, repaired (first: %s)", path, len(fixed), scheme.upper(), fixed[0])
    if repairs is not None:
        repairs += fixed
    return [JointExample(ex.tokens, ex.tags, ex.source, ex.text, ex.offsets, label=intent)
            for ex, (intent, _) in zip(examples, intents)]


def _known_tags(ex: JointExample, known: set[str]) -> JointExample:
    """The example with slot tags of types train never had read as O: what the slot head can be scored on (its
    loss and calibration); the joint figures score the original tags."""
    if ex.tags is None or all(t in known for t in ex.tags):
        return ex
    return dataclasses.replace(ex, tags=[t if t in known else "O" for t in ex.tags])


def _split(train: list, read: dict, fractions: list[float], seed: int, files: dict) -> tuple[list, list, list, dict]:
    """Dev and test as given, else split off train stratified by intent (as classification splits)."""
    if "dev" in read:
        return train, read["dev"], read.get("test", []), {"method": "files", **files}
    intents = [ex.label for ex in train]
    if "test" in read:
        share = fractions[1] / (fractions[0] + fractions[1])
        tr, dv, _ = stratified_split(intents, [1 - share, share, 0.0], seed)
        dev, test = [train[i] for i in dv], read["test"]
    else:
        tr, dv, te = stratified_split(intents, fractions, seed)
        dev, test = [train[i] for i in dv], [train[i] for i in te]
    info = {"method": "stratified by intent", "fractions": fractions, "seed": seed, **files,
            "dev_rows": [ex.source for ex in dev]}
    return [train[i] for i in tr], dev, test, info
