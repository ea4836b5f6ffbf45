"""Extractive question answering: the answer to a question as a span of its context (support
documents, contracts, manuals), English and Chinese.

What this module gets right that the usual scripts do not:
- contexts longer than the window are cut into windows that overlap by `data.window_overlap`
  tokens (default a quarter of the window), so an answer cut at one window's edge is whole in the
  next; each window learns where the answer is, or that it is not there ([CLS]);
- the answer is decoded over all windows of a question at once: the n-best starts and ends of every
  window, only spans inside the context, end not before start, at most `max_answer_tokens` long,
  the best total score wins (per-window decoding, or independent start/end argmaxes, return
  answers from the wrong window or spans that end before they start);
- character offsets come from the fast tokenizer's offset mapping into the original context, so a
  lowercasing, accent-stripping or Chinese tokenizer still returns the exact original substring;
- SQuAD's official normalization for EM/F1 (lower case, no punctuation or articles); for Chinese,
  CMRC 2018's character-level F1 (longest common substring) and EM without punctuation;
- training answers whose offset does not match the context are re-located (the occurrence nearest
  the given offset) or skipped, and the audit lists them by file and id; nothing wrong is kept; dev and
  test answers whose text is not in the context are scored all the same (a miss unless predicted);
- questions without an answer (SQuAD 2.0 style) are learned as [CLS]; a null-score margin is tuned
  on dev for the best F1, and a score threshold can make predict abstain (abstain.target).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering

from lmtune.config import Config
from lmtune.data.readers import Example, read_rows, read_text_file, row_unit
from lmtune.errors import InputError
from lmtune.evaluate.abstain import choose_threshold
from lmtune.models import load_config, load_pretrained, quiet_transformers
from lmtune.robust.text import is_cjk
from lmtune.tasks.base import ABSTAIN, DEV_RULES, Encoded, Splits, Task, pad_batch, shuffle_split

N_BEST = 20
MAX_ANSWER_TOKENS = 30
_CJK_PUNCT = "，。！？、；：“”‘’（）《》〈〉【】『』「」﹃﹄〔〕…—～·．"


@dataclass
class QAExample(Example):
    context: str = ""
    answers: list[dict] = field(default_factory=list)  # [{"text", "start"}]; [] with label "" = no answer
    qid: str = ""

    def audit_text(self) -> str:
        return f"{self.text} [SEP] {self.context}"

    def audit_units(self) -> list[str]:
        return []

    def audit_gold(self) -> str | None:
        return None if self.label is None else (self.answers[0]["text"] if self.answers else "")


# ---- scoring ------------------------------------------------------------------------------------
def _normalize_en(s: str) -> str:
    """SQuAD v1.1's official normalization."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _tokens_zh(s: str) -> list[str]:
    """CMRC 2018's mixed segmentation: each Chinese character alone, runs of other letters/digits as words."""
    out, word = [], ""
    for ch in s.lower():
        if ch in _CJK_PUNCT or ch in string.punctuation or ch.isspace():
            if word:
                out.append(word)
            word = ""
        elif is_cjk(ch):
            if word:
                out.append(word)
            out.append(ch)
            word = ""
        else:
            word += ch
    return out + ([word] if word else [])


def _lcs(a: list[str], b: list[str]) -> int:
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def em_f1(pred: str, golds: list[str], chinese: bool) -> tuple[float, float]:
    """Exact match and F1 of a prediction against its best gold answer (an empty gold list: no answer)."""
    if not golds:
        return (float(pred == ""),) * 2
    if chinese:
        p = _tokens_zh(pred)
        scores = []
        for g in golds:
            t = _tokens_zh(g)
            n = _lcs(p, t)
            f = 0.0 if n == 0 else 2 * (n / len(p)) * (n / len(t)) / (n / len(p) + n / len(t))
            scores.append((float("".join(p) == "".join(t)), f))
        return max(s[0] for s in scores), max(s[1] for s in scores)
    p = _normalize_en(pred).split()
    em, f1 = 0.0, 0.0
    for g in golds:
        t = _normalize_en(g).split()
        em = max(em, float(p == t))
        common = sum((collections.Counter(p) & collections.Counter(t)).values())
        if common:
            prec, rec = common / len(p), common / len(t)
            f1 = max(f1, 2 * prec * rec / (prec + rec))
        elif not p and not t:
            f1 = max(f1, 1.0)
    return em, f1


