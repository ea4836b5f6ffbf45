"""Relation extraction: the relation between two marked entities of a sentence (who acquired whom,
which drug treats which disease), English and Chinese.

What this module gets right that the usual scripts do not:
- the model is told where the entities are: typed marker tokens ([E1] [/E1] [E2] [/E2]) are added
  to the tokenizer (the embedding matrix resized, both saved with the model), and the relation is
  classified from the two entity-start markers' vectors, not from [CLS] (Baldini Soares et al.
  2019, "Matching the Blanks": the entity-start representation is their best);
- a sentence longer than max_length is cut around the two entities, never through a marker;
- direction is kept: Cause-Effect(e1,e2) and Cause-Effect(e2,e1) are different labels;
- the metric is SemEval-2010 Task 8's official one: macro-F1 over the relations with direction
  taken into account, the no-relation label (Other / unknown) excluded; per-relation tables.
Input: a text with <e1>..</e1> and <e2>..</e2> markers; or the entities in `data.head_column` /
`data.tail_column`, as [start, end) character spans or as strings located in the text (their first
occurrence; FinRE style).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from lmtune.config import Config
from lmtune.data.readers import Example, cell_text, is_invisible, read_rows, row_unit
from lmtune.errors import InputError
from lmtune.evaluate.report import prf_table
from lmtune.models import load_config, quiet_transformers, resolve_model
from lmtune.tasks.base import ABSTAIN, CALIBRATE, EXAMPLE_LABELS, FOLD, Encoded
from lmtune.tasks.classification import ClassificationTask
from lmtune.tasks.relation_config import RelationColumns  # noqa: F401  (re-exported: code and saved configs name it here)

MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")
_TAGGED = re.compile(r"<e([12])>(.*?)</e\1>", re.DOTALL)
NEGATIVE = ("Other", "other", "unknown", "no_relation", "NA", "None", "none")
HEAD_FILE = "relation_head.safetensors"
_DIRECTION = re.compile(r"\((e[12]),(e[12])\)$")


@dataclass
class RelationExample(Example):
    e1: tuple[int, int] = (0, 0)  # [start, end) character span of the first entity in text
    e2: tuple[int, int] = (0, 0)

    def marked(self, open1="<e1>", close1="</e1>", open2="<e2>", close2="</e2>") -> str:
        cuts = sorted([(self.e1[0], 0, open1), (self.e1[1], 1, close1), (self.e2[0], 0, open2), (self.e2[1], 1, close2)],
                      key=lambda c: (c[0], c[1] == 0))
        out, last = [], 0
        for pos, _, mark in cuts:
            out += [self.text[last:pos], mark]
            last = pos
        return "".join(out + [self.text[last:]])

    def audit_text(self) -> str:
        return self.marked()

    @property
    def nested(self) -> bool:
        return self.e1[0] < self.e2[1] and self.e2[0] < self.e1[1]

    def edit_view(self, cjk: bool | None = None):
        """Attacks and augmentation edit the words around the entities; the entities and the markers stay
        (a sentence whose entities nest is left as it is)."""
        from lmtune.robust.text import Words, text_words
        if self.nested:
            return Words([self.text], [True], "")
        (a, b), (c, d) = sorted([self.e1, self.e2])
        pieces = [self.text[:a], self.text[a:b], self.text[b:c], self.text[c:d], self.text[d:]]
        words, protected, joiner = [], [], None
        for k, piece in enumerate(pieces):
            w = text_words(piece, cjk) if piece.strip() else Words([], [])
            joiner = w.joiner if joiner is None and piece.strip() else joiner
            words += w.words + ([f"\u241e{k}"] if k < 4 else [])
            protected += [True if k in (1, 3) else p for p in w.protected] + ([True] if k < 4 else [])
        return Words(words, protected, joiner if joiner is not None else " ")

    def with_words(self, w) -> RelationExample:
        if self.nested:
            return self
        pieces, cur = [], []
        for word in w.words:
            if word.startswith("\u241e"):
                pieces.append(w.joiner.join(cur))
                cur = []
            else:
                cur.append(word)
        pieces.append(w.joiner.join(cur))
        sep = w.joiner
        text, spans = "", []
        for piece in pieces:
            if text and piece and sep:
                text += sep
            start = len(text)
            text += piece
            spans.append((start, len(text)))
        first, second = spans[1], spans[3]
        e1, e2 = (first, second) if self.e1 <= self.e2 else (second, first)
        return replace(self, text=text, e1=e1, e2=e2)


class EntityMarkerModel(torch.nn.Module):
    """An encoder and a linear layer over the [E1] and [E2] start markers' last hidden states. The
    markers are found from input_ids inside forward, so the model (and its ONNX graph) takes the
    usual inputs only."""
    base_model_prefix = "encoder"

    def __init__(self, encoder: torch.nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(2 * encoder.config.hidden_size, num_labels)

    @property
    def base_model(self) -> torch.nn.Module:
        return self.encoder

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        e1 = (input_ids == self.config.e1_token_id).int().argmax(1)  # every encoded example has both markers
        e2 = (input_ids == self.config.e2_token_id).int().argmax(1)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        pair = torch.cat([hidden[rows, e1], hidden[rows, e2]], -1)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pair)))

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        self.encoder.save_pretrained(path, **kw)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EntityMarkerModel:
        config = AutoConfig.from_pretrained(path)
        model = cls(AutoModel.from_pretrained(path), config.num_labels)
        model.classifier.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return model


def undirected(label: str) -> str:
    return _DIRECTION.sub("", label)


def official_scores(gold: list[str], pred: list[str], negative: str | None) -> dict:
    """SemEval-2010 Task 8's official score, (9+1)-way with directionality: per relation (direction
    stripped, the negative label left out), a prediction is right only with the right direction;
    precision is over every prediction of that relation (either direction), recall over its gold."""
    names = sorted({undirected(g) for g in gold} - {negative})
    per = {}
    for r in names:
        predicted = sum(undirected(p) == r for p in pred)
        actual = sum(undirected(g) == r for g in gold)
        correct = sum(p == g and undirected(g) == r for p, g in zip(pred, gold))
        p_, r_ = correct / predicted if predicted else 0.0, correct / actual if actual else 0.0
        per[r] = {"precision": p_, "recall": r_, "f1-score": 2 * p_ * r_ / (p_ + r_) if p_ + r_ else 0.0, "support": actual}
    return {"official_macro_f1": float(np.mean([v["f1-score"] for v in per.values()])) if per else 0.0, "per_relation": per}


class RelationTask(ClassificationTask):
    name = "relation"
    headline = ("official_macro_f1", "accuracy", "macro_f1", "loss")
    peft_task_type = "SEQ_CLS"
    capabilities = frozenset({CALIBRATE, ABSTAIN, EXAMPLE_LABELS, FOLD})
    encode_options: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.negative: str | None = None

    def state(self) -> dict:
        return {**super().state(), "negative": self.negative}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.negative = state.get("negative")

    # ---- data -------------------------------------------------------------------------------
    def _example(self, row: dict, cfg: Config, where: str, source: str, require_label: bool) -> RelationExample:
        d = cfg.data
        if d.text_column not in row:
            raise InputError(f"{where}: no column '{d.text_column}' (columns are: {', '.join(map(repr, row))}). "
                             "Rename the column or set data.text_column.")
        raw = row[d.text_column]
        if not isinstance(raw, str) or not raw.strip() or is_invisible(raw):
            raise InputError(f"{where}: empty text in column '{d.text_column}'. Fill it in or remove the row.")
        label = cell_text(row.get(d.label_column), d.label_column, where, require_label)
        if d.head_column in row or d.tail_column in row:
            text = raw
            e1 = self._locate(text, row.get(d.head_column), d.head_column, where)
            e2 = self._locate(text, row.get(d.tail_column), d.tail_column, where, avoid=e1)
        else:
            tags = list(_TAGGED.finditer(raw))
            if sorted(m.group(1) for m in tags) != ["1", "2"]:
                raise InputError(f"{where}: the text needs one <e1>..</e1> and one <e2>..</e2> (or give the entities in "
                                 f"columns '{d.head_column}' and '{d.tail_column}').")
            text, spans, last = "", {}, 0
            for m in tags:
                text += raw[last:m.start()]
                spans[m.group(1)] = (len(text), len(text) + len(m.group(2)))
                text += m.group(2)
                last = m.end()
            text += raw[last:]
            e1, e2 = spans["1"], spans["2"]
        return RelationExample(text, label, source, e1=e1, e2=e2)

    @staticmethod
    def _locate(text: str, value: Any, col: str, where: str, avoid: tuple[int, int] | None = None) -> tuple[int, int]:
        """A [start, end] span as given, or the first occurrence of the entity's text that does not
        overlap `avoid` (the other entity; FinRE's 联华 inside 联华超市), else its first occurrence (nested)."""
        if isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) for x in value):
            s, e = value
            if not 0 <= s < e <= len(text):
                raise InputError(f"{where}: '{col}' span {value} is outside the text ({len(text)} characters).")
            return s, e
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: '{col}' must be the entity's text or its [start, end] character span.")
        found = [m.start() for m in re.finditer(re.escape(value), text)]
        if not found:
            raise InputError(f"{where}: entity {value!r} ('{col}') does not occur in the text.")
        free = [s for s in found if avoid is None or s + len(value) <= avoid[0] or s >= avoid[1]]
        at = (free or found)[0]
        return at, at + len(value)

    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[RelationExample]:
        out = []
        unit = row_unit(path)
        for line, row in read_rows(path, cfg.data.format, cfg.data.encoding):
            ex = self._example(row, cfg, f"{path}: {unit} {line}", f"{path}:{line}", require_label)
            if labels is not None and ex.label is not None and ex.label not in labels:
                raise InputError(f"{path}: {unit} {line}: label '{ex.label}' never appears in the training data.")
            out.append(ex)
        return out

    def read(self, cfg: Config):
        splits = super().read(cfg)
        self.negative = next((n for n in NEGATIVE if n in splits.labels), None)
        splits.info["negative_label"] = self.negative
        return splits

    def from_texts(self, texts: list) -> list[RelationExample]:
        cfg = Config()
        return [self._example({cfg.data.text_column: t}, cfg, f"text {i + 1}", "", False) for i, t in enumerate(texts)]

    def audit_findings(self, splits) -> list[dict]:
        return []

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        path = resolve_model(cfg.model.name)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
            config = load_config(cfg.model.name, cfg.model.dropout, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={lab: i for i, lab in enumerate(labels)})
            encoder = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False) \
                if config.model_type == "bert" else AutoModel.from_pretrained(path, config=config)
        with quiet_transformers():  # new rows start near the mean embedding (transformers says so at length)
            encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        encoder.config.e1_token_id, encoder.config.e2_token_id = ids[0], ids[2]
        encoder.config.relation_markers = list(MARKERS)
        return EntityMarkerModel(encoder, len(labels), getattr(config, "hidden_dropout_prob", 0.1) or 0.1), tokenizer

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        with quiet_transformers():
            return EntityMarkerModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, examples: list[RelationExample], tokenizer: Any, max_length: int,
               labels: list[str] | None = None) -> Encoded:
        texts = [ex.marked(*(f" {m} " for m in MARKERS)) for ex in examples]
        with quiet_transformers():
            full = tokenizer(texts, add_special_tokens=True)
        index = {lab: i for i, lab in enumerate(labels or [])}
        features, cut = [], 0
        for i, ex in enumerate(examples):
            ids = full["input_ids"][i]
            if len(ids) > max_length:  # keep a window around both entities: never cut a marker
                cut += 1
                ids = self._window(ids, max_length, tokenizer.convert_tokens_to_ids(list(MARKERS)))
            f = {"input_ids": ids, "length": len(ids), "label": index.get(ex.label, -100) if ex.label is not None else -100}
            if "token_type_ids" in full:
                f["token_type_ids"] = [0] * len(ids)
            features.append(f)
        return Encoded(features, examples, {"truncated": cut, "examples": len(examples),
                                            "max_tokens": max((len(x) for x in full["input_ids"]), default=0)})

    @staticmethod
    def _window(ids: list[int], max_length: int, marker_ids: list[int]) -> list[int]:
        head, body, tail = ids[:1], ids[1:-1], ids[-1:]
        room = max_length - 2
        at = [k for k, t in enumerate(body) if t in marker_ids]
        lo, hi = min(at), max(at) + 1
        if hi - lo > room:  # the entities are further apart than the window: keep each entity with its markers
            first = body[lo:body.index(marker_ids[1]) + 1] if body.index(marker_ids[0]) < body.index(marker_ids[2]) \
                else body[lo:body.index(marker_ids[3]) + 1]
            second = body[hi - (room - len(first)):hi]
            return head + first + second + tail
        extra = room - (hi - lo)
        start = max(0, min(lo - extra // 2, len(body) - room))
        return head + body[start:start + room] + tail

    # ---- metrics ----------------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        m = super().evaluate(outputs, enc, labels)
        logits, _ = self.split_outputs(outputs, enc, labels)
        gold_idx = self._gold(enc, labels)
        known = gold_idx >= 0
        pred = [labels[i] for i in logits[known].argmax(-1)]
        gold = [labels[i] for i in gold_idx[known]]
        m.update(official_scores(gold, pred, self.negative))
        return m

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        lines = []
        for split, m in split_metrics.items():
            lines += [f"### Relations ({split}): official macro-F1 {m['official_macro_f1']:.4f}", "",
                      f"SemEval-2010 Task 8 scoring: per relation with direction taken into account, "
                      f"'{self.negative}' left out of the average." if self.negative else
                      "Per relation with direction taken into account.", "",
                      *prf_table("relation", m["per_relation"]), ""]
        return "\n".join(lines) + "\n" + super().report(split_metrics, labels, run_dir)
