"""Domain-adaptive pretraining: `lmtune pretrain CONFIG` continues masked-language-model training of
model.name on unlabeled in-domain text (config `pretrain.*`, with train.lr / batch_size / epochs /
max_steps / seed), and writes OUTPUT_DIR/RUN_NAME/model, a folder `model.name` accepts.

The training loop is lmtune's own (same batching, AdamW groups, schedule, accumulation, DDP); the
new parts are the data (one text per line, or a table's text column), the masking and perplexity on
a held-out slice. A checkpoint without an MLM head (a sentence-embedding model such as the packaged
MiniLM) gets a new one: transformers initialises the missing prediction head, tied to the input
embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmtune.config import Config
from lmtune.errors import InputError
from lmtune.io import atomic_dir, write_json, write_jsonl, write_text
from lmtune.models import check_model, quiet_transformers, resolve_model
from lmtune.training.batching import eval_batches
from lmtune.training.loop import LoopTask, train_loop
from lmtune.training.optim import resolve_learning_rates

log = logging.getLogger("lmtune")
HELDOUT_MAX = 2000
_CJK = re.compile(r"[\u4e00-\u9fff]")


def read_texts(cfg: Config) -> list[str]:
    """Every non-empty text of pretrain.files: lines of .txt files, the text column of tables."""
    from lmtune.data.readers import read_examples, read_text_file
    if not cfg.pretrain.files:
        raise InputError("pretrain.files: no text files given. Set pretrain.files in the config (one text per line, "
                         "or tables with data.text_column).")
    texts: list[str] = []
    for f in cfg.pretrain.files:
        p = Path(f)
        if p.suffix.lower() == ".txt":
            if not p.is_file():
                raise InputError(f"{p}: file not found.")
            texts += [line.strip() for line in read_text_file(p, cfg.data.encoding).splitlines() if line.strip()]
        else:
            texts += [ex.text for ex in read_examples(p, cfg.data.text_column, None, None, cfg.data.format, cfg.data.encoding,
                                                      require_label=False)]
    if len(texts) < 20:
        raise InputError(f"pretrain.files: only {len(texts)} non-empty texts; masked-LM pretraining needs more (thousands).")
    return texts


def segment(text: str) -> list[str]:
    """Words for whole-word masking: jieba's segmentation for Chinese text, whitespace otherwise."""
    if _CJK.search(text):
        try:
            import jieba
        except ImportError:
            raise InputError("pretrain: whole-word masking of Chinese text segments words with jieba: pip install "
                             "'lmtune[robust]', or set pretrain.whole_word_mask false.") from None
        return [w for w in jieba.lcut(text) if w.strip()]
    return text.split()


