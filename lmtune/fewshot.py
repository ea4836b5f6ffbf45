"""Few-shot classification in the style of SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without
Prompts"): the recipe's optional `fewshot` stage, the model it leaves, and its report section.

With a handful of labeled texts per class, a new softmax head on [CLS] trained by cross-entropy learns from a few
noisy steps. SetFit instead (1) fine-tunes the checkpoint's own sentence embedding on pairs of the labeled texts,
same class -> cosine 1, different class -> cosine 0 (CosineSimilarityLoss), which multiplies the training signal
(every text appears in 2 x iterations pairs) and starts from what a sentence-embedding checkpoint already knows, and
(2) fits a logistic regression on the tuned embeddings. Here:

- `decide` states the rule that fewshot.method auto applies (and the counts it saw); a self-training student takes
  its run's decision (`given_decision`) instead: the rule counts gold labels, not pseudo-labels;
- `contrastive` is SetFit's body stage written in torch on our encoder rather than through sentence-transformers
  and setfit (neither is in the lock): one dependency less, and it runs on the run's accelerator, precision and seed;
- `fit_head` is SetFit's LogisticRegression head (L2, C), fitted with L-BFGS in torch so that it lands in the model's
  own linear layer and so that its penalty can be centred on the label prototypes (label names or
  fewshot.label_descriptions, embedded) rather than on zero: scikit-learn's can only shrink towards zero;
- `EmbeddingClassifier` is the model the run trains on and saves: the encoder, its sentence embedding (the
  checkpoint's pooling, unit length) and one linear layer. It is what predict, evaluate, export and serve load
  (ClassificationTask.load_model), like the bi-encoder pair model (tasks/biencoder.py): a [CLS] head would throw
  away the embedding the contrastive stage tuned (on SST-2 at 8 per class, seed 1: 0.675 accuracy from the
  checkpoint's mean pooling vs 0.595 from the [CLS] pooler, both after the same contrastive stage).

The training loop then trains the head only (fewshot.end_to_end false, SetFit's default: the body stays as the
contrastive stage left it) or the whole model, and restores the best dev checkpoint as usual.
"""
from __future__ import annotations

import json
import logging
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, get_linear_schedule_with_warmup
from transformers.modeling_outputs import SequenceClassifierOutput

from lmtune.errors import InputError
from lmtune.io import write_json
from lmtune.models import EncoderModule, load_tokenizer, quiet_transformers, resolve_model
from lmtune.tasks.base import FEWSHOT
from lmtune.tasks.biencoder import is_sentence_embedding_model
from lmtune.tasks.retrieval import pool, pooling_mode

log = logging.getLogger("lmtune")

HEAD_FILE = "fewshot_head.safetensors"
CONFIG_FLAG = "fewshot_pooling"  # in the saved config.json: load finds EmbeddingClassifier by it
# label ids that say nothing of their class ("0", "LABEL_3", "class_12"): no prototype from the name
_ID_LIKE = re.compile(r"^(label|class|cat|category|intent|c)?[\s_\-]*\d+$", re.IGNORECASE)


# ---- the rule --------------------------------------------------------------------------------------------------
def class_counts(labels: list[str]) -> dict:
    counts = Counter(labels)
    values = sorted(counts.values())
    return {"classes": len(counts), "train_examples": len(labels), "median_per_class": statistics.median(values),
            "mean_per_class": len(labels) / max(len(counts), 1),
            "min_per_class": values[0], "max_per_class": values[-1]}