# ---- reading ------------------------------------------------------------------------------------
def _squad_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """The questions of a SQuAD JSON file as ("id X", row); its structure is checked on the way."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).") from None
    shape = "a .json QA file must be SQuAD-style: {\"data\": [{\"paragraphs\": [{\"context\": ..., \"qas\": [...]}]}]}"
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: {shape}.")
    rows = []
    for a, art in enumerate(doc["data"]):
        paragraphs = art.get("paragraphs", []) if isinstance(art, dict) else None
        if not isinstance(paragraphs, list) or not all(isinstance(x, dict) for x in paragraphs):
            raise InputError(f"{path}: data[{a}]: {shape}.")
        for k, para in enumerate(paragraphs):
            qas = para.get("qas", [])
            if not isinstance(qas, list) or not all(isinstance(x, dict) for x in qas):
                raise InputError(f"{path}: data[{a}].paragraphs[{k}]: 'qas' must be a list of objects; {shape}.")
            rows += [(f"id {qa.get('id', '?')}", {"question": qa.get("question"), "context": para.get("context"),
                                                  "answers": qa.get("answers"), "id": qa.get("id"),
                                                  "is_impossible": qa.get("is_impossible", False),
                                                  "title": art.get("title")}) for qa in qas]
    return rows


def _answer_start(value: object, where: str) -> int:
    """A character offset: an integer (1.0 is 1, as JSON numbers go); missing is -1 (found by its text).
    A string such as "12" is refused: it is not an offset the file meant as a number, and re-locating it
    silently would hide a broken export."""
    if value is None:
        return -1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: answer_start must be an integer (a character offset into the context), "
                         f"got {json.dumps(value)}. Write it as a number.")
    return value


def _answer_list(raw: object, where: str) -> list[tuple[str, int]]:
    """A question's answers as (text, start): {"text": [...], "answer_start": [...]} (lists of one length),
    [{"text", "answer_start"}, ...], or either as JSON in a CSV cell."""
    shape = 'answers must be {"text": [...], "answer_start": [...]} or [{"text": ..., "answer_start": ...}]'
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError:
            raise InputError(f"{where}: {shape} (in a CSV cell: that JSON), got {raw[:60]!r}.") from None
    if isinstance(raw, dict):
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise InputError(f"{where}: {shape}; 'text' and 'answer_start' must be lists.")
        if len(texts) != len(starts):
            raise InputError(f"{where}: answers has {len(texts)} text(s) but {len(starts)} answer_start value(s); "
                             "give one start per text.")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        raise InputError(f"{where}: {shape}.")
    out = []
    for a in raw:
        text = a.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{where}: an answer's text must be a string, got {json.dumps(text)[:60]}.")
        out.append((text or "", _answer_start(a.get("answer_start"), where)))
    return out


# ---- the task -----------------------------------------------------------------------------------
class QATask(Task):
    name = "qa"
    headline = ("f1", "exact_match", "loss")
    peft_task_type = "QUESTION_ANS"
    hub_pipeline = "question-answering"
    capabilities = frozenset({ABSTAIN, DEV_RULES})
    encode_options = {"overlap": "window_overlap"}
    output_names = ("start_logits", "end_logits")
    decision_key = "answer"

    def __init__(self) -> None:
        self.null_margin: float | None = None  # no-answer questions seen in train: predict "" when null beats the span by this
        self.threshold: float | None = None  # abstain below this answer probability (abstain.target, chosen on dev)
        self.abstention: dict = {}
        self.data_problems: list[dict] = []  # answers re-located or skipped when reading (the audit lists them)

    def state(self) -> dict:
        return {"null_margin": self.null_margin, "threshold": self.threshold}

    def set_state(self, state: dict) -> None:
        self.null_margin, self.threshold = state.get("null_margin"), state.get("threshold")

    def reads_pairs(self, cfg: Config) -> bool:
        return True  # (question, context)

    # ---- data -------------------------------------------------------------------------------
    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None,
                  require_label: bool = True) -> list[QAExample]:
        """SQuAD JSON ({"data": [{"paragraphs": [{"context", "qas"}]}]}), or rows (JSONL/CSV) with
        question, context and answers ({"text": [...], "answer_start": [...]} or [{"text", "answer_start"}];
        in a CSV cell, that JSON). An answer whose text is not in its context is kept with start -1: dev
        and test score it (a miss unless predicted, as the official SQuAD script scores every question);
        read() drops it from train."""
        p = Path(path)
        if p.suffix.lower() == ".json":
            rows = _squad_rows(p, read_text_file(p, cfg.data.encoding))
        else:
            unit = row_unit(path)
            rows = [(f"{unit} {line}", row) for line, row in read_rows(path, cfg.data.format, cfg.data.encoding)]
        out = []
        for where, row in rows:
            ex = self._example(row, f"{path}: {where}", f"{path}:{row.get('id') or where.split()[-1]}", require_label)
            if ex is not None:
                out.append(ex)
        if not out:
            raise InputError(f"{path}: no usable questions.")
        return out

    def _example(self, row: dict, where: str, source: str, require_label: bool) -> QAExample | None:
        q, ctx = row.get("question"), row.get("context")
        if not isinstance(q, str) or not q.strip() or not isinstance(ctx, str) or not ctx.strip():
            raise InputError(f"{where}: needs a non-empty 'question' and 'context'.")
        qid = "" if row.get("id") is None else str(row["id"])
        if row.get("answers") is None:
            if require_label:
                raise InputError(f"{where}: no 'answers'; give them (an empty list for a question without an answer).")
            return QAExample(q.strip(), None, source, context=ctx, qid=qid)
        raw = _answer_list(row["answers"], where)
        answers = []
        for text, start in raw:
            if not text.strip():
                continue
            if start < 0 or ctx[start:start + len(text)] != text:
                found = [m.start() for m in re.finditer(re.escape(text), ctx)]
                self.data_problems.append({"where": source, "answer": text, "given_start": start,
                                           "fix": "re-located" if found else "not in the context"})
                start = min(found, key=lambda s: abs(s - start)) if found else -1  # -1: scored, never trained on
            answers.append({"text": text, "start": start})
        if raw and not answers:
            return None  # every answer of the question is empty text: the question is dropped
        return QAExample(q.strip(), "answer" if answers else "", source, context=ctx, answers=answers, qid=qid)

    def _train_on_locatable(self, train: list[QAExample]) -> list[QAExample]:
        """Training needs the answer's span: answers whose text is not in the context leave train (a question
        left with none leaves too) and are listed as skipped; in dev and test they stay and are scored."""
        in_train = {ex.source for ex in train}
        for p in self.data_problems:
            if p["fix"] == "not in the context":
                p["fix"] = "skipped" if p["where"] in in_train else "scored"
        out = []
        for ex in train:
            kept = [a for a in ex.answers if a["start"] >= 0]
            if ex.answers and not kept:
                continue
            out.append(ex if len(kept) == len(ex.answers) else dataclasses.replace(ex, answers=kept))
        return out

    def read(self, cfg: Config) -> Splits:
        d = cfg.data
        self.data_problems = []
        if not d.train:
            raise InputError("data.train: no training file given. Set data.train or pass --data.train FILE.")
        train = self.read_file(d.train, cfg)
        if d.dev:
            dev = self.read_file(d.dev, cfg)
            test = self.read_file(d.test, cfg) if d.test else []
            info = {"method": "files", "train": d.train, "dev": d.dev, "test": d.test}
        else:  # by context: questions on one passage never straddle train and dev
            test = self.read_file(d.test, cfg) if d.test else None
            contexts = list(dict.fromkeys(ex.context for ex in train))
            tr, dv, te, info = shuffle_split([Example(c, None, c[:40]) for c in contexts], None if test is None else [],
                                             d.split, cfg.train.seed, "random split by context", d.train)
            side = {**{ex.text: "train" for ex in tr}, **{ex.text: "dev" for ex in dv}, **{ex.text: "test" for ex in te}}
            parts = {"train": [], "dev": [], "test": []}
            for ex in train:
                parts[side[ex.context]].append(ex)
            train, dev = parts["train"], parts["dev"]
            test = test if test is not None else parts["test"]
            info.pop("dev_rows", None)
        train = self._train_on_locatable(train)
        if not dev:
            raise InputError(f"{d.train}: too few questions to split off a dev set; give data.dev.")
        info["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
        info["answer_problems"] = len(self.data_problems)
        self.null_margin = 0.0 if any(ex.label == "" for ex in train) else None
        return Splits(train, dev, test, ["start", "end"], info)

    def from_texts(self, texts: list) -> list[QAExample]:
        return [QAExample(q, None, "", context=c) for q, c in texts]

    def audit_findings(self, splits: Splits) -> list[dict]:
        if not self.data_problems:
            return []
        fixes = collections.Counter(p["fix"] for p in self.data_problems)
        scored = (f", {fixes['scored']} in dev/test scored as given (their text is not in the context: a miss "
                  "unless predicted)") if fixes["scored"] else ""
        return [{"check": "answer_offsets", "severity": "warning",
                 "detail": f"{len(self.data_problems)} answer(s) whose offset does not match the context: "
                           f"{fixes['re-located']} re-located to the nearest occurrence of their text, "
                           f"{fixes['skipped']} skipped (their text is not in the context){scored}",
                 "suggestion": "Fix the answer_start values (offsets count characters of the context).",
                 "examples": [f"{p['where']}: {p['answer']!r} at {p['given_start']} ({p['fix']})" for p in self.data_problems]}]

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        config = load_config(cfg.model.name, cfg.model.dropout, gguf=cfg.model.gguf_file)
        return load_pretrained(AutoModelForQuestionAnswering, cfg.model.name, config, cfg.model.gguf_file)

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        return load_pretrained(AutoModelForQuestionAnswering, str(model_dir))

    # ---- encoding: windows over the context ---------------------------------------------------
    def encode(self, examples: list[QAExample], tokenizer: Any, max_length: int, labels: list[str] | None = None,
               overlap: int | None = None) -> Encoded:
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("task qa needs a fast tokenizer (character offsets); this model has none.")
        q_len = max((len(x) for x in tokenizer([ex.text for ex in examples], add_special_tokens=False)["input_ids"]), default=0)
        if q_len + 8 > max_length // 2:
            raise InputError(f"a question of {q_len} tokens leaves too little of data.max_length {max_length} for the context; "
                             "raise data.max_length.")
        stride = overlap if overlap is not None else max(max_length // 4, 8)
        with quiet_transformers():
            enc = tokenizer([ex.text for ex in examples], [ex.context for ex in examples], truncation="only_second",
                            max_length=max_length, stride=stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        features, windowed = [], collections.Counter()
        for k, ids in enumerate(enc["input_ids"]):
            i = enc["overflow_to_sample_mapping"][k]
            seq = enc.sequence_ids(k)
            offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][k], seq)]
            windowed[i] += 1
            f = {"input_ids": ids, "length": len(ids), "example": i, "offsets": offsets}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][k]
            ex = examples[i]
            if ex.label is not None:
                f["start"], f["end"] = self._target(ex, offsets)
            features.append(f)
        return Encoded(features, examples, {"examples": len(examples), "truncated": 0, "windows": len(features),
                                            "windowed": sum(n > 1 for n in windowed.values()),
                                            "max_tokens": max((len(f["input_ids"]) for f in features), default=0)})

    @staticmethod
    def _target(ex: QAExample, offsets: list) -> tuple[int, int]:
        """Token start/end of the first answer when this window holds all of it, else (0, 0): [CLS]."""
        located = [a for a in ex.answers if a["start"] >= 0]  # (a dev answer not in its context has none: [CLS])
        if not located:
            return 0, 0
        a = located[0]
        s, e = a["start"], a["start"] + len(a["text"])
        inside = [k for k, o in enumerate(offsets) if o is not None]
        if not inside or offsets[inside[0]][0] > s or offsets[inside[-1]][1] < e:
            return 0, 0
        start = next(k for k in inside if offsets[k][1] > s)
        end = next(k for k in reversed(inside) if offsets[k][0] < e)
        return start, end

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, tokenizer)
        if "start" in features[0]:
            batch["labels"] = torch.tensor([[f["start"], f["end"]] for f in features], dtype=torch.long)
        return batch

    def num_items(self, features: list[dict]) -> int:
        return len(features)

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["labels"]
        return (F.cross_entropy(outputs.start_logits.float(), y[:, 0], reduction="none")
                + F.cross_entropy(outputs.end_logits.float(), y[:, 1], reduction="none")) / 2

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.example_losses(outputs, batch).sum()

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        s, e = outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()
        n = batch["attention_mask"].sum(1).tolist()
        return [np.stack([s[i, :n[i]], e[i, :n[i]]]) for i in range(len(n))]

    # ---- decoding -----------------------------------------------------------------------------
    def _decode(self, outputs: list[np.ndarray], enc: Encoded) -> list[dict]:
        """Per question: the best valid span over all its windows, its probability among the n-best
        candidates, and the null ([CLS]) score margin."""
        best: list[dict] = []
        for ex, windows in zip(enc.examples, self._windows(outputs, enc)):
            cands, null = [], -np.inf
            for f, out in windows:
                s, e, offsets = out[0], out[1], f["offsets"]
                null = max(null, float(s[0] + e[0]))
                starts = [k for k in np.argsort(-s)[:N_BEST] if k < len(offsets) and offsets[k] is not None]
                ends = [k for k in np.argsort(-e)[:N_BEST] if k < len(offsets) and offsets[k] is not None]
                for a in starts:
                    for b in ends:
                        if a <= b < a + MAX_ANSWER_TOKENS:
                            cands.append((float(s[a] + e[b]), offsets[a][0], offsets[b][1]))
            if not cands:
                best.append({"answer": "", "start": None, "end": None, "score": 0.0, "margin": np.inf})
                continue
            scores = np.array([c[0] for c in cands])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            k = int(scores.argmax())
            _, cs, ce = cands[k]
            best.append({"answer": ex.context[cs:ce], "start": int(cs), "end": int(ce), "score": float(probs[k]),
                         "margin": float(null - scores[k])})
        return best

    @staticmethod
    def _windows(outputs: list[np.ndarray], enc: Encoded) -> list[list[tuple[dict, np.ndarray]]]:
        out: list[list] = [[] for _ in enc.examples]
        for f, o in zip(enc.features, outputs):
            out[f["example"]].append((f, o))
        return out

    def _answered(self, d: dict) -> bool:
        return self.null_margin is None or d["margin"] < self.null_margin

    def _chinese(self, enc: Encoded) -> bool:
        return bool(enc.examples) and is_cjk(enc.examples[0].context[:200])

    # ---- capability hooks ---------------------------------------------------------------------
    def fit_threshold(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], target: str,
                      value: float | None, calibrated: bool = True, **kw) -> dict:
        """An answer-probability threshold on dev for the target (correct = exact match)."""
        decoded = self._decode(outputs, enc)
        zh = self._chinese(enc)
        conf = np.array([d["score"] for d in decoded])
        correct = np.array([em_f1(d["answer"], [a["text"] for a in ex.answers], zh)[0] == 1.0
                            for d, ex in zip(decoded, enc.examples)])
        self.abstention = choose_threshold(conf, np.ones(len(conf), bool), correct, np.zeros(len(conf), bool), target, value)
        self.threshold = self.abstention["threshold"]
        return self.abstention

    def fit_decision_rules(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """With no-answer questions in train: the null margin with the best dev F1."""
        if self.null_margin is None:
            return {"no_answer": "none in train"}
        decoded, zh = self._decode(outputs, enc), self._chinese(enc)
        golds = [[a["text"] for a in ex.answers] for ex in enc.examples]
        best = (-1.0, 0.0)
        for m in sorted({0.0, *(d["margin"] for d in decoded if np.isfinite(d["margin"]))}):
            f1 = np.mean([em_f1(d["answer"] if d["margin"] < m + 1e-9 else "", g, zh)[1] for d, g in zip(decoded, golds)])
            best = max(best, (float(f1), m + 1e-6))
        self.null_margin = best[1]
        return {"null_margin": round(self.null_margin, 4), "dev_f1": round(best[0], 4)}

    # ---- metrics and outputs ------------------------------------------------------------------
    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        decoded, zh = self._decode(outputs, enc), self._chinese(enc)
        ems, f1s = [], []
        for d, ex in zip(decoded, enc.examples):
            em, f1 = em_f1(d["answer"] if self._answered(d) else "", [a["text"] for a in ex.answers], zh)
            ems.append(em)
            f1s.append(f1)
        losses = []
        for f, out in zip(enc.features, outputs):
            if "start" in f:
                ls = torch.log_softmax(torch.from_numpy(out), -1)
                losses.append(-float(ls[0, f["start"]] + ls[1, f["end"]]) / 2)
        m = {"exact_match": float(np.mean(ems)) if ems else 0.0, "f1": float(np.mean(f1s)) if f1s else 0.0,
             "loss": float(np.mean(losses)) if losses else 0.0, "n": len(ems), "windows": len(enc.features),
             "scoring": "cmrc2018 (characters)" if zh else "squad v1.1"}
        if self.threshold is not None:
            kept = [k for k, d in enumerate(decoded) if d["score"] >= self.threshold]
            m["coverage"] = len(kept) / max(len(decoded), 1)
            m["exact_match_answered"] = float(np.mean([ems[k] for k in kept])) if kept else 0.0
        return m

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        rows = []
        for d, ex in zip(self._decode(outputs, enc), enc.examples):
            answered = self._answered(d)
            row = {"text": ex.text, "answer": d["answer"] if answered else "", "start": d["start"] if answered else None,
                   "end": d["end"] if answered else None, "score": round(d["score"], 6)}
            if self.threshold is not None and d["score"] < self.threshold:
                row["abstained"] = True
            if ex.label is not None:
                row["gold"] = [a["text"] for a in ex.answers]
            if ex.qid:
                row["id"] = ex.qid
            if ex.source:
                row["source"] = ex.source
            rows.append(row)
        return rows

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        return {"answer": (str, "The answer: a span of the context ('' when the model finds none)."),
                "start": (int, "Character offset of the answer in the context."),
                "end": (int, "Character offset just after the answer."),
                "score": (float, "Probability of the answer among the n-best spans of all windows."),
                "abstained": (bool, "True when the score is below the threshold chosen on dev.")}

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        lines = ["### Question answering", "", "| split | exact match | F1 | questions | windows | scoring |", "|---|---|---|---|---|---|"]
        for split, m in split_metrics.items():
            lines.append(f"| {split} | {m['exact_match']:.4f} | {m['f1']:.4f} | {m['n']} | {m['windows']} | {m['scoring']} |")
        lines += ["", "Answers are decoded over all windows of a question (n-best starts and ends, spans inside the context, "
                  f"at most {MAX_ANSWER_TOKENS} tokens)."]
        if self.null_margin is not None:
            lines.append(f"No-answer margin tuned on dev: {self.null_margin:.3f}.")
        return "\n".join(lines) + "\n"
