"""Attacks that measure robustness: random typos, random synonym substitutions, and a greedy
word-importance search for the smallest change that flips a prediction (classification).

Every change keeps to protected words' rules (robust/text.py: entities, negations, numbers are
never touched) and to a budget; every random choice comes from a per-example seeded generator,
so a report is reproducible.
"""
from __future__ import annotations

import math
import random

import numpy as np

from lmtune.config import AttackConfig
from lmtune.registry import attacks
from lmtune.robust.text import Synonyms, Words, editable, join_words, split_words, typo
from lmtune.tasks.base import EXAMPLE_LABELS

SHOWN = 5  # successful attacks quoted in the report
SEARCH_POSITIONS = 5  # most important words the search tries substitutes at, per round
TYPO_CANDIDATES = 3


def seeded_rng(seed: int, i: int, what: str) -> random.Random:
    return random.Random(f"{seed}:{what}:{i}")  # str seeds hash with sha512: same in every process


def editable_positions(w: Words) -> list[int]:
    return [j for j, (word, p) in enumerate(zip(w.words, w.protected)) if not p and editable(word)]


def changes_for(w: Words, share: float) -> int:
    return max(1, math.floor(share * len([x for x in w.words if x.strip()])))


# Word replacements of the perturbation attacks, registered in lmtune/registrations.py (kind "perturb").
def typo_word(word: str, rng: random.Random, synonyms: Synonyms) -> str:
    return typo(word, rng)


def synonym_word(word: str, rng: random.Random, synonyms: Synonyms) -> str:
    return rng.choice(synonyms(word))


def perturb(ex, method: str, share: float, synonyms: Synonyms, rng: random.Random) -> tuple[object, int]:
    """A random version of one example by a registered perturbation attack, and how many words it changed."""
    replace = attacks.get(method)
    w = split_words(ex)
    positions = editable_positions(w)
    if attacks.meta(method, "needs_synonyms"):
        positions = [j for j in positions if synonyms(w.words[j])]
    rng.shuffle(positions)
    chosen = positions[: changes_for(w, share)]
    for j in chosen:
        w.words[j] = replace(w.words[j], rng, synonyms)
    return join_words(ex, w), len(chosen)


class Scorer:
    """Class probabilities of a Run's model for a list of examples (raw softmax: attacks use the
    argmax and the gold class's probability, both unchanged by temperature scaling)."""

    def __init__(self, run):
        self.run = run
        self.calls = 0

    def __call__(self, examples: list) -> np.ndarray:
        self.calls += len(examples)
        enc = self.run.encode(examples)
        logits = self.run.task.split_outputs(self.run.outputs(enc), enc, self.run.labels)[0]
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


def search_attack(examples: list, gold: np.ndarray, score: Scorer, synonyms: Synonyms, budget: float, seed: int) -> dict:
    """Greedy word-importance attack (TextFooler-style). Words are ranked by how much deleting each
    lowers the gold class's probability; each round tries every substitute (synonyms and typos) at
    the top unchanged positions and keeps the single change that lowers it most, until the
    prediction flips or `budget` of the words have changed. All examples advance together, one
    batched model call per round."""
    probs = score(examples)
    correct = [i for i in range(len(examples)) if probs[i].argmax() == gold[i]]
    words = {i: split_words(examples[i]) for i in correct}
    order: dict[int, list[int]] = {}
    variants, owners = [], []
    for i in correct:
        for j in editable_positions(words[i]):
            w = words[i]
            variants.append(join_words(examples[i], Words(w.words[:j] + w.words[j + 1:], w.protected[:j] + w.protected[j + 1:],
                                                          w.joiner, None if w.tags is None else w.tags[:j] + w.tags[j + 1:])))
            owners.append((i, j))
    drops: dict[int, list[tuple[float, int]]] = {i: [] for i in correct}
    if variants:
        p = score(variants)
        for (i, j), row in zip(owners, p):
            drops[i].append((probs[i][gold[i]] - row[gold[i]], j))
    for i in correct:
        order[i] = [j for _, j in sorted(drops[i], key=lambda t: -t[0])]
    limit = {i: changes_for(words[i], budget) for i in correct}
    changed: dict[int, list[int]] = {i: [] for i in correct}
    current = {i: examples[i] for i in correct}
    flipped: dict[int, int] = {}
    active = [i for i in correct if order[i]]
    while active:
        cands, owners = [], []
        for i in active:
            w = split_words(current[i])
            positions = [j for j in order[i] if j not in changed[i]][:SEARCH_POSITIONS]
            for j in positions:
                rng = seeded_rng(seed, i, f"search{j}")
                subs = dict.fromkeys([*synonyms(w.words[j]), *(typo(w.words[j], rng) for _ in range(TYPO_CANDIDATES))])
                for s in subs:
                    if s != w.words[j]:
                        new = Words(list(w.words), w.protected, w.joiner, w.tags)
                        new.words[j] = s
                        cands.append(join_words(current[i], new))
                        owners.append((i, j))
        if not cands:
            break
        p = score(cands)
        best: dict[int, tuple[float, int, int]] = {}
        for k, ((i, j), row) in enumerate(zip(owners, p)):
            if i not in best or row[gold[i]] < best[i][0]:
                best[i] = (row[gold[i]], k, j)
        still = []
        for i in active:
            if i not in best:
                continue
            _, k, j = best[i]
            current[i] = cands[k]
            changed[i].append(j)
            if p[k].argmax() != gold[i]:
                flipped[i] = int(p[k].argmax())
            elif len(changed[i]) < limit[i] and len(changed[i]) < len(order[i]):
                still.append(i)
        active = still
    n_words = {i: len([x for x in words[i].words if x.strip()]) for i in correct}
    return {"correct": len(correct), "flipped": len(flipped), "adversarial": {i: current[i] for i in flipped},
            "new_label": flipped, "words_changed": {i: len(changed[i]) for i in flipped},
            "fraction_changed": {i: len(changed[i]) / n_words[i] for i in flipped}}