def decide(cfg, splits) -> dict:
    """Which method runs and why: fewshot.method itself, or auto's rule (single texts, full fine-tuning from the
    checkpoint, a sentence-embedding checkpoint, and a median and a mean class of at most fewshot.max_per_class examples)."""
    f = cfg.fewshot
    counts = class_counts([ex.label for ex in splits.train if ex.label is not None])
    rule = (f"auto: setfit when the median class and the mean class have <= {f.max_per_class} labeled training examples "
            "(fewshot.max_per_class), "
            "the checkpoint is a sentence-embedding model, and the run reads single labeled texts (no teacher's soft targets) "
            "with full fine-tuning from the checkpoint (no PEFT, no continual.from_run)")
    decision = {"setting": f.method, "rule": rule, **counts}
    if f.method != "auto":
        return {**decision, "method": f.method, "why": f"fewshot.method {f.method}"}
    median = counts["median_per_class"]
    reasons = [(bool(cfg.data.text_pair_column), "the run reads sentence pairs"),
               (cfg.peft.method != "none", f"peft.method is {cfg.peft.method}"),
               (bool(cfg.continual.from_run), "the run continues continual.from_run"),
               (any(getattr(ex, "soft_targets", None) is not None for ex in splits.train),
                "the run learns from a teacher's soft targets (lmtune distill)"),
               (median > f.max_per_class, f"the median class has {median:g} labeled examples (> {f.max_per_class})"),
               # a large set with a long tail of rare classes (ATIS: 4,478 rows, 21 intents, median 12) is not few-shot:
               # plain fine-tuning has the data, and SetFit's pairs (20 per example) would cost hours on a CPU
               (counts["mean_per_class"] > f.max_per_class,
                f"the classes have {counts['mean_per_class']:.0f} labeled examples on average (> {f.max_per_class})")]
    for applies, reason in reasons:
        if applies:
            return {**decision, "method": "none", "why": reason}
    if not is_sentence_embedding_model(resolve_model(cfg.model.name)):
        return {**decision, "method": "none", "why": f"{cfg.model.name} is not a sentence-embedding checkpoint (no modules.json)"}
    return {**decision, "method": "setfit",
            "why": f"the median class has {median:g} labeled examples (<= {f.max_per_class}) and {cfg.model.name} is a "
                   "sentence-embedding checkpoint"}


def given_decision(decided: dict, splits) -> dict:
    """A self-training student's decision: its run's (`decided`, made on the gold train split), not one of its own.
    auto's rule measures how scarce labels are, and pseudo-labels are not labels: counted, 16 gold labels per class plus
    the pseudo-labels pass fewshot.max_per_class and the students of a SetFit teacher fall back to plain fine-tuning
    (in issue 48's smoke run such a student lost to its teacher on dev and was dropped). The counts stay the gold
    split's; `pseudo_labels` says how many the student adds, and its SetFit pairs are sampled from its whole train
    split, labels plus pseudo-labels (more pairs of the same classes). An explicit fewshot.method is the same
    decision either way."""
    pseudo = splits.info.get("pseudo_labels", 0)
    # a SetFit record's figures are the teacher's here; the stage replaces every one of them with the student's own
    # (_setfit returns the same keys each time), and a plain fine-tuning record has none
    record = {**decided, "pseudo_labels": pseudo}
    if decided["setting"] == "auto":
        record["why"] = (f"{decided['why']}; decided on the run's gold train split: the student's {pseudo} pseudo-labels "
                         "are not counted")
    return record


