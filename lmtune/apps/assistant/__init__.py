"""A customer-service assistant on lmtune: every message is routed by an intent run that knows when it
does not know, and answered from an FAQ file, or handed off to a person.

Routes (the first that applies):
1. intent: the intent run is confident (it does not abstain, and the label is not the out-of-scope
   label) and the FAQ has an answer for that intent -> that answer;
2. faq: otherwise, with a retrieval run, the message is searched against the FAQ entries; the best
   entry is answered when its cosine score reaches the threshold chosen on dev (the one that routes
   the most dev messages right: the right answer, or a hand-off for an out-of-scope one). With a
   reranker (a pair run: lmtune.rerank) the retriever's `rerank_depth` best entries are re-ordered
   by the pair run, and the threshold applies to its relevance score instead;
3. handoff: otherwise the fallback text, with `handoff: true`.
`lmtune assistant serve` puts it behind the same API keys, size limits, request ids, metrics and
PII-masked access log as `lmtune serve`, with sessions and a small chat page
(lmtune/apps/assistant/server.py). Example config: lmtune/apps/assistant/example.yaml.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmtune.apps import load_app_config
from lmtune.data.readers import read_rows
from lmtune.errors import InputError
from lmtune.rerank import rerank

log = logging.getLogger("lmtune.assistant")
EXAMPLE = Path(__file__).with_name("example.yaml")
FALLBACK = "I'm not sure I can help with that. Let me pass you to a colleague."


@dataclass
class AssistantConfig:
    intents: str = ""  # run dir: classification with abstention (abstain.* keys) and, ideally, an out-of-scope label
    faq: str = ""  # file: one row per answer, with its intent (and optionally a question to search)
    faq_intent_column: str = "intent"
    faq_answer_column: str = "answer"
    faq_question_column: str | None = None  # what the retriever searches (default: the answer)
    retriever: str | None = None  # run dir of a task retrieval run
    reranker: str | None = None  # run dir of a pair run (capability rerank) that re-orders the retriever's best entries
    rerank_depth: int = 5
    rerank_label: str | None = None  # the pair run's label that means relevant (default: 1 / true / yes / relevant ...)
    dev: str | None = None  # labeled messages (data.text_column / label_column of the intent run) to choose the threshold
    oos_label: str = "oos"
    fallback: str = FALLBACK
    retrieval_threshold: float | None = None  # chosen on dev when dev is given; else retrieval never answers


def load_config(path: str | Path) -> AssistantConfig:
    cfg = load_app_config(path, AssistantConfig, ("intents", "faq", "retriever", "reranker", "dev"), EXAMPLE)
    if cfg.reranker and not cfg.retriever:
        raise InputError(f"{path}: reranker re-orders the retriever's candidates; give retriever too.")
    if cfg.rerank_depth < 1:
        raise InputError(f"{path}: rerank_depth must be at least 1, got {cfg.rerank_depth}.")
    return cfg


def read_faq(cfg: AssistantConfig) -> list[dict]:
    """FAQ rows {intent, answer, question}; one answer per intent (the first row wins)."""
    out: list[dict] = []
    seen: set[str] = set()
    for line, row in read_rows(cfg.faq):
        for col in (cfg.faq_intent_column, cfg.faq_answer_column, *([cfg.faq_question_column] if cfg.faq_question_column else [])):
            if col not in row:
                raise InputError(f"{cfg.faq}: line {line}: no column '{col}' (columns are: {', '.join(map(repr, row))}). "
                                 "Set faq_intent_column / faq_answer_column / faq_question_column.")
        intent, answer = str(row[cfg.faq_intent_column]).strip(), str(row[cfg.faq_answer_column] or "").strip()
        if not answer:
            raise InputError(f"{cfg.faq}: line {line}: the answer is empty. Give every FAQ row an answer.")
        if intent in seen:
            continue
        seen.add(intent)
        out.append({"intent": intent, "answer": answer,
                    "question": str(row[cfg.faq_question_column]).strip() if cfg.faq_question_column else answer})
    if not out:
        raise InputError(f"{cfg.faq}: no FAQ rows.")
    return out


class Assistant:
    def __init__(self, cfg: AssistantConfig) -> None:
        import lmtune
        from lmtune.tasks.base import ABSTAIN, INDEX, RERANK
        if not cfg.intents or not cfg.faq:
            raise InputError("assistant: give the intent run (intents) and the FAQ file (faq).")
        self.cfg = cfg
        self.faq = read_faq(cfg)
        self.by_intent = {row["intent"]: row for row in self.faq}
        self.intents = lmtune.load(cfg.intents)
        self.intents.task.require(ABSTAIN, "assistant intents")
        self.intents.config.train.progress = "none"
        unknown = sorted(set(self.by_intent) - set(self.intents.labels))
        if unknown:
            raise InputError(f"{cfg.faq}: intent(s) {', '.join(unknown[:5])} are not labels of the intent run {cfg.intents}.")
        self.missing = sorted(set(self.intents.labels) - set(self.by_intent) - {cfg.oos_label})
        self.retriever = None
        self.faq_emb: np.ndarray | None = None
        if cfg.retriever:
            self.retriever = lmtune.load(cfg.retriever)
            self.retriever.task.require(INDEX, "assistant retriever")
            self.retriever.config.train.progress = "none"
            self.faq_emb = self.retriever.embed([row["question"] for row in self.faq], documents=True)
        self.reranker = None
        if cfg.reranker:
            self.reranker = lmtune.load(cfg.reranker)
            self.reranker.task.require(RERANK, "assistant reranker")
            self.reranker.config.train.progress = "none"
        self.threshold = cfg.retrieval_threshold
        if cfg.dev and self.retriever is not None and self.threshold is None:
            self.threshold = self.choose_threshold(cfg.dev)

    # ---- routing ----------------------------------------------------------------------------------
    def _candidates(self, messages: list[str]) -> tuple[list[dict], np.ndarray | None]:
        """The intent run's predictions and, with a retriever, each message's score for every FAQ entry:
        cosine, or with a reranker its relevance for the retriever's best entries (-inf for the rest),
        computed only for the messages the intent run does not answer."""
        preds = self.intents.predict(messages)
        if self.retriever is None:
            return preds, None
        sims = self.retriever.embed(messages) @ self.faq_emb.T
        if self.reranker is None:
            return preds, sims
        todo = [i for i, p in enumerate(preds) if not self._intent_answers(p)]
        depth = min(self.cfg.rerank_depth, sims.shape[1])
        candidates = [[{"document": self.faq[j]["question"], "entry": int(j)} for j in np.argsort(-sims[i], kind="stable")[:depth]]
                      for i in todo]
        reranked = np.full(sims.shape, -np.inf)
        for i, hits in zip(todo, rerank(self.reranker, [messages[i] for i in todo], candidates, depth, self.cfg.rerank_label)):
            for hit in hits:
                reranked[i, hit["entry"]] = hit["rerank_score"]
        return preds, reranked

    def _intent_answers(self, pred: dict) -> bool:
        label = pred.get("label")
        return not pred.get("abstained") and label != self.cfg.oos_label and label in self.by_intent

    def _route(self, pred: dict, sims: np.ndarray | None, threshold: float | None) -> dict:
        label, abstained = pred.get("label"), bool(pred.get("abstained"))
        scores = {"intent": label, "intent_score": round(float(pred.get("score", 0.0)), 4),
                  "abstained": abstained}
        if self._intent_answers(pred):
            return {"route": "intent", "intent": label, "answer": self.by_intent[label]["answer"], "handoff": False, "scores": scores}
        if sims is not None:
            j = int(np.argmax(sims))
            scores["retrieval_score"] = round(float(sims[j]), 4)
            if threshold is not None and sims[j] >= threshold:
                row = self.faq[j]
                return {"route": "faq", "intent": row["intent"], "answer": row["answer"], "handoff": False, "scores": scores}
        return {"route": "handoff", "intent": None, "answer": self.cfg.fallback, "handoff": True, "scores": scores}

    def route(self, messages: list[str]) -> list[dict]:
        """One routed answer per message: {route, intent, answer, handoff, scores}."""
        preds, sims = self._candidates(messages)
        return [self._route(p, None if sims is None else sims[i], self.threshold) for i, p in enumerate(preds)]

    def correct(self, routed: dict, gold: str) -> bool:
        """Right answer for an in-scope message, hand-off for an out-of-scope one."""
        if gold == self.cfg.oos_label or gold not in self.by_intent:
            return routed["handoff"]
        return not routed["handoff"] and routed["answer"] == self.by_intent[gold]["answer"]

    def _labeled(self, path: str) -> tuple[list[str], list[str]]:
        examples = self.intents.task.read_file(path, self.intents.config, self.intents.labels + [self.cfg.oos_label],
                                               require_label=True)
        return [ex.text for ex in examples], [ex.label for ex in examples]

    def choose_threshold(self, dev: str) -> float | None:
        """The retrieval score threshold that routes the most dev messages right (ties: the highest).
        A message the intent run answers is right or wrong whatever the threshold; any other one is
        answered from the FAQ when its best score reaches the threshold, else handed off. So each
        message is routed twice (FAQ, hand-off) and every candidate is counted from sorted scores:
        O(n log n), not a re-routing of every message per candidate."""
        texts, gold = self._labeled(dev)
        preds, sims = self._candidates(texts)
        if sims is None:
            return None
        fixed, faq_ok, handoff_ok, best_score = 0, [], [], []
        for p, s, g in zip(preds, sims, gold):
            as_faq = self._route(p, s, float("-inf"))
            if as_faq["route"] == "intent":
                fixed += self.correct(as_faq, g)
                continue
            faq_ok.append(self.correct(as_faq, g))
            handoff_ok.append(self.correct(self._route(p, s, None), g))
            best_score.append(float(s.max()))
        order = np.argsort(best_score, kind="stable")
        scores_sorted = np.asarray(best_score, dtype=np.float64)[order]
        handoff_before = np.concatenate([[0], np.cumsum(np.asarray(handoff_ok, dtype=int)[order])])
        faq_before = np.concatenate([[0], np.cumsum(np.asarray(faq_ok, dtype=int)[order])])
        cands = sorted({round(float(s.max()), 4) for s in sims} | {float("inf")})
        below = np.searchsorted(scores_sorted, cands, side="left")  # messages whose best score is under t: handed off
        right = fixed + handoff_before[below] + (faq_before[-1] - faq_before[below])
        k = len(cands) - 1 - int(np.argmax(right[::-1]))  # the highest threshold among the best
        best, best_t = int(right[k]), cands[k]
        log.info("assistant: retrieval threshold %s chosen on %d dev messages (%d routed right)", best_t, len(texts), best)
        return None if best_t == float("inf") else best_t

    def evaluate(self, path: str, batch: int = 256) -> dict:
        """Routing accuracy on a labeled file, overall and by route."""
        texts, gold = self._labeled(path)
        routed = [r for i in range(0, len(texts), batch) for r in self.route(texts[i:i + batch])]
        ok = [self.correct(r, g) for r, g in zip(routed, gold)]
        oos = [g == self.cfg.oos_label for g in gold]
        by_route: dict[str, int] = {}
        for r in routed:
            by_route[r["route"]] = by_route.get(r["route"], 0) + 1
        return {"routing_accuracy": float(np.mean(ok)), "n": len(ok),
                "in_scope_accuracy": float(np.mean([o for o, s in zip(ok, oos) if not s])) if not all(oos) else None,
                "oos_handoff_recall": float(np.mean([o for o, s in zip(ok, oos) if s])) if any(oos) else None,
                "routes": by_route, "threshold": self.threshold}
