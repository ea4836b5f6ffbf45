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
An intent run whose predictions carry slots (its task declares a span_key: task joint, one encoder for the
intent and the slots) makes every reply carry the message's slots, and FAQ answers templates: `{amount}` is
filled from the message's slot of that type; an answer that needs a slot the message lacks becomes a
clarifying question naming it (route clarify) instead of an answer with a hole.
`lmtune assistant serve` puts it behind the same API keys, size limits, request ids, metrics and
PII-masked access log as `lmtune serve`, with sessions and a small chat page
(lmtune/apps/assistant/server.py). Example config: lmtune/apps/assistant/example.yaml.
"""
from __future__ import annotations

import logging
import re
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
CLARIFY = "I can help with that. Could you tell me the {missing}?"
# an FAQ answer's placeholders: {slot type} (any characters but braces: ATIS's types read fromloc.city_name);
# {{ and }} are literal braces
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


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
    dev: str | None = None  # labeled messages (the intent run's columns: text + label, or a joint run's layout) to choose the threshold
    oos_label: str = "oos"
    fallback: str = FALLBACK
    retrieval_threshold: float | None = None  # chosen on dev when dev is given; else retrieval never answers
    clarify: str = CLARIFY  # asked when an answer needs slots the message lacks; {missing}: their types


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
        out.append({"intent": intent, "answer": answer, "line": line,
                    "question": str(row[cfg.faq_question_column]).strip() if cfg.faq_question_column else answer})
    if not out:
        raise InputError(f"{cfg.faq}: no FAQ rows.")
    return out


def placeholders(answer: str) -> list[str]:
    """The slot types an FAQ answer names as {type}, in order, each once."""
    return list(dict.fromkeys(m.group(1).strip() for m in _PLACEHOLDER.finditer(answer) if m.group(1) is not None))


def fill(answer: str, values: dict[str, str]) -> str:
    """The answer with each {type} replaced by its value (every placeholder has one) and {{ }} made single braces."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1).strip()] if m.group(1) is not None else m.group(0)[0], answer)