# ---- pairs -----------------------------------------------------------------------------------------------------
def sample_pairs(labels: list[int], iterations: int, seed: int, max_pairs: int = 0) -> list[tuple[int, int, float]]:
    """SetFit's pair sampling (num_iterations): each round, every example with one random example of its class
    (target 1) and one of another class (target 0): balanced positives and negatives. A class of one example is
    paired with itself (SetFit does the same)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pairs = []
    for _ in range(iterations):
        for i, y in enumerate(labels):
            same = [j for j in by_class[y] if j != i] or [i]
            pairs.append((i, rng.choice(same), 1.0))
            other = rng.choice([c for c in by_class if c != y])
            pairs.append((i, rng.choice(by_class[other]), 0.0))
    rng.shuffle(pairs)
    return pairs[:max_pairs] if max_pairs else pairs


# ---- the model -------------------------------------------------------------------------------------------------
class EmbeddingClassifier(EncoderModule):
    """The encoder's sentence embedding (its checkpoint's pooling, unit length) through one linear layer."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.encoder, self.config, self.pooling = encoder, encoder.config, pooling
        self.config.num_labels = num_labels
        setattr(self.config, CONFIG_FLAG, pooling)  # saved in config.json: load finds the class
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode(input_ids, attention_mask, token_type_ids, inputs_embeds, False)[0]

    def _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds, hidden_states: bool) -> tuple:
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        mask = torch.ones_like(ref, dtype=torch.long) if attention_mask is None else attention_mask
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                           output_hidden_states=hidden_states, **kw)
        return pool(out.last_hidden_state, mask, self.pooling), out.hidden_states if hidden_states else None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, **_: Any) -> SequenceClassifierOutput:
        # the encoder's token states when asked (the drift reference) or configured (abstain.score mahalanobis reads
        # the last layer's [CLS]), as a sequence classification model returns them
        want = bool(output_hidden_states or getattr(self.config, "output_hidden_states", False))
        emb, hidden = self._encode(input_ids, attention_mask, token_type_ids, inputs_embeds, want)
        return SequenceClassifierOutput(logits=self.classifier(emb.to(self.classifier.weight.dtype)), hidden_states=hidden)

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        self.encoder.save_pretrained(path, **kw)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(Path(path) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EmbeddingClassifier:
        config = AutoConfig.from_pretrained(path)
        model = cls(_encoder(str(path), config), config.num_labels, getattr(config, CONFIG_FLAG))
        model.classifier.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return model


def _encoder(path: str, config: Any) -> torch.nn.Module:
    with quiet_transformers():
        try:  # the embedding pools tokens itself: no pooler layer (an unused layer would also stop DDP)
            return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler take no such argument
            return AutoModel.from_pretrained(path, config=config)


def from_built(model: torch.nn.Module, num_labels: int, model_name: str) -> EmbeddingClassifier:
    """The built classification model's encoder (its freezing kept) under an EmbeddingClassifier."""
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # unused by the embedding
    return EmbeddingClassifier(encoder, num_labels, pooling_mode(resolve_model(model_name)))


def load_embedding_classifier(model_dir: Path) -> tuple | None:
    """A task's load_model: the saved EmbeddingClassifier and its tokenizer, or None for any other model."""
    config = Path(model_dir) / "config.json"
    if not (config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(CONFIG_FLAG)):
        return None
    return EmbeddingClassifier.from_pretrained(model_dir), load_tokenizer(str(model_dir))


# ---- the contrastive stage -------------------------------------------------------------------------------------
def _batches(tokenizer: Any, texts: list[str], max_length: int) -> list[dict]:
    with quiet_transformers():
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(texts))]


