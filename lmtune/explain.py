"""Word-level explanations of predictions, and how far to trust them.

Attributions: Integrated Gradients (captum's LayerIntegratedGradients) on the word-embedding layer,
from a baseline where every non-special token is the pad token, of the log-odds of the calibrated
score the task names (`Task.target_score`: a class probability, a label's sigmoid, a regression
value); log-odds because a probability near 1 has no gradient along most of the path. Sub-word
attributions are summed into words (spaces and punctuation split English; jieba splits Chinese; a
sentence pair's words come from both texts). Backends without gradients (ONNX) get occlusion: each
word's attribution is how much the score drops when the word is removed, one batched model call per
text through the run's own predict path, so it works for every backend.

Faithfulness (ERASER, DeYoung et al. 2020): comprehensiveness = score(x) - score(x without the top-k%
words), sufficiency = score(x) - score(only the top-k% words), for IG's top words, random words and
the last layer's [CLS] attention, so users see how much the colours are worth.

`lmtune explain RUN_DIR --text/--input` prints attributions; without them it explains the run's test
split (or --data FILE): coloured examples, the words that drive each class, faithfulness, written to
RUN_DIR/explain.json and the Explanations section of report.md.
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmtune.errors import InputError
from lmtune.registry import backends
from lmtune.tasks.base import EXPLAIN

METHODS = ("auto", "ig", "occlusion")


# ---- words ----------------------------------------------------------------------------------------
@dataclass
class Segmented:
    """An example's texts and their words: (segment, start, end) per word; segment 1 is the pair's text."""
    texts: tuple[str, ...]
    spans: list[tuple[int, int, int]]

    @classmethod
    def of(cls, example: Any) -> Segmented:
        return cls(*example.explain_view())

    @property
    def words(self) -> list[str]:
        return [self.texts[s][a:b] for s, a, b in self.spans]

    def keep(self, kept: set[int]) -> tuple[str, ...]:
        """The texts with only the words in `kept` (by index), joined as they stood (space or none)."""
        out = []
        for seg, text in enumerate(self.texts):
            parts, last = [], None
            for i, (s, a, b) in enumerate(self.spans):
                if s == seg and i in kept:
                    parts.append(("" if last is None or last == a else " ") + text[a:b])
                    last = b
            out.append("".join(parts).strip())
        return tuple(out)


# ---- the explainer -------------------------------------------------------------------------------
class Explainer:
    """Attributions for one loaded run (lmtune.api.Run)."""

    def __init__(self, run: Any, method: str = "auto", steps: int = 32) -> None:
        run.task.require(EXPLAIN, "explain")
        if method not in METHODS:
            raise InputError(f"explain method must be one of {', '.join(METHODS)}, got {method!r}.")
        has_gradients = backends.meta(run.backend, "gradients", False)
        if method == "ig" and not has_gradients:
            raise InputError(f"explain method ig needs gradients; the {run.backend} backend has none: use occlusion "
                             "or the torch backend.")
        self.run, self.steps = run, steps
        self.method = method if method != "auto" else ("ig" if has_gradients else "occlusion")
        if run.task.explain_tokens and self.method != "ig":
            raise InputError(f"explain: the {run.task.name} task's explanations (per entity) need Integrated Gradients on "
                             "the torch backend; occlusion explains whole-text predictions only.")

    # -- scores through the run's own predict path (any backend) --
    def scores(self, texts: list[tuple[str, ...]], targets: list[dict], log_odds: bool = False) -> np.ndarray:
        """The target score of each text (tuple of text, pair) under the same-index target."""
        if not texts:
            return np.zeros(0)
        run = self.run
        examples = run.task.from_texts([t if len(t) == 2 else t[0] for t in texts])
        enc = run.encode(examples)
        outputs = run.outputs(enc)
        first: dict[int, int] = {}  # a windowed text is scored on its first window
        for k, f in enumerate(enc.features):
            first.setdefault(f.get("example", k), k)
        rows = [outputs[first[i]] for i in range(len(examples))]
        out = np.empty(len(texts))
        for i, (row, target) in enumerate(zip(rows, targets)):
            out[i] = float(run.task.target_score(torch.as_tensor(np.asarray(row))[None], target, log_odds)[0])
        return out

    # -- attributions --
    def attributions(self, example: Any, seg: Segmented, target: dict) -> np.ndarray:
        return self._ig(seg, target) if self.method == "ig" else self._occlusion(seg, target)

    def _occlusion(self, seg: Segmented, target: dict) -> np.ndarray:
        n = len(seg.spans)
        everything = set(range(n))
        texts = [seg.texts] + [seg.keep(everything - {i}) for i in range(n)]
        s = self.scores(texts, [target] * len(texts), log_odds=True)
        return s[0] - s[1:]

    def _inputs(self, seg: Segmented) -> tuple[dict, list[int | None]]:
        """Model inputs of the texts (the run's max_length) and the word index of each token."""
        tok = self.run.tokenizer
        enc = tok(*seg.texts, truncation=True, max_length=self.run.config.data.max_length, return_offsets_mapping=True,
                  return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0].tolist()
        seq = enc.sequence_ids(0)
        starts = defaultdict(list)
        for i, (s, a, b) in enumerate(seg.spans):
            starts[s].append((a, b, i))
        token_word: list[int | None] = []
        for (a, b), s in zip(offsets, seq):
            token_word.append(None if s is None or a == b else
                              next((i for wa, wb, i in starts[s] if wa <= a < wb or (a <= wa < b)), None))
        return dict(enc), token_word

    def _ig(self, seg: Segmented, target: dict) -> np.ndarray:
        from captum.attr import LayerIntegratedGradients
        run = self.run
        model = run.model
        device = next(model.parameters()).device
        inputs, token_word = self._inputs(seg)
        if "word" in target:  # a token-level target (an entity): the first token of its first word
            if target["word"] not in token_word:
                return np.zeros(len(seg.spans))  # cut off by max_length
            target = {**target, "position": token_word.index(target["word"])}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = inputs.pop("input_ids")
        special = torch.tensor([w is None for w in token_word], device=device)
        baseline = torch.where(special[None], ids, torch.full_like(ids, run.tokenizer.pad_token_id or 0))
        names = list(inputs)

        def forward(input_ids, *rest):
            return run.task.target_score(model(input_ids=input_ids, **dict(zip(names, rest))).logits, target, log_odds=True)

        lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
        was_training = model.training
        model.eval()
        try:
            attr = lig.attribute(ids, baselines=baseline, additional_forward_args=tuple(inputs[k] for k in names),
                                 n_steps=self.steps, internal_batch_size=self.steps)
        finally:
            model.train(was_training)
        per_token = attr.sum(-1)[0].detach().float().cpu().numpy()
        words = np.zeros(len(seg.spans))
        for a, w in zip(per_token, token_word):
            if w is not None:
                words[w] += a
        return words

    def attention(self, seg: Segmented) -> np.ndarray:
        """The last layer's attention from the first token, averaged over heads, summed per word (the
        usual heat-map; measured beside IG, never shown as an explanation)."""
        model = self.run.model
        if not isinstance(model, torch.nn.Module):
            raise InputError("attention weights need the torch backend.")
        inputs, token_word = self._inputs(seg)
        device = next(model.parameters()).device
        old = model.config._attn_implementation
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
        try:
            with torch.inference_mode():
                att = model(**{k: v.to(device) for k, v in inputs.items()}, output_attentions=True).attentions[-1]
        finally:
            model.set_attn_implementation(old)
        per_token = att[0, :, 0, :].mean(0).float().cpu().numpy()
        words = np.zeros(len(seg.spans))
        for a, w in zip(per_token, token_word):
            if w is not None:
                words[w] += a
        return words

    # -- predictions with explanations --
    def explain(self, examples: list, label: str | None = None) -> list[dict]:
        """The run's prediction rows, each with "explanations": [{"label", "method", "attributions":
        [[word, score], ...]}] for the predicted label(s) (or `label`)."""
        rows = self.run.predict_examples(examples)
        for ex, row in zip(examples, rows):
            seg = Segmented.of(ex)
            row["explanations"] = []
            for target in self.run.task.explain_targets(row, self.run.labels, label):
                a = self.attributions(ex, seg, target) if seg.spans else np.zeros(0)
                row["explanations"].append({"label": target["name"], **({"entity": target["entity"]} if "entity" in target else {}),
                                            "method": self.method,
                                            "attributions": [[w, float(f"{x:.4g}")] for w, x in zip(seg.words, a)]})
        return rows


def top_words(scores: np.ndarray, share: float) -> set[int]:
    """The ceil(share * words) highest-scoring words (at least one)."""
    k = max(1, math.ceil(share * len(scores)))
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


# ---- faithfulness ------------------------------------------------------------------------------
def faithfulness(explainer: Explainer, examples: list, rows: list[dict], share: float = 0.2, seed: int = 0,
                 attention: bool = True) -> dict:
    """ERASER comprehensiveness and sufficiency at `share` of the words, for the explanation in each
    row (its first target) against random words and (torch) attention, averaged over examples."""
    rng = random.Random(seed)
    sources = ("ig" if explainer.method == "ig" else "occlusion", "random") + (("attention",) if attention else ())
    texts, targets, slots = [], [], []
    for ex, row in zip(examples, rows):
        seg = Segmented.of(ex)
        if not seg.spans or not row["explanations"]:
            continue
        target = explainer.run.task.explain_targets(row, explainer.run.labels, row["explanations"][0]["label"])[0]
        ranked = {sources[0]: np.array([x for _, x in row["explanations"][0]["attributions"]]),
                  "random": np.array([rng.random() for _ in seg.spans])}
        if attention:
            ranked["attention"] = explainer.attention(seg)
        everything = set(range(len(seg.spans)))
        base = len(texts)
        texts.append(seg.texts)
        for scores in ranked.values():
            top = top_words(scores, share)
            texts += [seg.keep(everything - top), seg.keep(top)]
        targets += [target] * (len(texts) - base)
        slots.append(base)
    s = explainer.scores(texts, targets)
    out: dict = {"share": share, "n": len(slots)}
    for j, name in enumerate(sources):
        comp = [s[b] - s[b + 1 + 2 * j] for b in slots]
        suff = [s[b] - s[b + 2 + 2 * j] for b in slots]
        out[name] = {"comprehensiveness": round(float(np.mean(comp)), 4) if comp else None,
                     "sufficiency": round(float(np.mean(suff)), 4) if suff else None}
    return out


# ---- the report over a split -----------------------------------------------------------------
def class_words(rows: list[dict], min_count: int = 2, top: int = 8) -> dict[str, list[list]]:
    """Per explained label: the words with the highest mean attribution (seen at least min_count times)."""
    seen: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for e in row["explanations"]:
            for w, a in e["attributions"]:
                if any(ch.isalnum() for ch in w):
                    seen[e["label"]][w.lower()].append(a)
    out = {}
    for label, words in sorted(seen.items()):
        means = [(w, float(np.mean(v)), len(v)) for w, v in words.items() if len(v) >= min_count]
        out[label] = [[w, round(m, 4), n] for w, m, n in sorted(means, key=lambda x: -x[1])[:top]]
    return out


def _pick(rows: list[dict], n: int = 3) -> dict[str, list[int]]:
    """Indices of the most and least confident predictions and of misclassified ones."""
    scored = [(i, r.get("score", 0.0)) for i, r in enumerate(rows) if "score" in r]
    by_conf = [i for i, _ in sorted(scored, key=lambda x: -x[1])]
    wrong = [i for i in by_conf if rows[i].get("gold") is not None and rows[i].get("label") != rows[i]["gold"]]
    return {"most confident": by_conf[:n], "least confident": by_conf[::-1][:n], "misclassified": wrong[:n]}


def analyse(run: Any, examples: list, source: str, max_examples: int = 300, method: str = "auto", steps: int = 32,
            share: float = 0.2, seed: int = 0, progress: str = "none") -> dict:
    """Explain (a seeded sample of) labeled examples: per-class words, picked examples, faithfulness."""
    if len(examples) > max_examples:
        examples = random.Random(seed).sample(examples, max_examples)
    explainer = Explainer(run, method, steps)
    t0 = time.perf_counter()
    rows = []
    from lmtune.training.progress import Progress
    bar = Progress(len(examples), progress, "explain")
    for k in range(0, len(examples), 16):
        rows += explainer.explain(examples[k:k + 16])
        bar.update(min(k + 16, len(examples)))
    bar.close()
    seconds = (time.perf_counter() - t0) / max(len(examples), 1)
    torch_model = isinstance(run.model, torch.nn.Module)
    # removing words moves the tokens a token-level target sits on: faithfulness is measured for text-level ones
    faith = None if run.task.explain_tokens else faithfulness(explainer, examples, rows, share, seed, attention=torch_model)
    picked = {name: [_example(rows[i]) for i in idx if rows[i]["explanations"]] for name, idx in _pick(rows).items()}
    if run.task.explain_tokens:
        picked = {"entities": [_example(r) for r in rows if r["explanations"]][:6]}
    return {"data": source, "method": explainer.method, "steps": steps if explainer.method == "ig" else None,
            "n": len(rows), "seconds_per_example": round(seconds, 4), "faithfulness": faith,
            "class_words": class_words(rows), "examples": picked}


def _example(row: dict) -> dict:
    keep = ("text", "text_pair", "label", "score", "gold", "value")
    e = row["explanations"][0]
    label = f"{e['entity']} ({e['label']})" if "entity" in e else row.get("label", e["label"])
    keep = keep if "entity" not in e else ("text",)  # an NER row's gold is a tag list, not a label
    return {**{k: row[k] for k in keep if k in row}, "label": label, "attributions": e["attributions"]}
