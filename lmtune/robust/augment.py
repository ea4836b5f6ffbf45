"""Training-data augmentation: EDA-style edits (synonym replacement, random insertion, swap,
deletion), typos, masked-LM contextual substitution and back-translation.

Augmented rows are made from train only, after the split, so dev and test never see them. For NER
the edits are label-preserving: entity words are protected, tags move with their words, inserted
words are tagged O and never land inside an entity; back-translation cannot keep word alignment
and is refused for NER.
"""
from __future__ import annotations

import logging
import random

import torch

from lmtune.config import AugmentConfig
from lmtune.errors import InputError
from lmtune.registry import augmenters
from lmtune.robust.attack import editable_positions, changes_for, seeded_rng
from lmtune.robust.text import Synonyms, Words, join_words, split_words, typo

log = logging.getLogger("lmtune")
# The word-level edits, registered in lmtune/registrations.py (kind "word"): each gets the example's
# words, the editable positions (shuffled; only those with synonyms when the edit needs them), how
# many to change and the rng, and returns the edited words or None.
def synonym_edit(w: Words, free: list[int], n: int, rng: random.Random, synonyms: Synonyms) -> Words | None:
    for j in free[:n]:
        w.words[j] = rng.choice(synonyms(w.words[j]))
    return w


def typo_edit(w: Words, free: list[int], n: int, rng: random.Random, synonyms: Synonyms) -> Words | None:
    for j in free[:n]:
        w.words[j] = typo(w.words[j], rng)
    return w


def insert_edit(w: Words, free: list[int], n: int, rng: random.Random, synonyms: Synonyms) -> Words | None:
    for new in [rng.choice(synonyms(w.words[j])) for j in free[:n]]:
        # never inside an entity: only before a word that does not continue one
        slots = [k for k in range(len(w.words) + 1) if w.tags is None or k == len(w.words) or not w.tags[k].startswith("I-")]
        k = rng.choice(slots)
        w.words.insert(k, new)
        w.protected.insert(k, False)
        if w.tags is not None:
            w.tags.insert(k, "O")
    return w


def swap_edit(w: Words, free: list[int], n: int, rng: random.Random, synonyms: Synonyms) -> Words | None:
    if len(free) < 2:
        return None
    for _ in range(n):
        a, b = rng.sample(free, 2)
        w.words[a], w.words[b] = w.words[b], w.words[a]  # both unprotected, both tagged O in NER
    return w


def delete_edit(w: Words, free: list[int], n: int, rng: random.Random, synonyms: Synonyms) -> Words | None:
    drop = set(free[: min(n, len(w.words) - 1)])
    return Words([x for k, x in enumerate(w.words) if k not in drop], [x for k, x in enumerate(w.protected) if k not in drop],
                 w.joiner, None if w.tags is None else [x for k, x in enumerate(w.tags) if k not in drop])


def edit(ex, method: str, prob: float, synonyms: Synonyms, rng: random.Random):
    """One EDA-style edit of an example by a registered word-level augmenter; None when the example
    offers nothing to edit."""
    w = split_words(ex)
    free = editable_positions(w)
    n = changes_for(w, prob)
    if augmenters.meta(method, "needs_synonyms"):
        free = [j for j in free if synonyms(w.words[j])]
    if not free:
        return None
    rng.shuffle(free)
    edited = augmenters.get(method)(w, free, n, rng, synonyms)
    return None if edited is None else join_words(ex, edited)


def augment(examples: list, cfg: AugmentConfig, model=None, tokenizer=None) -> list:
    """cfg.multiplier new rows per training row, each by one method drawn at random."""
    methods = list(cfg.methods)
    for m in methods:
        if augmenters.meta(m, "rewrites_text") and examples and examples[0].labels_per_token:
            raise InputError(f"augment.methods: {m} cannot keep NER tags aligned to words; use the word-level methods.")
    synonyms = Synonyms(cfg.synonyms, model, tokenizer) if any(augmenters.meta(m, "needs_synonyms") for m in methods) else None
    out, pending = [], {m: [] for m in methods if augmenters.meta(m, "kind") == "model"}
    for i, ex in enumerate(examples):
        for c in range(cfg.multiplier):
            rng = seeded_rng(cfg.seed, i, f"augment{c}")
            method = rng.choice(methods)
            if method in pending:
                pending[method].append((ex, rng))
                continue
            new = edit(ex, method, cfg.prob, synonyms, rng)
            if new is not None:
                out.append(new)
    for method, items in pending.items():  # a model-kind augmenter edits all its rows at once: one model load
        if items:
            out += augmenters.get(method)(items, cfg)
    log.info("augmentation: %d new training rows from %d (%s)", len(out), len(examples), ", ".join(methods))
    return out


@torch.inference_mode()
def mlm_substitute(items: list, cfg: AugmentConfig, batch_size: int = 32) -> list:
    """Masked-LM contextual substitution: mask some unprotected words and put in one of the LM's top-5
    whole-word guesses that differs from the original. items: (example, its rng)."""
    from transformers import AutoModelForMaskedLM
    lm, tok = _load(AutoModelForMaskedLM, cfg.mlm_model)
    prob = cfg.prob
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        masked, plans = [], []
        for ex, rng in chunk:
            w = split_words(ex)
            free = editable_positions(w)
            rng.shuffle(free)
            chosen = sorted(free[: changes_for(w, prob)])
            words = [tok.mask_token if j in chosen else x for j, x in enumerate(w.words)]
            masked.append(w.joiner.join(words))
            plans.append((ex, w, chosen, rng))
        enc = tok(masked, return_tensors="pt", padding=True, truncation=True, max_length=256)
        logits = lm(**enc).logits
        for b, (ex, w, chosen, rng) in enumerate(plans):
            where = (enc["input_ids"][b] == tok.mask_token_id).nonzero().flatten().tolist()
            for j, pos in zip(chosen, where):
                guesses = [tok.convert_ids_to_tokens(int(t)) for t in logits[b, pos].topk(10).indices]
                guesses = [g for g in guesses if g.isalpha() and g.lower() != w.words[j].lower()][:5]
                if guesses:
                    w.words[j] = rng.choice(guesses)
            if chosen:
                out.append(join_words(ex, w))
    return out


@torch.inference_mode()
def backtranslate(items: list, cfg: AugmentConfig, batch_size: int = 16) -> list:
    """Translate to a pivot language and back (MarianMT or any seq2seq model); the label is kept.
    Rows whose round trip comes back unchanged or empty are dropped. items: (example, its rng)."""
    examples = [ex for ex, _ in items]
    texts = translate([ex.text for ex in examples], cfg.translate_to, batch_size)
    back = translate(texts, cfg.translate_back, batch_size)
    import dataclasses
    return [dataclasses.replace(ex, text=t) for ex, t in zip(examples, back) if t.strip() and t.strip() != ex.text.strip()]


def translate(texts: list[str], model_name: str, batch_size: int = 16) -> list[str]:
    from transformers import AutoModelForSeq2SeqLM
    model, tok = _load(AutoModelForSeq2SeqLM, model_name)
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start: start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # not token_type_ids: seq2seq models refuse them
        gen = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=min(256, 2 * enc["input_ids"].shape[1] + 8))
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def _load(auto_cls, model_name: str):
    """A helper model (masked LM, translator) and its tokenizer, from the hub or a folder."""
    from transformers import AutoTokenizer

    from lmtune.models import quiet_transformers, resolve_model
    with quiet_transformers():
        path = resolve_model(model_name)
        return auto_cls.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
