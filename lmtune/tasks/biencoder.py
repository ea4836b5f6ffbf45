"""Sentence pairs through a sentence-embedding checkpoint the way it was trained (data.pair_encoding bi):
each text encoded alone, pooled with the checkpoint's own pooling, and the pair judged by the cosine
of the two embeddings (a bi-encoder, Reimers & Gurevych 2019, Sentence-BERT).

Why lmtune chooses it by default for such checkpoints on two-label pair classification: a
sentence-embedding model (all-MiniLM-L6-v2, m3e) was trained so that the cosine of two texts'
embeddings says whether they mean the same thing. Read as one cross input, the pair reaches the
encoder in a form it never saw, a new head starts from nothing, and fine-tuning rebuilds the
judgement from the labelled pairs alone. On LCQMC (m3e-small, trained on the 7,922-pair split of its
dev file, scored on its test file; `python bench/pairs.py --untuned`) the untouched checkpoint's
cosine with a threshold chosen on dev scores 0.8317 on test; one epoch of cross fine-tuning at
lmtune's rates 0.6462 (the HF recipe at lr 2e-5, 0.6760); the same epoch through this module, 0.8394.

The model takes the usual pair input ([CLS] a [SEP] b [SEP] with token type ids) and splits it
inside forward with attention masks and position ids, so that collation, truncation, the audit,
attacks, predict, serve and the ONNX graph stay those of a cross-encoder pair run. The head is the
cosine, standardized with the mean and spread of the first training batch's cosines (data-dependent
initialization, Salimans & Kingma 2016), then one linear layer that starts as "more similar than
usual = the relevant label": the first step already predicts what the checkpoint knows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from lmtune.config import Config
from lmtune.data.pairs import relevant_positions
from lmtune.errors import InputError
from lmtune.models import EncoderModule, load_config, load_tokenizer, quiet_transformers, resolve_model
from lmtune.tasks.retrieval import pool, pooling_mode

HEAD_FILE = "pair_head.safetensors"
_EMBEDDING_FILES = ("modules.json", "config_sentence_transformers.json")


def is_sentence_embedding_model(path: str) -> bool:
    """Whether a checkpoint is a sentence-transformers model: its folder has modules.json /
    config_sentence_transformers.json, or its model card names the library (m3e's does)."""
    p = Path(path)
    if not p.is_dir():
        return _hub_has_modules(path)
    if any((p / name).is_file() for name in _EMBEDDING_FILES):
        return True
    card = p / "README.md"
    if card.is_file():
        head = card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
        return head.startswith("---") and "library_name: sentence-transformers" in head
    return False


def _hub_has_modules(name: str) -> bool:
    try:
        from huggingface_hub import hf_hub_download
        hf_hub_download(name, "modules.json")
        return True
    except Exception:  # offline, no such file, no such repo: not known to be an embedding model
        return False


def choose_pair_encoding(setting: str, model_name: str, labels: list[str] | None, tokenizer: Any) -> str:
    """cross or bi for a pair run (data.pair_encoding; labels None = regression). auto: bi for a
    sentence-embedding checkpoint on a two-label task with a recognizable relevant label, else cross.
    Regression stays cross under auto, for its intervals: on STS-B (MiniLM) bi raised test Spearman
    0.8164 -> 0.8475, but its errors grew more from dev to test (90th percentile of |error| 1.26 -> 1.45;
    cross 1.38 -> 1.46), so the 90% intervals fitted on dev covered 0.876 of test (seeds 42 and 43;
    cross 0.890): they promised more than they held."""
    if setting == "cross":
        return "cross"
    segments = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    same_or_not = labels is not None and relevant_index(labels) is not None  # two labels, one meaning "same"
    if setting == "bi":
        if not segments:
            raise InputError("data.pair_encoding bi: this tokenizer marks no segments (token type ids), so the two texts of a "
                             "pair cannot be told apart inside the input. Set data.pair_encoding cross.")
        if labels is not None and not same_or_not:
            raise InputError(f"data.pair_encoding bi judges a pair by one similarity: it needs a regression task or two labels, "
                             f"one of them meaning 'same' (1, true, yes, duplicate, paraphrase, ...); the labels are "
                             f"{', '.join(labels)}. Set data.pair_encoding cross.")
        return "bi"
    return "bi" if segments and same_or_not and is_sentence_embedding_model(resolve_model(model_name)) else "cross"


def report_lines(pair_encoding: str | None) -> list[str]:
    """What report.md says of how a pair run reads its pairs (data.pair_encoding auto decides per checkpoint)."""
    if pair_encoding == "bi":
        return ["Sentence pairs: **bi-encoder** (data.pair_encoding): each text encoded alone with the checkpoint's pooling, "
                "the pair judged by the cosine of the two embeddings.", ""]
    if pair_encoding == "cross":
        return ["Sentence pairs: **cross-encoder** (data.pair_encoding): both texts read as one input.", ""]
    return []


def relevant_index(labels: list[str]) -> int | None:
    """The index of the label that means 'the two texts match', for a two-label task; None otherwise."""
    found = relevant_positions(labels)
    return found[0] if len(labels) == 2 and len(found) == 1 else None


class CosineHead(torch.nn.Module):
    """The pair's cosine, standardized, through one linear layer to the logits (or the regression value)."""

    def __init__(self, num_labels: int, relevant: int | None) -> None:
        super().__init__()
        self.register_buffer("cos_mean", torch.zeros(1))
        self.register_buffer("cos_std", torch.ones(1))
        self.register_buffer("initialized", torch.zeros(1))
        self.linear = torch.nn.Linear(1, num_labels)
        # mirrors `initialized` so that a training step reads no device value once it is set (a recorded
        # CUDA-graph step may not); a loaded or resumed head finds its buffer set at its first step
        self._ready = False
        with torch.no_grad():  # regression: the standardized target follows the standardized cosine
            self.linear.bias.zero_()
            self.linear.weight.fill_(-1.0 if num_labels > 1 else 1.0)
            if relevant is not None:
                self.linear.weight[relevant] = 1.0

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        if self.training and not self._ready:
            self._ready = bool(self.initialized)
            if not self._ready and cos.numel() > 1:
                with torch.no_grad():  # the first training batch sets the scale, once (saved with the weights)
                    self.cos_mean.fill_(float(cos.mean()))
                    self.cos_std.fill_(max(float(cos.std()), 1e-3))
                    self.initialized.fill_(1.0)
                self._ready = True
        return self.linear(((cos - self.cos_mean) / self.cos_std).unsqueeze(-1))


class BiEncoderPairModel(EncoderModule):
    """An encoder that embeds each text of a pair alone, and a CosineHead. Takes a cross-encoder's pair
    input; the two texts are told apart by the token type ids."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, relevant: int | None, pooling: str) -> None:
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.pooling = pooling
        self.config.pair_encoding, self.config.pair_pooling = "bi", pooling  # saved in config.json: load finds the class
        self.classifier = CosineHead(num_labels, relevant)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        if token_type_ids is None:
            raise ValueError("a bi-encoder pair model needs token_type_ids to find the second text")
        mask = torch.ones_like(token_type_ids) if attention_mask is None else attention_mask
        first = mask * (token_type_ids == 0).to(mask.dtype)  # [CLS] a [SEP]
        starts = (torch.arange(mask.size(1), device=mask.device) == 0).to(mask.dtype).unsqueeze(0)
        second = mask * torch.clamp((token_type_ids == 1).to(mask.dtype) + starts, max=1)  # [CLS] b [SEP]
        u = self._embed(first, input_ids, inputs_embeds)
        v = self._embed(second, input_ids, inputs_embeds)
        logits = self.classifier((u * v).sum(-1))  # unit vectors: the dot product is the cosine
        hidden = (torch.cat([u, v], -1).unsqueeze(1),) if getattr(self.config, "output_hidden_states", False) else None
        return SequenceClassifierOutput(logits=logits, hidden_states=hidden)

    def _embed(self, mask: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """One text of each pair as if it were alone: the other text masked out, positions counted from 0."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                           token_type_ids=torch.zeros_like(mask), position_ids=positions)
        return pool(out.last_hidden_state, mask, self.pooling)

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        self.encoder.save_pretrained(path, **kw)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BiEncoderPairModel:
        config = AutoConfig.from_pretrained(path)
        model = cls(_encoder(str(path), config), config.num_labels, None, config.pair_pooling)
        model.classifier.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return model


def _encoder(path: str, config: PretrainedConfig) -> torch.nn.Module:
    """The checkpoint's encoder without its pooler layer where it has one (a bi-encoder pools tokens itself;
    an unused layer would also stop DDP)."""
    with quiet_transformers():
        try:
            return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler take no such argument
            return AutoModel.from_pretrained(path, config=config)


def pair_model(cfg: Config, labels: list[str] | None, **config_kwargs: Any) -> tuple[str | None, tuple | None]:
    """A task's build_model, for pairs: (the encoding, None for no pair run) and, when it is bi, the
    (model, tokenizer) built; None leaves the cross-encoder to the task. labels None = regression."""
    if not cfg.data.text_pair_column:
        return None, None
    tokenizer = load_tokenizer(cfg.model.name)
    encoding = choose_pair_encoding(cfg.data.pair_encoding, cfg.model.name, labels, tokenizer)
    if encoding != "bi":
        return encoding, None
    path = resolve_model(cfg.model.name)
    num_labels = len(labels) if labels is not None else 1
    config = load_config(cfg.model.name, cfg.model.dropout, num_labels=num_labels, **config_kwargs)
    model = BiEncoderPairModel(_encoder(path, config), num_labels, relevant_index(labels) if labels else None, pooling_mode(path))
    return encoding, (model, tokenizer)


def load_bi_encoder(model_dir: Path) -> tuple | None:
    """A task's load_model: the saved bi-encoder and its tokenizer, or None for any other model."""
    config = Path(model_dir) / "config.json"
    if not (config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("pair_encoding") == "bi"):
        return None
    return BiEncoderPairModel.from_pretrained(model_dir), load_tokenizer(str(model_dir))