def encode(texts: list[str], tokenizer, max_length: int, whole_word: bool) -> list[dict]:
    """Token ids per text, with the word each token belongs to (-1 for special tokens)."""
    if whole_word:
        enc = tokenizer([segment(t) for t in texts], is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        special = set(tokenizer.all_special_ids)
        word_ids = [[-1 if t in special else k for k, t in enumerate(ids)] for ids in enc["input_ids"]]
    return [{"input_ids": ids, "word_ids": w, "length": len(ids)} for ids, w in zip(enc["input_ids"], word_ids)]


class Masker:
    """Dynamic masking, drawn anew for every batch: BERT's rule (of the chosen tokens 80% [MASK], 10% a
    random token, 10% kept) over whole words or single tokens. Written here because transformers'
    whole-word collator only knows '##' word pieces, not jieba words for Chinese."""

    def __init__(self, tokenizer, probability: float, seed: int):
        self.tok, self.p = tokenizer, probability
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(f["length"] for f in features)
        n = len(features)
        ids = torch.full((n, width), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            L = f["length"]
            row = torch.tensor(f["input_ids"])
            words = torch.tensor(f["word_ids"])
            n_words = int(words.max()) + 1 if L else 0
            chosen = torch.rand(max(n_words, 1), generator=self.gen) < self.p
            if n_words and not chosen[:n_words].any():  # at least one masked word per text
                chosen[int(torch.randint(n_words, (1,), generator=self.gen))] = True
            picked = (words >= 0) & chosen[words.clamp(min=0)]
            labels[i, :L] = torch.where(picked, row, torch.tensor(-100))
            r = torch.rand(L, generator=self.gen)
            replaced = row.clone()
            replaced[picked & (r < 0.8)] = self.tok.mask_token_id
            rand = picked & (r >= 0.8) & (r < 0.9)
            replaced[rand] = torch.randint(len(self.tok), (int(rand.sum()),), generator=self.gen)
            ids[i, :L], mask[i, :L] = replaced, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mlm_loss(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each text's mean masked-token cross-entropy, summed over the texts (the loop divides by the
    step's number of texts, which it knows before the masks are drawn)."""
    logits, labels = outputs.logits.float(), batch["labels"]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    counted = (labels != -100).sum(1).clamp(min=1)
    return (ce.sum(1) / counted).sum()


@torch.inference_mode()
def perplexity(model, features: list[dict], tokenizer, probability: float, device: torch.device) -> float:
    """exp(mean cross-entropy of the masked tokens) on the held-out texts, with the same masks every
    time it is called (a fixed seed), so before and after are comparable."""
    was = model.training
    model.eval()
    masker = Masker(tokenizer, probability, seed=1234)
    total, count = 0.0, 0
    for idx in eval_batches([f["length"] for f in features], 4096, 64):
        batch = {k: t.to(device) for k, t in masker([features[i] for i in idx]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        total += float(F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum", ignore_index=-100))
        count += int((labels != -100).sum())
    model.train(was)
    return math.exp(total / max(count, 1))


class _Budget:
    """A loop callback that stops training after pretrain.max_minutes."""

    def __init__(self, minutes: float):
        self.deadline = time.perf_counter() + 60 * minutes if minutes > 0 else None

    def __call__(self, state) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline and not state.finished:
            state.finished, state.stop_reason = True, "reached pretrain.max_minutes"


def pretrain(cfg: Config) -> dict:
    """Read, mask, train, measure, write. Returns the results (also in RUN_DIR/pretrain.json)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, set_seed

    from lmtune.artifacts import RunDir, new_run_dir
    from lmtune.runtime import accelerator_for
    texts = read_texts(cfg)
    check_model(cfg.model.name, cfg.data.max_length)
    if cfg.run_name and (Path(cfg.output_dir) / cfg.run_name).exists():
        raise InputError(f"{Path(cfg.output_dir) / cfg.run_name}: already exists; pick another run_name.")
    p = cfg.pretrain
    random.Random(cfg.train.seed).shuffle(texts)
    n_held = min(HELDOUT_MAX, max(1, round(p.heldout * len(texts))))
    held, train_texts = texts[:n_held], texts[n_held:]
    path = resolve_model(cfg.model.name)
    set_seed(cfg.train.seed)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    if tokenizer.mask_token_id is None:
        raise InputError(f"model.name: {cfg.model.name}'s tokenizer has no mask token; masked-LM pretraining needs an "
                         "encoder such as BERT or MiniLM.")
    new_head = sorted(k for k in info["missing_keys"] if not k.endswith("position_ids"))
    if new_head:
        log.info("pretrain: %s has no masked-LM head; created one (%d new tensors)", cfg.model.name, len(new_head))
    t0 = time.perf_counter()
    features = encode(train_texts, tokenizer, cfg.data.max_length, p.whole_word_mask)
    held_features = encode(held, tokenizer, cfg.data.max_length, p.whole_word_mask)
    accelerator = accelerator_for(cfg.train.precision)
    model.to(accelerator.device)
    ppl_before = perplexity(model, held_features, tokenizer, p.mlm_probability, accelerator.device)
    log.info("pretrain: %d texts (%d held out), perplexity before %.2f", len(train_texts), len(held), ppl_before)
    lrs = dataclasses.replace(resolve_learning_rates(cfg.train, model), metric="loss")
    masker = Masker(tokenizer, p.mlm_probability, cfg.train.seed)
    task = LoopTask(masker, mlm_loss, len, None)
    state = train_loop(model, features, task, lrs, None, accelerator, callbacks=(_Budget(p.max_minutes),))
    model = accelerator.unwrap_model(model)
    ppl_after = perplexity(model, held_features, tokenizer, p.mlm_probability, accelerator.device)
    result = {"model": cfg.model.name, "texts": len(train_texts), "heldout": len(held), "steps": state.step,
              "stop_reason": state.stop_reason, "seconds": time.perf_counter() - t0, "perplexity_before": ppl_before,
              "perplexity_after": ppl_after, "whole_word_mask": p.whole_word_mask, "mlm_probability": p.mlm_probability,
              "new_head_tensors": len(new_head), "lr": lrs.lr}
    log.info("pretrain: %d steps, perplexity %.2f -> %.2f", state.step, ppl_before, ppl_after)
    if accelerator.is_main_process:
        rd = RunDir(new_run_dir(cfg))
        with atomic_dir(rd.model) as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_text(rd.config, cfg.to_yaml())
        write_jsonl(rd.history, state.history)
        result["model_dir"] = str(rd.model)
        write_json(rd.pretrain, result)
    accelerator.wait_for_everyone()
    return result


def summary(result: dict) -> str:
    return json.dumps({k: result[k] for k in ("model_dir", "steps", "perplexity_before", "perplexity_after") if k in result})