def run_attacks(run, examples: list, cfg: AttackConfig) -> dict:
    """Clean metric, metric under each attack, attack success rate, words changed, examples."""
    task = run.task
    metric = task.headline[0]
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    synonyms = Synonyms(cfg.synonyms, run.model, run.tokenizer)
    clean = run.evaluate_examples(examples)
    out = {"metric": metric, "n": len(examples), "clean": {metric: clean[metric]},
           "settings": {"rate": cfg.rate, "budget": cfg.budget, "synonyms": "wordnet" if synonyms.dictionary else "embedding",
                        "seed": cfg.seed}, "attacks": {}}
    classification = task.supports(EXAMPLE_LABELS)
    clean_decisions = [row[task.decision_key] for row in run.predict_examples(examples)]
    if classification:
        score = Scorer(run)
        gold = np.array([run.labels.index(ex.label) if ex.label in run.labels else -1 for ex in examples])
        clean_pred = score(examples).argmax(axis=1)
    for method in cfg.methods:
        if attacks.meta(method, "kind") == "search":
            if not classification:
                out["attacks"]["search"] = {"skipped": f"the search attack needs one label per example ({task.name} has tags)"}
                continue
            r = search_attack(examples, gold, score, synonyms, cfg.budget, cfg.seed)
            acc = float(clean[metric]) - r["flipped"] / max(len(examples), 1) if metric == "accuracy" else None
            shown = [{"original": _text(examples[i]), "adversarial": _text(r["adversarial"][i]), "gold": examples[i].audit_gold(),
                      "prediction": run.labels[r["new_label"][i]], "words_changed": r["words_changed"][i]}
                     for i in list(r["adversarial"])[:SHOWN]]
            out["attacks"]["search"] = {
                metric: acc, "success_rate": r["flipped"] / max(r["correct"], 1), "attacked": r["correct"],
                "flipped": r["flipped"], "budget": cfg.budget,
                "avg_words_changed": float(np.mean(list(r["words_changed"].values()))) if r["flipped"] else 0.0,
                "avg_fraction_changed": float(np.mean(list(r["fraction_changed"].values()))) if r["flipped"] else 0.0,
                "examples": shown}
            continue
        pairs = [perturb(ex, method, cfg.rate, synonyms, seeded_rng(cfg.seed, i, method)) for i, ex in enumerate(examples)]
        attacked = [p[0] for p in pairs]
        m = run.evaluate_examples(attacked)
        decisions = [r[task.decision_key] for r in run.predict_examples(attacked)]
        changed = [i for i, (a, b) in enumerate(zip(clean_decisions, decisions)) if a != b]
        row = {metric: m[metric], "avg_words_changed": float(np.mean([p[1] for p in pairs])) if pairs else 0.0,
               "unchanged_examples": sum(p[1] == 0 for p in pairs),
               "changed_rate": len(changed) / max(len(examples), 1)}  # the prediction (label, label set, tags) changed
        if classification:
            pred = score(attacked).argmax(axis=1)
            was_right = clean_pred == gold
            row["success_rate"] = float(((pred != gold) & was_right).sum() / max(was_right.sum(), 1))
            row["examples"] = [{"original": _text(examples[i]), "adversarial": _text(attacked[i]), "gold": examples[i].audit_gold(),
                                "prediction": run.labels[pred[i]]} for i in np.flatnonzero((pred != gold) & was_right)[:SHOWN]]
        else:  # no single gold label: show examples whose prediction changed
            row["examples"] = [{"original": _text(examples[i]), "adversarial": _text(attacked[i]), "gold": examples[i].audit_gold(),
                                "before": clean_decisions[i], "after": decisions[i]} for i in changed[:SHOWN]]
        out["attacks"][method] = row
    return out


def _text(ex) -> str:
    return ex.text if ex.text else ex.audit_text()
