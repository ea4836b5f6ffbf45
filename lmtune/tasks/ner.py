"""Named-entity recognition (token classification), English and Chinese.

What this module gets right that the usual scripts do not:
- labels go on the first sub-token of each word, found through the tokenizer's word ids, never by
  assuming one character or word is one token (words the tokenizer drops become [UNK]);
- sentences longer than max_length are cut into overlapping windows; each word's prediction comes
  from the window where it has the most context, so every gold word is predicted and scored;
- decoding is Viterbi over the allowed BIO transitions (no I-PER after O), and the number of
  sequences the raw argmax would have left invalid is reported;
- entity-level precision/recall/F1 come from seqeval, on the untruncated gold tags;
- distillation (lmtune.distill) is per word: the teacher's tag distribution of each word (its first sub-token, from
  the window where it has the most context) is the soft target of the student's first sub-token of that word.
  The decoding has no learned transition scores (no CRF: Viterbi over the fixed allowed BIO transitions), so the
  per-token logits (the emissions) are all a teacher knows, and all that is distilled.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForTokenClassification

from lmtune.config import Config
from lmtune.data.ner_readers import NerExample, convert, example_from_text, read_ner_raw, span_text
from lmtune.data.tagging import allowed, allowed_transitions, bio_labels, detect_scheme, from_bio, spans, split_tag, viterbi
from lmtune.errors import InputError
from lmtune.evaluate.abstain import choose_threshold
from lmtune.evaluate.calibration import choose_temperature, ece, fit_temperature, softmax
from lmtune.evaluate.calibration import metrics as calibration_metrics
from lmtune.evaluate.calibration import report_section as calibration_section
from lmtune.evaluate.report import prf_table
from lmtune.models import load_config, load_pretrained, quiet_transformers
from lmtune.tasks.base import (SHARED_ENCODER, ABSTAIN, CALIBRATE, DISTILL, EXPLAIN, LABEL_NOISE, Encoded, Splits, Task, balanced_weights,
                               class_score, cross_entropy_sum, input_pad_values, pad_rows, shuffle_split, soft_target_loss)
from lmtune.tasks.ner_config import NerColumns  # noqa: F401  (re-exported: code and saved configs name it here)


log = logging.getLogger("lmtune")


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the model expects before and after a sequence ([CLS] ... [SEP], <s> ... </s>)."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(inner) + 1):
        if full[i:i + len(inner)] == inner:
            return full[:i], full[i + len(inner):]
    return [], []


class NerTask(Task):
    name = "ner"
    headline = ("f1", "precision", "recall", "loss")
    peft_task_type = "TOKEN_CLS"
    hub_pipeline = "token-classification"
    capabilities = frozenset({SHARED_ENCODER, CALIBRATE, ABSTAIN, LABEL_NOISE, EXPLAIN, DISTILL})
    explain_tokens = True
    decision_key = "tags"
    span_key = "entities"

    encode_options = {"stride": "window_overlap", "label_all_subtokens": "label_all_subtokens"}

    def __init__(self) -> None:
        self.scheme = "bio"  # the data set's scheme, for reading later files and writing predictions back
        self.repairs: list[str] = []  # tags that broke the scheme in the training data, repaired
        self.temperature = 1.0  # fitted on dev after training: word tag probabilities and entity scores use it
        self.calibration: dict = {}
        self.threshold: float | None = None  # entities scored below it are withheld (abstain.target)
        self.abstention: dict = {}
        self.class_weight: torch.Tensor | None = None  # train.class_weights auto: inverse tag frequency
        self.focal_gamma = 0.0
        self.distillation: tuple[float, float] | None = None  # (temperature, alpha) while a student trains (lmtune.distill)

    def report_state(self) -> dict:
        return {"calibration": self.calibration, "abstention": self.abstention, "repairs": self.repairs}

    def set_report_state(self, data: dict) -> None:
        self.calibration = data.get("calibration", {})
        self.abstention = data.get("abstention", {})
        self.repairs = data.get("repairs", [])

    def state(self) -> dict:
        return {"tag_scheme": self.scheme, "temperature": self.temperature, "threshold": self.threshold}

    def set_state(self, state: dict) -> None:
        self.scheme = state.get("tag_scheme", "bio")
        self.temperature = float(state.get("temperature", 1.0))
        self.threshold = state.get("threshold")

    def from_texts(self, texts: list[str]) -> list[NerExample]:
        return [example_from_text(t) for t in texts]

    def without_labels(self, examples: list[NerExample]) -> list[NerExample]:
        return [replace(ex, tags=None) for ex in examples]  # tokens, text and offsets as read: the words stay the same

    # ---- data -------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[NerExample]:
        """A file for a trained run (evaluate, predict, attack): read in the run's tag scheme."""
        d = cfg.data
        scheme = d.tag_scheme if d.tag_scheme != "auto" else self.scheme
        raw = read_ner_raw(path, d.format, d.tag_column, d.encoding, require_label)
        known = {split_tag(x)[1] for x in labels if x != "O"} if labels is not None else None
        examples, repairs = convert(path, raw, scheme, require_label, known)
        if repairs:
            log.warning("%s: %d tag(s) inconsistent with %s, repaired (first: %s)", path, len(repairs), scheme.upper(), repairs[0])
        return examples

    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        files = {name: path for name, path in (("train", d.train), ("dev", d.dev), ("test", d.test)) if path}
        raw = {name: read_ner_raw(path, d.format, d.tag_column, d.encoding) for name, path in files.items()}
        # one scheme for the whole data set: a few stray tags in one file must not switch that file's reading
        scheme = d.tag_scheme if d.tag_scheme != "auto" else detect_scheme(
            [tags for sents in raw.values() for _, tags, *_ in sents if tags is not None])
        train, repairs = convert(d.train, raw["train"], scheme)
        types = {split_tag(t)[1] for ex in train for t in ex.tags if t != "O"}
        if not types:
            raise InputError(f"{d.train}: no entities in the training data (every tag is O).")
        labels = bio_labels(types)
        read = {}
        for name in ("dev", "test"):
            if name in raw:
                read[name], fixed = convert(files[name], raw[name], scheme, known_types=types)
                repairs += fixed
        if d.dev:
            dev, test = read["dev"], read.get("test", [])
            info = {"method": "files", "train": d.train, "dev": d.dev, "test": d.test}
        else:
            train, dev, test, info = shuffle_split(train, read.get("test"), d.split, cfg.train.seed, "sentence split", d.train)
        if repairs:
            log.warning("tag scheme %s (detected over %s): %d tag(s) break it and were repaired, e.g. %s",
                        scheme.upper(), ", ".join(files), len(repairs), "; ".join(repairs[:3]))
        self.repairs = repairs
        info["tag_scheme_repairs"] = {"count": len(repairs), "first": repairs[:100]}
        self.scheme = scheme
        if not dev:
            raise InputError(f"{d.train}: too few sentences to split off a dev set; give data.dev.")
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        info["tag_scheme"] = scheme
        self.focal_gamma = cfg.train.focal_gamma
        if cfg.train.class_weights == "auto":  # per BIO tag, over the words of train
            tags = Counter(t for ex in train for t in ex.tags)
            w = balanced_weights(np.array([tags[lab] for lab in labels]))
            self.class_weight = torch.tensor(w, dtype=torch.float)
            info["class_weights"] = dict(zip(labels, np.round(w, 4).tolist()))
        return Splits(train, dev, test, labels, info)

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        config = load_config(cfg.model.name, cfg.model.dropout, num_labels=len(labels),
                             id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)}, gguf=cfg.model.gguf_file)
        # byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM) take pre-split words only with a prefix space
        model, tokenizer = load_pretrained(AutoModelForTokenClassification, cfg.model.name, config, cfg.model.gguf_file,
                                           add_prefix_space=True)
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"model.name: {cfg.model.name} has no fast tokenizer; NER needs word ids for alignment.")
        return model, tokenizer

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return load_pretrained(AutoModelForTokenClassification, str(model_dir), add_prefix_space=True)

    # ---- encoding: sub-word alignment and windows ---------------------------------------------
    def encode(self, examples: list[NerExample], tokenizer: Any, max_length: int,
               labels: list[str] | None = None, stride: int | None = None, label_all_subtokens: bool = False) -> Encoded:
        prefix, suffix = _special_frame(tokenizer)
        budget = max_length - len(prefix) - len(suffix)
        overlap = stride if stride is not None else budget // 4
        index = {lab: i for i, lab in enumerate(labels or [])}
        with quiet_transformers():  # long sentences are windowed below: the "longer than max" warning does not apply
            enc = tokenizer([ex.tokens for ex in examples], is_split_into_words=True, add_special_tokens=False)
        features, windowed, unk_words = [], 0, 0
        for i, ex in enumerate(examples):
            ids, wids = enc["input_ids"][i], enc.word_ids(i)
            if len(set(w for w in wids if w is not None)) < len(ex.tokens):
                ids, wids, n = self._with_unk(ex.tokens, wids, tokenizer)
                unk_words += n
            first = [p for p, w in enumerate(wids) if w is not None and (p == 0 or wids[p - 1] != w)]
            windows = self._windows(first, len(ids), budget, overlap)
            windowed += len(windows) > 1
            for s, e in windows:
                lab = [-100] * (e - s)
                words = []
                for p in range(s, e):
                    w = wids[p]
                    is_first = p == 0 or wids[p - 1] != w
                    if is_first:
                        words.append((p - s + len(prefix), w, min(p - s, e - 1 - p)))
                    if ex.tags is not None and index:
                        tag = ex.tags[w]
                        if is_first:
                            lab[p - s] = index[tag]
                        elif label_all_subtokens:
                            lab[p - s] = index[tag if tag == "O" else "I-" + tag[2:]]
                row = prefix + ids[s:e] + suffix
                features.append({"input_ids": row, "labels": [-100] * len(prefix) + lab + [-100] * len(suffix),
                                 "length": len(row), "example": i, "words": words,
                                 **_soft_targets_at(ex, words, len(index) if index else None)})
        stats = {"examples": len(examples), "truncated": 0, "windowed": windowed, "windows": len(features),
                 "unk_words": unk_words}
        return Encoded(features, examples, stats)

    @staticmethod
    def _with_unk(tokens: list[str], wids: list, tokenizer: Any) -> tuple[list[int], list, int]:
        """Words the tokenizer turns into nothing (control characters, lone marks) become [UNK]."""
        present = {w for w in wids if w is not None}
        fixed = [t if i in present else (tokenizer.unk_token or "?") for i, t in enumerate(tokens)]
        enc = tokenizer([fixed], is_split_into_words=True, add_special_tokens=False)
        return enc["input_ids"][0], enc.word_ids(0), len(tokens) - len(present)

    @staticmethod
    def _windows(first: list[int], n: int, budget: int, overlap: int) -> list[tuple[int, int]]:
        """Sub-token windows of at most `budget`, starting and ending on word boundaries where possible."""
        if n <= budget:
            return [(0, n)]
        out, start = [], 0
        starts = set(first)
        while True:
            end = min(start + budget, n)
            if end < n:
                cut = max((p for p in first if start < p <= end), default=end)  # end before a word start
                end = cut if cut > start else end
            out.append((start, end))
            if end >= n:
                return out
            nxt = max(end - overlap, start + 1)
            later = [p for p in first if p >= nxt and p < end]
            start = later[0] if later else (nxt if nxt in starts or not first else end)

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        width = max(f["length"] for f in features)
        batch = {"input_ids": pad_rows([f["input_ids"] for f in features], width, tokenizer.pad_token_id or 0),
                 "attention_mask": pad_rows([[1] * f["length"] for f in features], width, 0),
                 "labels": pad_rows([f["labels"] for f in features], width, -100)}
        soft = _collate_soft_targets(features, width) if self.distillation else None
        if soft is not None:
            batch["soft_targets"] = soft
        return batch

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        # soft_targets: NaN rows are "no soft target here" (base.soft_target_loss masks them)
        return {**input_pad_values(tokenizer), "labels": -100, "soft_targets": float("nan")}

    def num_items(self, features: list[dict]) -> int:
        """Positions with a target: a hard label, a soft target or both (an unlabeled sentence's words have the soft
        one alone, and must count, or a batch of them would weigh as one token)."""
        return max(1, sum(len({p for p, x in enumerate(f["labels"]) if x != -100}.union(f.get("soft_positions", ())))
                          for f in features))

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.logits
        flat = logits.reshape(-1, logits.size(-1))
        hard = cross_entropy_sum(flat, batch["labels"].reshape(-1), self.class_weight, self.focal_gamma)
        if self.distillation is None or "soft_targets" not in batch:
            return hard
        # per position: the words' first sub-tokens carry the teacher's rows, every other position NaN (no soft term);
        # unlabeled sentences' labels are all -100, so they add the soft term alone
        temperature, alpha = self.distillation
        soft = batch["soft_targets"]
        return alpha * soft_target_loss(flat, soft.reshape(-1, soft.size(-1)), temperature) + (1 - alpha) * hard

    # ---- distillation (lmtune.distill) ----------------------------------------------------------
    def soft_targets(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], temperature: float) -> list[np.ndarray]:
        """Per sentence, float32 [words, tags]: log_softmax(calibrated logits / T) of each word's first sub-token, from
        the window where the word has the most context (word_log_probs: the distributions predict decodes).
        Calibrated, as classification's are: a small model's raw logits can sit far off scale."""
        out = []
        for ex, lp in zip(enc.examples, self.word_log_probs(outputs, enc, self.temperature * temperature)):
            if lp is None:  # every word has a window (see decode); refuse rather than teach a shifted sentence
                raise InputError(f"{ex.source}: the teacher left words of this sentence without a prediction, so its "
                                 "soft targets cannot be aligned to the words; report it with the sentence.")
            out.append(lp.astype(np.float32))
        return out

    def soft_target_alignment(self, shared_tokenizer: bool) -> str:
        return "position" if shared_tokenizer else "word"

    def distill_with(self, temperature: float, alpha: float) -> None:
        self.distillation = (float(temperature), float(alpha))

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        lp = torch.log_softmax(outputs.logits.float(), -1).cpu().numpy()
        lengths = batch["attention_mask"].sum(1).tolist()
        return [lp[i, :L] for i, L in enumerate(lengths)]

    # ---- merging windows, decoding, metrics ----------------------------------------------------
    def word_log_probs(self, outputs: list[np.ndarray], enc: Encoded, temperature: float | None = None) -> list[np.ndarray | None]:
        """Per example [n_words, L] tag log-probabilities (temperature-scaled: the task's unless given),
        each word from the window where it has the most context."""
        return self._scaled(self._merge_windows(outputs, enc), self.temperature if temperature is None else temperature)

    @staticmethod
    def _scaled(merged: list[np.ndarray | None], t: float) -> list[np.ndarray | None]:
        if t == 1.0:
            return merged
        return [None if lp is None else lp / t - np.logaddexp.reduce(lp / t, axis=-1, keepdims=True) for lp in merged]

    def _merge_windows(self, outputs: list[np.ndarray], enc: Encoded) -> list[np.ndarray | None]:
        best: list[dict] = [dict() for _ in enc.examples]
        for out, f in zip(outputs, enc.features):
            slot = best[f["example"]]
            for pos, w, ctx in f["words"]:
                if w not in slot or ctx > slot[w][0]:
                    slot[w] = (ctx, out[pos])
        merged = []
        for ex, slot in zip(enc.examples, best):
            merged.append(np.stack([slot[w][1] for w in range(len(ex.tokens))]) if len(slot) == len(ex.tokens) else None)
        return merged

    def decode(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str],
               merged: list[np.ndarray | None] | None = None) -> tuple[list, dict]:
        start_ok, trans_ok = allowed_transitions(labels)
        tags, probs, invalid, dropped = [], [], 0, 0
        merged = merged if merged is not None else self.word_log_probs(outputs, enc)
        for ex, lp in zip(enc.examples, merged):
            if lp is None:  # cannot happen with windows + [UNK] repair; counted so a regression shows
                dropped += len(ex.tokens)
                tags.append(["O"] * len(ex.tokens))
                probs.append(np.zeros(len(ex.tokens)))
                continue
            invalid += not allowed(lp.argmax(-1), start_ok, trans_ok)
            path = viterbi(lp, start_ok, trans_ok)
            tags.append([labels[k] for k in path])
            probs.append(np.exp(lp[np.arange(len(path)), path]))
        return list(zip(tags, probs)), {"invalid_sequences_argmax": invalid, "words_dropped": dropped}

    def example_probs(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[np.ndarray]:
        """Raw [words, tags] probabilities per sentence (the label-noise search's input)."""
        return [np.exp(lp) if lp is not None else np.full((len(ex.tokens), len(labels)), 1 / len(labels))
                for ex, lp in zip(enc.examples, self.word_log_probs(outputs, enc, 1.0))]

    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Fit the temperature on the tag distributions of dev's words. The decoded tags never change
        (Viterbi over log-probabilities divided by T > 0 finds the same path); word probabilities and
        entity scores become calibrated."""
        x, gold = self._word_table(self.word_log_probs(outputs, enc, 1.0), enc, labels)
        # applied only where it lowers the ECE of dev words it was not fitted on (choose_temperature)
        self.calibration = choose_temperature(x, gold, fit_temperature, lambda z, y: ece(softmax(z), y))
        self.temperature = float(self.calibration["temperature"])
        return self.calibration

    # ---- abstention: withhold low-scoring entities ----------------------------------------------
    def fit_threshold(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], target: str,
                      value: float | None, calibrated: bool = True, score: str | None = None) -> dict:
        """Choose on (dev) outputs the entity-score threshold for the target. Each predicted entity is
        one decision: precision = share of the kept entities that are exactly right (span and type);
        coverage = share of predicted entities kept; false_accept = share of the wrong ones kept. The
        score is the one predict reports (mean tag probability of its words, calibrated when
        train.calibrate). Entities below the threshold move from `entities` to `abstained_entities`."""
        if score not in (None, "probability"):
            raise InputError(f"abstain.score {score}: NER thresholds the entity score (probability) only.")
        conf, correct = self._entity_table(self.decode(outputs, enc, labels)[0], enc)
        if not len(conf):
            raise InputError("abstain.target: the model predicts no entity on dev, so there is nothing to threshold.")
        self.abstention = choose_threshold(conf, np.ones(len(conf), bool), correct, np.zeros(len(conf), bool), target, value)
        self.threshold = self.abstention["threshold"]
        return self.abstention

    @staticmethod
    def _entity_table(decoded: list, enc: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """Score of every predicted entity and whether it is exactly a gold one."""
        conf, correct = [], []
        for ex, (tags, probs) in zip(enc.examples, decoded):
            gold = set(spans(ex.tags)) if ex.tags is not None else set()
            for s, e, typ in spans(tags):
                conf.append(float(probs[s:e].mean()))
                correct.append((s, e, typ) in gold)
        return np.array(conf, dtype=float), np.array(correct, dtype=bool)

    def _abstention_metrics(self, decoded: list, enc: Encoded) -> dict:
        conf, correct = self._entity_table(decoded, enc)
        kept = conf >= self.threshold
        right, n_gold = int((kept & correct).sum()), sum(len(spans(ex.tags)) for ex in enc.examples if ex.tags is not None)
        p, r = right / max(int(kept.sum()), 1), right / max(n_gold, 1)
        return {"threshold": float(self.threshold), "coverage": float(kept.mean()) if len(kept) else 0.0,
                "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}

    @staticmethod
    def _word_table(merged: list[np.ndarray | None], enc: Encoded, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """[words, L] log-probabilities and the gold tag index of every labeled word."""
        index = {lab: i for i, lab in enumerate(labels)}
        rows, gold = [], []
        for ex, lp in zip(enc.examples, merged):
            if lp is not None and ex.tags is not None:
                rows.append(lp)
                gold += [index[t] for t in ex.tags]
        return (np.concatenate(rows) if rows else np.zeros((0, len(labels)))), np.array(gold, dtype=int)

    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        from seqeval.metrics import classification_report
        from seqeval.scheme import IOB2
        raw = self._merge_windows(outputs, enc)  # windows merged once, for decoding, the loss and calibration
        merged = self._scaled(raw, self.temperature)
        decoded, info = self.decode(outputs, enc, labels, merged)
        gold = [ex.tags for ex in enc.examples]
        pred = [t for t, _ in decoded]
        rep = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
        index = {lab: i for i, lab in enumerate(labels)}
        nll, n = 0.0, 0
        for ex, lp in zip(enc.examples, merged):
            if lp is not None:
                nll -= float(lp[np.arange(len(ex.tags)), [index[t] for t in ex.tags]].sum())
                n += len(ex.tags)
        types = sorted({split_tag(lab)[1] for lab in labels if lab != "O"})
        micro = rep.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        return {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
                "loss": nll / max(n, 1), "n": len(enc.examples), **info,
                "sentences_windowed": enc.stats.get("windowed", 0), "words": n,
                "per_type": {t: {k: float(rep[t][k]) for k in ("precision", "recall", "f1-score", "support")}
                             for t in types if t in rep},
                "errors": error_kinds(gold, pred, enc.examples),
                **calibration_metrics(*self._word_table(raw, enc, labels), self.temperature),  # of each word's tag
                **({"abstention": self._abstention_metrics(decoded, enc)} if self.threshold is not None else {})}

    # ---- explanations: one per entity, of its first word's B- tag ------------------------------------
    def explain_targets(self, row: dict, labels: list[str], label: str | None = None) -> list[dict]:
        if label is not None and f"B-{label}" not in labels:
            types = sorted({t[2:] for t in labels if t.startswith("B-")})
            raise InputError(f"explain label {label!r}: not an entity type of this model ({', '.join(types)}).")
        return [{"name": e["label"], "entity": e["text"], "word": e["token_start"], "index": labels.index(f"B-{e['label']}")}
                for e in row["entities"] if label is None or e["label"] == label]

    def target_score(self, logits: torch.Tensor, target: dict, log_odds: bool = False) -> torch.Tensor:
        return class_score(logits[:, target["position"]].float() / self.temperature, target["index"], log_odds)

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        decoded, _ = self.decode(outputs, enc, labels)
        rows = []
        for ex, (tags, probs) in zip(enc.examples, decoded):
            ents, withheld = [], []
            for s, e, typ in spans(tags):
                score = float(probs[s:e].mean())
                ent = {"text": span_text(ex, s, e), "label": typ, "score": round(score, 6),
                       "token_start": s, "token_end": e}
                if ex.offsets is not None:
                    ent["start"], ent["end"] = ex.offsets[s][0], ex.offsets[e - 1][1]
                (withheld if self.threshold is not None and score < self.threshold else ents).append(ent)
            row = {"text": ex.text} if ex.text is not None else {"tokens": ex.tokens}
            row["entities"] = ents
            if self.threshold is not None:
                row["abstained_entities"] = withheld
            row["tags"] = from_bio(tags, self.scheme)
            if ex.tags is not None:
                row["gold"] = from_bio(ex.tags, self.scheme)
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def span_types(self, labels: list[str]) -> list[str]:
        return sorted({split_tag(t)[1] for t in labels} - {None})

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        from pydantic import BaseModel

        class Entity(BaseModel):
            text: str
            label: str
            score: float
            start: int | None = None  # character offsets (text input)
            end: int | None = None
            token_start: int | None = None  # token offsets (token input)
            token_end: int | None = None
        return {"entities": (list[Entity], "Entity spans with character offsets and calibrated scores."),
                "abstained_entities": (list[Entity], "With an abstention threshold: the entities scored below it."),
                "tags": (list[str], "One tag per word, in the training files' tag scheme.")}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        repaired = (f"; {len(self.repairs)} tag(s) broke it and were repaired (e.g. {self.repairs[0]}; all in "
                    "splits.json)" if self.repairs else "; every sequence is consistent with it")
        lines = [f"**Tag scheme: {self.scheme.upper()}**, detected once over all the data files{repaired}. "
                 "Predictions are written in it.", ""]
        for split, m in split_metrics.items():
            lines += [f"### Entities by type ({split})", "",
                      f"Sentences cut into windows: {m['sentences_windowed']}; words without a prediction: "
                      f"{m['words_dropped']}; sequences the raw argmax would have left invalid: "
                      f"{m['invalid_sequences_argmax']} (the output uses constrained decoding and has none).", "",
                      *prf_table("type", m["per_type"], {min(m["per_type"], key=lambda t: m["per_type"][t]["f1-score"]): " (weakest)"}
                                 if len(m["per_type"]) > 1 else {})]
            lines += ["", f"Most frequent errors ({split}):", "", "| kind | count | example |", "|---|---|---|"]
            for kind, info in sorted(m["errors"].items(), key=lambda kv: -kv[1]["count"]):
                lines.append(f"| {kind} | {info['count']} | {info['example']} |")
            lines.append("")
        if self.threshold is not None:
            a = self.abstention
            lines += ["### Abstention", "", f"Entities scored below {self.threshold:.4f} are withheld (listed under "
                      "abstained_entities)" + (f"; chosen on dev for {a['target']} {a['value']}." if a else "."), "",
                      "| split | entities kept | precision | recall | F1 |", "|---|---|---|---|---|"]
            lines += [f"| {split} | {m['abstention']['coverage']:.1%} | {m['abstention']['precision']:.4f} | "
                      f"{m['abstention']['recall']:.4f} | {m['abstention']['f1']:.4f} |"
                      for split, m in split_metrics.items() if "abstention" in m]
            lines.append("")
        if self.calibration:
            lines += calibration_section(self.calibration, split_metrics, run_dir,
                                         "; ECE is over each word's tag, entity scores are means of their words'")
        return "\n".join(lines)


def _soft_targets_at(ex: NerExample, words: list[tuple[int, int, int]], n_labels: int | None) -> dict:
    """A feature's soft targets (lmtune.distill), when its sentence has them: the row of each word it holds, at the
    word's first sub-token ("soft_positions", "soft_targets" [k, tags]). A sentence whose targets do not have one row
    per word, or one column per tag, was taught on other words or tags than it has: an error, not a shifted lesson."""
    soft = getattr(ex, "soft_targets", None)  # joint's utterances reach here too, never with soft targets
    if soft is None:
        return {}
    soft = np.asarray(soft, dtype=np.float32)
    if soft.ndim != 2 or soft.shape[0] != len(ex.tokens) or (n_labels is not None and soft.shape[1] != n_labels):
        raise InputError(f"{ex.source}: soft targets of shape {list(soft.shape)} do not align with the sentence's "
                         f"{len(ex.tokens)} words{f' and {n_labels} tags' if n_labels else ''} (one row per word, one "
                         "column per tag); the teacher must label the same words with the same tags.")
    return {"soft_positions": [p for p, _, _ in words], "soft_targets": soft[[w for _, w, _ in words]]}


def _collate_soft_targets(features: list[dict], width: int) -> torch.Tensor | None:
    """The batch's soft targets [batch, width, tags], NaN where a position has none, or None when no feature has any.
    Through numpy, as pad_rows: the loop collates every step."""
    tags = next((f["soft_targets"].shape[1] for f in features if "soft_targets" in f), 0)
    if not tags:
        return None
    out = np.full((len(features), width, tags), np.nan, dtype=np.float32)
    for i, f in enumerate(features):
        if "soft_targets" in f:
            out[i, f["soft_positions"]] = f["soft_targets"]
    return torch.from_numpy(out)


def error_kinds(gold: list[list[str]], pred: list[list[str]], examples: list[NerExample]) -> dict:
    """Missed, spurious, wrong type, wrong boundary (and both), with one example each."""
    counts: Counter = Counter()
    example: dict[str, str] = {}
    for g_tags, p_tags, ex in zip(gold, pred, examples):
        g, p = set(spans(g_tags)), set(spans(p_tags))

        def show(s, e, t, ex=ex):
            return f"'{span_text(ex, s, e)}' {t} ({ex.source})"
        for s, e, t in g - p:
            over = [(a, b, u) for a, b, u in p if a < e and s < b]
            if not over:
                kind = "missed"
            elif any(a == s and b == e for a, b, u in over):
                kind = "wrong type"
            elif any(u == t for a, b, u in over):
                kind = "wrong boundary"
            else:
                kind = "wrong type and boundary"
            counts[kind] += 1
            example.setdefault(kind, show(s, e, t))
        for s, e, t in p - g:
            if not any(a < e and s < b for a, b, _ in g):
                counts["spurious"] += 1
                example.setdefault("spurious", show(s, e, t))
    return {k: {"count": v, "example": example[k].replace("|", "/")} for k, v in counts.items()}
