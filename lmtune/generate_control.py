"""Generated output under control: generation in batches, the checks that tell whether outputs can be
trusted (repetition loops, length, invented entities and numbers, format), and the seeded search on
dev that picks the decoding settings predict and serve use.

Each check is a plain function of texts, so the report, the search and the tests share one
definition of "a loop" or "an invented number".
"""
from __future__ import annotations

import json
import random
import re
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from lmtune.robust.text import is_cjk
from lmtune.structured import Constraint
from lmtune.training.progress import Progress

LOOP_REPEATS = 3  # an n-gram said this many times back to back (or a 4-gram this many times anywhere) is a loop
CHECKS = {"repeat_share": 0.05, "length_ratio": (0.5, 2.0), "truncated_share": 0.2,
          "invented_margin": 0.1}  # what a setting must pass (see passes)
_NUMBER = re.compile(r"\d[\d,.:/]*\d|\d")
_NAME = re.compile(r"\b[A-Z][a-zA-Z]+\b")
RUN_CONSTRAINT = "run"  # generate_outputs' default: the constraint the run was configured with
# capitalised only because they start a sentence: never counted as names
_FUNCTION_WORDS = set("a an the he she they it we i you this that these those there then but and so someone everyone "
                      "nobody his her their its our my your".split())


# ---- generation ----------------------------------------------------------------------------------
def generate_outputs(task, model, tokenizer: Any, examples: list, device: torch.device, settings: dict,
                     max_new_tokens: int, progress: str = "auto", streamer: Any = None,
                     constraint: Constraint | str | None = RUN_CONSTRAINT) -> list[dict]:
    """Outputs in the examples' order: prompts sorted by length and left-padded in batches (a decoder
    continues from the last position of each row), each batch seeded, so sampling is repeatable.
    `constraint`: the run's own (generate.schema / choices / regex / label_set) by default, None for
    free decoding, or a structured.Constraint (a request's)."""
    grammar = task.constraint if isinstance(constraint, str) else constraint  # RUN_CONSTRAINT: the run's own
    prompts = [task.prompt_ids(ex, tokenizer) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = 1 if streamer is not None else (64 if device.type == "cuda" else 16)
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = int(settings.get("max_new_tokens") or max_new_tokens)
    config = generation_config(settings, min(limit, max_new_tokens), pad, eos)
    out: list[dict] = [{}] * len(prompts)
    bar = Progress(len(batches), progress if len(batches) >= 5 else "none", "generate")
    was_training = model.training
    model.eval()
    for n, idx in enumerate(batches, 1):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        torch.manual_seed(int(settings.get("seed", 0)) + n)
        extra = {}
        # the grammar first: the penalties then never lift its -inf, and a block that would leave a row
        # nothing the grammar allows is skipped (ResponsePenalties)
        processors = [p for p in (grammar.processor(tokenizer) if grammar is not None else None,
                                  ResponsePenalties.from_settings(settings, width)) if p is not None]
        if processors:
            extra["logits_processor"] = LogitsProcessorList(processors)
        if task.stop:
            extra.update(stop_strings=task.stop, tokenizer=tokenizer)
        stop_when = getattr(streamer, "stopping_criteria", None)  # a server's stream: stops when its client has gone
        if stop_when is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([stop_when])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 streamer=streamer, **extra)
        for r, i in enumerate(idx):
            out[i] = _decoded(gen[r, width:].tolist(), tokenizer, eos, pad, task.stop)
        bar.update(n)
    bar.close()
    model.train(was_training)
    return out


def generation_config(settings: dict, max_new_tokens: int, pad: int | None, eos: int | None) -> GenerationConfig:
    """A complete GenerationConfig from lmtune's settings, so nothing comes from the checkpoint's own
    generation defaults (an instruct model's sampling temperature, say) unless it was chosen here.
    repetition_penalty and no_repeat_ngram_size are not transformers' (ResponsePenalties applies them)."""
    sample = float(settings.get("temperature") or 0.0) > 0
    kw: dict = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": pad, "eos_token_id": eos,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if sample:
        kw.update(temperature=float(settings["temperature"]), top_p=float(settings.get("top_p") or 1.0), top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**kw)