def _padded(tokenizer: Any, rows: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    with quiet_transformers():
        batch = tokenizer.pad(rows, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def embed_texts(model: EmbeddingClassifier, tokenizer: Any, texts: list[str], max_length: int, device: torch.device,
                batch_size: int = 64) -> torch.Tensor:
    """Unit sentence embeddings [texts, hidden] (float32, on the CPU), the model in eval mode."""
    was = model.training
    model.eval()
    rows = _batches(tokenizer, texts, max_length)
    out = [model.embed(**_padded(tokenizer, rows[i:i + batch_size], device)).float().cpu() for i in range(0, len(rows), batch_size)]
    model.train(was)
    return torch.cat(out)


def cosine_by_class(emb: torch.Tensor, labels: list[int], limit: int = 2000) -> dict:
    """Mean cosine of same-class and of different-class pairs of (at most `limit`) examples."""
    emb, y = emb[:limit], torch.tensor(labels[:limit])
    cos = emb @ emb.T
    same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    diff = y[:, None] != y[None]
    return {"same_class": float(cos[same].mean()) if same.any() else None, "different_class": float(cos[diff].mean())}


def contrastive(model: EmbeddingClassifier, tokenizer: Any, texts: list[str], pairs: list[tuple[int, int, float]], f: Any,
                max_length: int, accelerator: Any, seed: int) -> dict:
    """SetFit's body stage: the cosine of each pair's two embeddings regressed on its target (CosineSimilarityLoss:
    mean squared error), AdamW at fewshot.body_lr with 10% warmup then linear decay (sentence-transformers' fit)."""
    device = accelerator.device
    home = next(model.parameters()).device
    model.to(device).train()
    rows = _batches(tokenizer, texts, max_length)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=f.body_lr, weight_decay=0.01)
    steps = f.contrastive_epochs * -(-len(pairs) // f.pair_batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = random.Random(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(f.contrastive_epochs):
        epoch = list(pairs)
        order.shuffle(epoch)
        for s in range(0, len(epoch), f.pair_batch_size):
            chunk = epoch[s:s + f.pair_batch_size]
            target = torch.tensor([t for _, _, t in chunk], device=device)
            with accelerator.autocast():
                u = model.embed(**_padded(tokenizer, [rows[i] for i, _, _ in chunk], device))
                v = model.embed(**_padded(tokenizer, [rows[j] for _, j, _ in chunk], device))
                loss = F.mse_loss((u * v).sum(-1).float(), target)  # unit vectors: the dot product is the cosine
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    model.to(home)
    return {"steps": len(losses), "seconds": time.perf_counter() - t0, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None}


# ---- the head --------------------------------------------------------------------------------------------------
def prototype_texts(labels: list[str], f: Any) -> list[str | None]:
    """Per label, the text its prototype is embedded from: its description, else its name when the name is words
    (underscores and dashes read as spaces), else None."""
    given = f.label_descriptions or {}
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise InputError(f"config: fewshot.label_descriptions: {', '.join(map(repr, unknown))} is not a label of the training "
                         f"data (labels: {', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}). Fix or remove it.")
    if not f.label_prototypes:
        return [None] * len(labels)
    return [given.get(lab) or (re.sub(r"[_\-]+", " ", lab).strip() if is_word_label(lab) else None) for lab in labels]


def is_word_label(name: str) -> bool:
    return any(ch.isalpha() for ch in name) and not _ID_LIKE.match(name.strip())


def prototype_prior(protos: torch.Tensor, has: torch.Tensor, emb: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The prototypes scaled to the one factor s whose classifier s * cos(text, prototype) best fits the training
    examples (the cosines of a sentence embedding are small: unscaled they would be a near-uniform start); rows
    without a prototype are zero."""
    protos = protos * has[:, None]
    cos = emb @ protos.T
    grid = torch.logspace(-1, 2.5, 60, dtype=emb.dtype)
    losses = torch.stack([F.cross_entropy(s * cos, y) for s in grid])
    scale = float(grid[int(losses.argmin())])
    return scale * protos, scale


def fit_head(emb: torch.Tensor, y: torch.Tensor, num_labels: int, prior: torch.Tensor | None, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: sum of cross-entropies + ||W - prior||^2 / (2C), intercept unpenalized
    (scikit-learn's LogisticRegression objective, with the penalty centred on the prior), by L-BFGS from the prior."""
    emb = emb.double()
    prior = torch.zeros(num_labels, emb.shape[1], dtype=emb.dtype) if prior is None else prior.double()
    w = prior.clone().requires_grad_(True)
    b = torch.zeros(num_labels, dtype=emb.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-6, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(emb @ w.T + b, y, reduction="sum") + ((w - prior) ** 2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach().float(), b.detach().float()


# ---- the stage -------------------------------------------------------------------------------------------------
def applies(ctx) -> bool:
    """The stage runs for a task that can (auto states its decision in the report), and for an explicit setfit."""
    return ctx.cfg.fewshot.method == "setfit" or (ctx.cfg.fewshot.method == "auto" and ctx.task.supports(FEWSHOT))


def stage(ctx) -> None:
    """fewshot.method: decide (auto; a self-training student takes the decision its context is given), then for
    setfit: the EmbeddingClassifier over the built encoder, the contrastive stage, the head fitted on the tuned
    embeddings; ctx.fewshot is the record results.json and report.md show. A resumed run rebuilds the model only (the
    checkpoint brings its weights) and keeps the record it wrote."""
    cfg, rd = ctx.cfg, ctx.rd
    if cfg.fewshot.method == "setfit":
        ctx.task.require(FEWSHOT, "fewshot.method setfit")
    if ctx.inputs.resume and rd.fewshot.is_file():
        record = json.loads(rd.fewshot.read_text())
        if record["method"] == "setfit":
            _wrap(ctx)
        ctx.fewshot = record
        return
    given = ctx.inputs.fewshot_decision
    record = decide(cfg, ctx.splits) if given is None else given_decision(given, ctx.splits)
    if record["method"] == "setfit":
        record.update(_setfit(ctx))
    log.info("few-shot: %s (%s)", record["method"], record["why"])
    ctx.fewshot = record
    if ctx.main:
        write_json(rd.fewshot, record)


def _wrap(ctx) -> EmbeddingClassifier:
    labels = ctx.splits.labels
    model = from_built(ctx.built.model, len(labels), ctx.cfg.model.name)
    _freeze_body(model, ctx.cfg.fewshot.end_to_end)
    ctx.built.model = model
    return model


def _setfit(ctx) -> dict:
    """SetFit on the run's train split: the contrastive stage, then the head; the record's figures."""
    cfg, f, labels = ctx.cfg, ctx.cfg.fewshot, ctx.splits.labels
    proto_texts = prototype_texts(labels, f)  # a bad label description stops the run before minutes of training
    index = {lab: i for i, lab in enumerate(labels)}
    train = [ex for ex in ctx.splits.train if ex.label in index]
    texts, y = [ex.text for ex in train], [index[ex.label] for ex in train]
    model = from_built(ctx.built.model, len(labels), cfg.model.name)
    tokenizer, device, max_len = ctx.built.tokenizer, ctx.accelerator.device, cfg.data.max_length
    pairs = sample_pairs(y, f.iterations, cfg.train.seed, f.max_pairs)
    before = cosine_by_class(embed_texts(model, tokenizer, texts, max_len, device), y)
    trained = contrastive(model, tokenizer, texts, pairs, f, max_len, ctx.accelerator, cfg.train.seed)
    emb = embed_texts(model, tokenizer, texts, max_len, device)
    after = cosine_by_class(emb, y)
    protos = embed_texts(model, tokenizer, [t or "" for t in proto_texts], max_len, device) if any(proto_texts) else None
    scale = _fit_classifier(model, emb, torch.tensor(y), protos, proto_texts, f.head_c)
    _freeze_body(model, f.end_to_end)
    ctx.built.model = model
    log.info("few-shot: %d pairs, %d contrastive steps in %.1fs; mean cosine same class %.3f -> %.3f, different %.3f -> %.3f",
             len(pairs), trained["steps"], trained["seconds"], before["same_class"] or 0, after["same_class"] or 0,
             before["different_class"], after["different_class"])
    seeded = [lab for lab, t in zip(labels, proto_texts) if t]
    then = "the training loop fine-tunes encoder and head" if f.end_to_end else "the training loop trains the head on the frozen encoder"
    return {"pairs": len(pairs), "contrastive_epochs": f.contrastive_epochs, "contrastive_steps": trained["steps"],
            "contrastive_seconds": trained["seconds"], "contrastive_loss": {"first": trained["first_loss"], "last": trained["last_loss"]},
            "cosine_before": before, "cosine_after": after, "pooling": model.pooling,
            "head": f"logistic regression (C {f.head_c:g}) on the tuned embeddings; {then}", "end_to_end": f.end_to_end,
            "prototypes": {"labels": seeded, "from_descriptions": sorted(set(f.label_descriptions or {}) & set(seeded)),
                           "scale": scale} if seeded else None}


def _fit_classifier(model: EmbeddingClassifier, emb: torch.Tensor, y: torch.Tensor, protos: torch.Tensor | None,
                    proto_texts: list[str | None], c: float) -> float | None:
    """The logistic-regression head into the model's linear layer, centred on the prototypes where there are any;
    returns the prototypes' scale (None without them)."""
    prior, scale = None, None
    if protos is not None:
        has = torch.tensor([t is not None for t in proto_texts], dtype=emb.dtype)
        prior, scale = prototype_prior(protos, has, emb, y)
    w, b = fit_head(emb, y, len(proto_texts), prior, c)
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(b)
    return scale


def _freeze_body(model: EmbeddingClassifier, end_to_end: bool) -> None:
    if not end_to_end:
        for p in model.encoder.parameters():  # SetFit's default: the head is trained on the frozen body
            p.requires_grad_(False)