def slot_values(slots: list[dict]) -> dict[str, str]:
    """Each slot type's text in the message: the most confident span of that type when it has several."""
    best: dict[str, dict] = {}
    for s in slots:
        if s["type"] not in best or s["score"] > best[s["type"]]["score"]:
            best[s["type"]] = s
    return {t: s["text"] for t, s in best.items()}


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
        task = self.intents.task
        # The run decides, not a config key: a run whose task declares spans (joint's slots) gives slot labels, and
        # the FAQ's placeholders are checked against its slot types here, so a config can never claim slots the
        # run does not predict. The intent is read by the task's decision key, its labels by decision_labels
        # (a joint run's labels also hold the slot tags).
        self.intent_key, self.span_key = task.decision_key, task.span_key
        self.intent_labels = task.decision_labels(self.intents.labels)
        self.slot_types = task.span_types(self.intents.labels) if self.span_key else []
        unknown = sorted(set(self.by_intent) - set(self.intent_labels))
        if unknown:
            raise InputError(f"{cfg.faq}: intent(s) {', '.join(unknown[:5])} are not labels of the intent run {cfg.intents}.")
        self.missing = sorted(set(self.intent_labels) - set(self.by_intent) - {cfg.oos_label})
        self._check_placeholders()
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

    def _check_placeholders(self) -> None:
        """Every {type} of an FAQ answer is a slot type of the intent run; with a run without slots, answers are
        plain text (a warning when one looks like a template: nothing would fill it)."""
        for row in self.faq:
            names = placeholders(row["answer"])
            if not self.span_key:
                if names:
                    log.warning("%s: line %d: the answer names {%s}, but the intent run %s predicts no slots: it is "
                                "answered as written", self.cfg.faq, row["line"], names[0], self.cfg.intents)
                continue
            unknown = [n for n in names if n not in self.slot_types]
            if unknown:
                raise InputError(f"{self.cfg.faq}: line {row['line']}: placeholder {{{unknown[0]}}} is not a slot type of "
                                 f"the intent run {self.cfg.intents} (its slot types: {', '.join(self.slot_types)}). Use one "
                                 "of them, or write {{ and }} for literal braces.")

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
        label = pred.get(self.intent_key)
        return not pred.get("abstained") and label != self.cfg.oos_label and label in self.by_intent

    def _slots(self, pred: dict) -> list[dict]:
        """The message's slots as a reply carries them (the run's spans, typed)."""
        return [{"type": s["label"], "text": s["text"], "start": s.get("start"), "end": s.get("end"),
                 "score": round(float(s["score"]), 4)} for s in pred.get(self.span_key) or []]

    def _answer(self, route: str, row: dict, slots: list[dict], scores: dict) -> dict:
        """The FAQ row's answer, its placeholders filled from the slots; a clarifying question naming the slot types
        it needs and the message lacks."""
        out = {"route": route, "intent": row["intent"], "answer": row["answer"], "handoff": False, "scores": scores}
        if not self.span_key:
            return out
        values = slot_values(slots)
        missing = [n for n in placeholders(row["answer"]) if n not in values]
        if missing:
            names = f"{', '.join(missing[:-1])} and {missing[-1]}" if len(missing) > 1 else missing[0]
            return {**out, "route": "clarify", "answer": self.cfg.clarify.replace("{missing}", names), "missing_slots": missing}
        return {**out, "answer": fill(row["answer"], values)}

    def _route(self, pred: dict, sims: np.ndarray | None, threshold: float | None) -> dict:
        label, abstained = pred.get(self.intent_key), bool(pred.get("abstained"))
        scores = {"intent": label, "intent_score": round(float(pred.get("score", 0.0)), 4),
                  "abstained": abstained}
        slots = {"slots": self._slots(pred)} if self.span_key else {}
        if self._intent_answers(pred):
            return {**self._answer("intent", self.by_intent[label], slots.get("slots", []), scores), **slots}
        if sims is not None:
            j = int(np.argmax(sims))
            scores["retrieval_score"] = round(float(sims[j]), 4)
            if threshold is not None and sims[j] >= threshold:
                return {**self._answer("faq", self.faq[j], slots.get("slots", []), scores), **slots}
        return {"route": "handoff", "intent": None, "answer": self.cfg.fallback, "handoff": True, "scores": scores, **slots}

    def route(self, messages: list[str]) -> list[dict]:
        """One routed answer per message: {route, intent, answer, handoff, scores}, and with a run that gives slots
        {slots: [{type, text, start, end, score}]} (and missing_slots when the route is clarify)."""
        preds, sims = self._candidates(messages)
        return [self._route(p, None if sims is None else sims[i], self.threshold) for i, p in enumerate(preds)]

    def correct(self, routed: dict, gold: str) -> bool:
        """Right answer for an in-scope message (a filled answer, or the question for the slots it lacks, of the right
        FAQ entry), hand-off for an out-of-scope one."""
        if gold == self.cfg.oos_label or gold not in self.by_intent:
            return routed["handoff"]
        answered = self.by_intent.get(routed["intent"])
        return not routed["handoff"] and answered is not None and answered["answer"] == self.by_intent[gold]["answer"]

    def _labeled(self, path: str) -> tuple[list[str], list[str]]:
        """Messages and their gold intents: rows of the intent run's own layout (a joint run's tokens / tags / intent,
        or text + intent). Read without requiring every label the run trains on (a message needs its intent only,
        not its slot tags), then each row's intent checked against the run's intents and the out-of-scope label."""
        examples = self.intents.task.read_file(path, self.intents.config, None, require_label=False)
        known = set(self.intent_labels) | {self.cfg.oos_label}
        for ex in examples:
            if ex.label is None:
                raise InputError(f"{ex.source}: no intent. Give every message of {path} its intent (the intent run's "
                                 "label column), or the out-of-scope label.")
            if ex.label not in known:
                raise InputError(f"{ex.source}: intent '{ex.label}' is not a label of the intent run {self.cfg.intents} "
                                 f"(its labels: {', '.join(self.intent_labels)}; out of scope: {self.cfg.oos_label}).")
        # a row of words has no text: the words joined, as predict reads a message
        return [ex.text if ex.text is not None else " ".join(ex.tokens) for ex in examples], [ex.label for ex in examples]

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
            if self._intent_answers(p):  # answered (or asked for its slots: route clarify) by the intent run
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