class ResponsePenalties(LogitsProcessor):
    """repetition_penalty and no_repeat_ngram_size that leave the prompt out. transformers' own
    processors read the whole input_ids, and a decoder's input_ids start with the prompt: its
    repetition penalty then punishes copying from the input (the names and phrases a summary must
    reuse) and its n-gram block forbids every n-gram of the prompt. Here the penalty falls on tokens
    the answer has already generated, and the block on n-grams it has already generated unless the
    prompt holds them too, so DialogSum's `#Person1#` can be written again and again while a phrase of
    the model's own cannot loop. Left padding gives every row of a batch the same prompt width, `start`.
    Under a grammar (structured output) the block is skipped for a row where it would leave no allowed
    token: JSON repeats its punctuation, and a row with nothing allowed would emit garbage."""

    def __init__(self, start: int, penalty: float = 1.0, ngram: int = 0) -> None:
        self.start, self.penalty, self.ngram = start, penalty, ngram
        self._prompt_ngrams: list[set[tuple[int, ...]]] | None = None  # per row, built at the first step

    @classmethod
    def from_settings(cls, settings: dict, start: int) -> ResponsePenalties | None:
        penalty, ngram = float(settings.get("repetition_penalty") or 1.0), int(settings.get("no_repeat_ngram_size") or 0)
        return cls(start, penalty, ngram) if penalty != 1.0 or ngram > 0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.start:]
        if not gen.shape[1]:
            return scores
        scores = scores.clone()
        if self.penalty != 1.0:  # CTRL's rule, as transformers applies it: shrink a seen token's logit toward "less likely"
            seen = scores.gather(1, gen)
            scores.scatter_(1, gen, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        if self.ngram > 0 and gen.shape[1] >= self.ngram - 1:
            n = self.ngram
            if self._prompt_ngrams is None:
                prompts = input_ids[:, :self.start].tolist()
                self._prompt_ngrams = [{tuple(p[i:i + n]) for i in range(len(p) - n + 1)} for p in prompts]
            for r, row in enumerate(gen.tolist()):
                prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
                banned = [row[i + n - 1] for i in range(len(row) - n + 1)
                          if tuple(row[i:i + n - 1]) == prefix and (*prefix, row[i + n - 1]) not in self._prompt_ngrams[r]]
                if banned:
                    allowed = torch.isfinite(scores[r])
                    allowed[banned] = False
                    if allowed.any():
                        scores[r, banned] = float("-inf")
        return scores


def _decoded(tokens: list[int], tokenizer: Any, eos: int | None, pad: int | None, stop: list[str]) -> dict:
    finished = False
    for k, t in enumerate(tokens):
        if t == eos or (t == pad and pad != eos):
            tokens, finished = tokens[:k], True
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop:
        if s in text:
            text, finished = text[:text.index(s)], True
    return {"text": text.strip(), "tokens": len(tokens), "finished": finished}


# ---- checks --------------------------------------------------------------------------------------
def units(text: str) -> list[str]:
    """What lengths and n-grams count: characters for Chinese, lower-cased words otherwise."""
    if is_cjk(text):
        return [ch for ch in text if not ch.isspace()]
    return re.findall(r"\w+|[^\w\s]", text.lower())


def has_loop(text: str) -> bool:
    """A repetition loop: some n-gram (n <= 8) said LOOP_REPEATS times back to back (a word 4 times), or
    a 4-gram LOOP_REPEATS times anywhere. Ordinary summaries and answers do neither."""
    u = units(text)
    for n in range(1, 9):
        need = LOOP_REPEATS + (1 if n == 1 else 0)
        for i in range(len(u) - n * need + 1):
            if all(u[i + k * n:i + (k + 1) * n] == u[i:i + n] for k in range(1, need)):
                return True
    grams = [tuple(u[i:i + 4]) for i in range(len(u) - 3)]
    return bool(grams) and max(grams.count(g) for g in set(grams)) >= LOOP_REPEATS


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(u[i:i + n]) for t in texts for u in [units(t)] for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def invented(output: str, sources: list[str]) -> list[str]:
    """Numbers, and capitalised words (names, places, organisations; not pronouns or articles), of the
    output that appear in none of the sources (the input and the references), case-insensitively."""
    joined = " ".join(sources).lower()
    seen = set(re.findall(r"\w+", joined))
    found = [m.group() for m in _NUMBER.finditer(output)]
    if not is_cjk(output):
        found += [m.group() for m in _NAME.finditer(output) if m.group().lower() not in _FUNCTION_WORDS]
    return sorted({w for w in found if w.lower() not in seen and w.lower() not in joined})


def rouge(references: list[list[str]], outputs: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure, each output against its best reference (rouge-score's score_multi);
    Chinese is scored by characters (rouge-score's default tokenizer drops CJK)."""
    from rouge_score import rouge_scorer
    zh = any(is_cjk(r) for refs in references for r in refs[:1])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=not zh,
                                      tokenizer=_CharTokenizer() if zh else None)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for refs, out in zip(references, outputs):
        s = scorer.score_multi(refs, out)
        for k in sums:
            sums[k] += s[k].fmeasure
    n = max(len(outputs), 1)
    return {k: v / n for k, v in sums.items()} | {"scoring": "rouge-score, characters" if zh else "rouge-score, stemmed words"}


class _CharTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text.lower() if ch.isalnum()]


def score(examples: list, generated: list[dict], label_set: list[str] | None = None, json_schema: str | None = None,
          constraint: Constraint | None = None) -> dict:
    """ROUGE against every reference, and the control checks, of generated outputs; under a constraint
    `valid`, the share of outputs that meet it (and for a schema the share that parses as JSON)."""
    texts = [g["text"] for g in generated]
    m: dict = {"n": len(texts)}
    labeled = [(ex, t) for ex, t in zip(examples, texts) if ex.references]
    if labeled:
        m.update(rouge([ex.references for ex, _ in labeled], [t for _, t in labeled]))
        ratios = [len(units(t)) / max(np.mean([len(units(r)) for r in ex.references]), 1) for ex, t in labeled]
        m["length_ratio"] = float(np.mean(ratios))
        m["exact_match"] = float(np.mean([t.strip() in [r.strip() for r in ex.references] for ex, t in labeled]))
    loops = [k for k, t in enumerate(texts) if has_loop(t)]
    m["repeat_share"] = len(loops) / max(len(texts), 1)
    m["distinct_1"], m["distinct_2"] = distinct(texts, 1), distinct(texts, 2)
    m["truncated_share"] = float(np.mean([not g["finished"] for g in generated])) if generated else 0.0
    m["mean_tokens"] = float(np.mean([g["tokens"] for g in generated])) if generated else 0.0
    made_up = [(k, invented(t, [ex.context, *ex.references])) for k, (ex, t) in enumerate(zip(examples, texts))]
    made_up = [(k, w) for k, w in made_up if w]
    m["invented_share"] = len(made_up) / max(len(texts), 1)
    m["examples"] = {"loops": [texts[k][:300] for k in loops[:3]],
                     "invented": [{"output": texts[k][:300], "not_in_input_or_reference": w} for k, w in made_up[:5]]}
    if label_set:
        m["in_label_set"] = float(np.mean([t.strip() in label_set for t in texts])) if texts else 0.0
    if json_schema:
        m.update(json_adherence(texts, json_schema))
    if constraint is not None:
        m["valid"] = constraint.valid_share(texts)
        if constraint.kind == "schema":
            m["json_parses"] = float(np.mean([_parses(t) for t in texts])) if texts else 0.0
    return m


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def structured_comparison(examples: list, constrained: list[dict], free: list[dict], constraint: Constraint) -> dict:
    """The same examples decoded with and without the constraint: the share of outputs that meet it, and
    ROUGE-L and exact match (when the examples have references), each both ways."""
    out: dict = {"constraint": constraint.kind, "n": len(constrained)}
    for side, generated in (("constrained", constrained), ("unconstrained", free)):
        texts = [g["text"] for g in generated]
        out[f"valid_{side}"] = constraint.valid_share(texts)
        labeled = [(ex.references, t) for ex, t in zip(examples, texts) if ex.references]
        if labeled:
            out[f"rougeL_{side}"] = rouge([r for r, _ in labeled], [t for _, t in labeled])["rougeL"]
            out[f"exact_match_{side}"] = float(np.mean([t.strip() in [r.strip() for r in refs] for refs, t in labeled]))
        out[f"truncated_{side}"] = float(np.mean([not g["finished"] for g in generated])) if generated else 0.0
    return out


def load_schema(path: str):
    """The jsonschema-rs validator of generate.json_schema; an unreadable file, bad JSON or an invalid
    schema is an InputError naming the file (checked before training, used again for scoring)."""
    import jsonschema_rs

    from lmtune.structured import read_schema
    return jsonschema_rs.validator_for(read_schema(path, "generate.json_schema", enforced=False))


def json_adherence(texts: list[str], schema_path: str) -> dict:
    """Share of outputs that parse as JSON, and that validate against the schema (jsonschema-rs)."""
    validator = load_schema(schema_path)
    parsed = []
    for t in texts:
        try:
            parsed.append(json.loads(t))
        except ValueError:
            parsed.append(_INVALID)
    ok = [p is not _INVALID for p in parsed]
    valid = [o and validator.is_valid(p) for o, p in zip(ok, parsed)]
    n = max(len(texts), 1)
    return {"json_parses": sum(ok) / n, "json_valid": sum(valid) / n}


_INVALID = object()


# ---- the decoding search -------------------------------------------------------------------------
def candidates(seed: int, trials: int, cap: int, reference_tokens: list[int]) -> list[dict]:
    """Greedy, then `trials` distinct settings drawn with a seeded generator: repetition penalty,
    no-repeat n-gram size, sampling temperature / top-p (greedy two times in three), and a length cap:
    the configured one, or one fitted to the dev references (1.5x their median, or their 90th
    percentile), which ends a model's run-on outputs where the references end."""
    rng = random.Random(seed)
    caps = [cap]
    if reference_tokens:
        caps += [int(min(cap, max(8, q))) for q in (1.5 * np.median(reference_tokens), np.percentile(reference_tokens, 90))]
    caps = list(dict.fromkeys(caps))
    out, seen = [{}], {"{}"}
    for _ in range(trials * 20):
        if len(out) > trials:
            break
        s = {"repetition_penalty": rng.choice([1.0, 1.05, 1.1, 1.2, 1.3]), "no_repeat_ngram_size": rng.choice([0, 3, 4]),
             "max_new_tokens": rng.choice(caps)}
        if rng.random() < 1 / 3:
            s.update(temperature=rng.choice([0.3, 0.5, 0.7]), top_p=rng.choice([0.9, 0.95]), seed=seed)
        s = {k: v for k, v in s.items() if not (k == "repetition_penalty" and v == 1.0 or k == "no_repeat_ngram_size" and v == 0
                                                 or k == "max_new_tokens" and v == cap)}
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def failed_checks(m: dict, trials: list[dict]) -> list[str]:
    """The repetition, length and invention checks m fails, each against a fixed bound or, when no
    setting reaches it, against the best setting tried: loops at most 5% (or within 5 points of the
    fewest), length ratio within 0.5-2 (or within 0.25 of the closest to 1), outputs cut by the length
    cap at most 20% (or within 10 points of the fewest), outputs with invented names or numbers within
    10 points of the fewest; under a constraint (structured output), as many outputs valid as the best
    setting (a cap that cuts a JSON object short leaves it invalid). A setting that loops or invents
    more than another could avoid loses to it."""
    lo, hi = CHECKS["length_ratio"]
    fewest_loops = min(t["repeat_share"] for t in trials)
    closest = min(abs((t.get("length_ratio") or 1.0) - 1) for t in trials)
    fewest_cut = min(t["truncated_share"] for t in trials)
    fewest_invented = min(t.get("invented_share") or 0.0 for t in trials)
    ratio = m.get("length_ratio") or 1.0
    checks = {"repeat_share": m["repeat_share"] <= max(CHECKS["repeat_share"], fewest_loops + 0.05),
              "length_ratio": lo <= ratio <= hi or abs(ratio - 1) <= closest + 0.25,
              "truncated_share": m["truncated_share"] <= max(CHECKS["truncated_share"], fewest_cut + 0.1),
              "invented_share": (m.get("invented_share") or 0.0) <= fewest_invented + CHECKS["invented_margin"]}
    if m.get("valid") is not None:  # under a constraint: a setting whose length cap cuts outputs short of valid loses
        checks["valid"] = m["valid"] >= max(t.get("valid") or 0.0 for t in trials)
    return [name for name, ok in checks.items() if not ok]


def passes(m: dict, trials: list[dict]) -> bool:
    return not failed_checks(m, trials)


def choose_setting(rows: list[dict]) -> dict:
    """Marks each trial's failed checks; the best ROUGE-L among the trials that fail the fewest. Under a
    constraint, only the settings that keep the most outputs valid compete: valid output is what structured
    output promises (a length cap that cuts JSON short breaks it), so no other check outweighs it."""
    for r in rows:
        r["failed"] = failed_checks(r, rows)
        r["passed"] = not r["failed"]
    # max keeps the first of ties: greedy
    return max(rows, key=lambda r: (r.get("valid") or 0.0, -len(r["failed"]), r["rougeL"] or 0.0))


def search_decoding(task, model, tokenizer: Any, examples: list, device: torch.device, seed: int, trials: int,
                    progress: str = "auto") -> dict:
    """Try greedy and `trials` seeded settings on dev examples; keep the best ROUGE-L among those that
    fail the fewest checks (failed_checks): all pass when one does. Each check's bound comes from the
    best setting at that check alone, so no setting may meet them all; then one that misses one check
    still beats greedy missing three."""
    ref_tokens = [len(tokenizer(ex.references[0], add_special_tokens=False)["input_ids"]) for ex in examples if ex.references]
    rows = []
    for s in candidates(seed, trials, task.max_new_tokens, ref_tokens):
        generated = generate_outputs(task, model, tokenizer, examples, device, s, task.max_new_tokens, progress)
        m = score(examples, generated, task.label_set, task.json_schema, task.constraint)
        rows.append({"settings": s, **{k: m.get(k) for k in ("rougeL", "repeat_share", "length_ratio", "truncated_share",
                                                              "invented_share")}, **({"valid": m["valid"]} if "valid" in m else {})})
    best = choose_setting(rows)
    return {"chosen": best["settings"], "trials": rows, "examples": len(examples), "seed": seed,
            "objective": "rougeL", "checks": {k: list(v) if isinstance(v, tuple) else v for k, v in CHECKS.items()}}


# ---- report --------------------------------------------------------------------------------------
def report_section(split_metrics: dict[str, dict], search: dict, decoding: dict) -> str:
    lines = ["### Generation", "", "| split | ROUGE-1 | ROUGE-2 | ROUGE-L | loops | distinct-2 | length ratio | hit max tokens | "
             "invented names/numbers | examples |", "|---|---|---|---|---|---|---|---|---|---|"]
    for split, m in split_metrics.items():
        if "rougeL" not in m:
            continue
        lines.append(f"| {split} | {m['rouge1']:.4f} | {m['rouge2']:.4f} | {m['rougeL']:.4f} | {m['repeat_share']:.1%} | "
                     f"{m['distinct_2']:.3f} | {m.get('length_ratio', 0):.2f} | {m['truncated_share']:.1%} | "
                     f"{m['invented_share']:.1%} | {m['n']} |")
    lines += ["", "Loops: an n-gram repeated back to back (or a 4-gram three times). Invented: numbers and capitalised names "
              "of an output found in neither its input nor its references. Scored with " +
              next((m.get("scoring", "") for m in split_metrics.values() if "scoring" in m), "rouge-score") + "."]
    if search:
        lines += ["", f"Decoding settings searched on {search['examples']} dev examples (seed {search['seed']}; the best "
                  "ROUGE-L among settings that fail the fewest of the loop, length, cap and invention checks):", "",
                  "| settings | ROUGE-L | loops | length ratio | hit max tokens | invented | checks failed |",
                  "|---|---|---|---|---|---|---|"]
        for r in search["trials"]:
            name = ", ".join(f"{k} {v}" for k, v in r["settings"].items() if k != "seed") or "greedy"
            lines.append(f"| {name} | {r['rougeL'] or 0:.4f} | {r['repeat_share']:.1%} | {r['length_ratio'] or 0:.2f} | "
                         f"{r['truncated_share']:.1%} | {r.get('invented_share') or 0:.1%} | "
                         f"{', '.join(r.get('failed', [])) or ('none' if r['passed'] else 'yes')} |")
    lines += _structured_lines(split_metrics)
    chosen = ", ".join(f"{k} {v}" for k, v in decoding.items()) or "greedy"
    lines += ["", f"Decoding used by predict and serve: {chosen}."]
    for split, m in split_metrics.items():
        for ex in m.get("examples", {}).get("invented", [])[:3]:
            lines.append(f"- {split}, invented {', '.join(ex['not_in_input_or_reference'])}: {ex['output'][:160]!r}")
    return "\n".join(lines) + "\n"


CONSTRAINT_NAMES = {"schema": "JSON Schema (generate.schema)", "regex": "regular expression (generate.regex)",
                    "choices": "one of a fixed set of strings (generate.choices / label_set)"}


def _structured_lines(split_metrics: dict[str, dict]) -> list[str]:
    """The structured-output table: each split's outputs decoded with the constraint and without it."""
    rows = {split: m["structured"] for split, m in split_metrics.items() if m.get("structured")}
    if not rows:
        return []
    kind = next(iter(rows.values()))["constraint"]
    lines = ["", f"Structured output, {CONSTRAINT_NAMES.get(kind, kind)}: the same examples decoded with the constraint "
             "(xgrammar) and without it. Valid: the output meets it (parses and validates; matches; is one of the strings).", "",
             "| split | decoding | valid | ROUGE-L | exact match | hit max tokens | examples |", "|---|---|---|---|---|---|---|"]
    for split, s in rows.items():
        for side in ("constrained", "unconstrained"):
            rouge_l, exact = s.get(f"rougeL_{side}"), s.get(f"exact_match_{side}")
            lines.append(f"| {split} | {side} | {s[f'valid_{side}']:.1%} | {'-' if rouge_l is None else f'{rouge_l:.4f}'} | "
                         f"{'-' if exact is None else f'{exact:.1%}'} | {s[f'truncated_{side}']:.1%} | {s['n']} |")
    return lines
