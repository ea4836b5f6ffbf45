"""`lmtune prefer RUN_DIR`: preference pairs from an SFT generation run's own samples, then DPO (or ORPO)
on top of it, so that the model learns what to avoid (loops, run-on outputs, invented names and numbers)
with no external preference data.

For each training prompt the SFT model gives its greedy output and k samples (temperature 0.8, top-p 0.95);
each candidate scores its ROUGE-L against the reference (the task's dev metric) minus fixed penalties for
a repetition loop, hitting max_new_tokens and inventing names or numbers (lmtune.generate_control's own
checks, the ones report.md measures). The best and the worst candidate of a prompt make a pair when their
scores differ by at least MARGIN (a smaller gap is noise, not a preference). The pairs are written in TRL's
layout (prompt, chosen, rejected) to RUN/prefer/pairs.jsonl, dev pairs likewise from the run's dev split,
and a new run trains train.objective dpo from the SFT model's merged weights (a new LoRA on top, so DPO's
reference, the adapter disabled, is the SFT model), searches its decoding again and is scored on the
run's test split.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.errors import InputError

log = logging.getLogger("lmtune")

TOP_P = 0.95
MARGIN = 0.05  # the least score gap between chosen and rejected for a pair to be kept
# what each failed check costs a candidate, in ROUGE-L points (0-1): a loop is the worst failure (it is
# never what anyone wants), a run-on output or an invented name or number is half as bad; any penalty
# outweighs a tie in ROUGE-L, so a clean candidate always beats a failing one of equal ROUGE-L
PENALTIES = {"loop": 0.5, "capped": 0.25, "invented": 0.25}


@dataclass
class Candidate:
    text: str
    rougeL: float
    loop: bool
    capped: bool  # stopped at max_new_tokens rather than at the end of text
    invented: bool  # names or numbers found in neither the input nor the references

    @property
    def score(self) -> float:
        return rank_score(self.rougeL, self.loop, self.capped, self.invented)


def rank_score(rouge_l: float, loop: bool, capped: bool, invented: bool) -> float:
    """A candidate's rank: ROUGE-L against the references minus the penalty of each failed check."""
    return rouge_l - PENALTIES["loop"] * loop - PENALTIES["capped"] * capped - PENALTIES["invented"] * invented


def score_candidates(example: Any, generated: list[dict]) -> list[Candidate]:
    """Each generated output ({text, finished}) of one example, checked and scored."""
    from lmtune.generate_control import has_loop, invented, rouge
    out = []
    for g in generated:
        r = rouge([example.references], [g["text"]])["rougeL"] if example.references else 0.0
        out.append(Candidate(g["text"], float(r), has_loop(g["text"]), not g["finished"],
                             bool(invented(g["text"], [example.context, *example.references]))))
    return out


def pick_pair(candidates: list[Candidate], margin: float = MARGIN) -> tuple[Candidate, Candidate] | None:
    """(best, worst) by score, or None when their gap is under the margin or they are the same text.
    Ties keep the earlier candidate (the greedy output comes first)."""
    best = max(candidates, key=lambda c: c.score)
    worst = min(candidates, key=lambda c: c.score)
    if best.score - worst.score < margin or best.text.strip() == worst.text.strip():
        return None
    return best, worst


def _pair_prompt(task: Any, example: Any) -> str | list[dict]:
    """The prompt in TRL's layout: a source text (the run wraps it with its instruction again when it reads
    the pair), or the chat turns as they are for the other formats."""
    return example.context if task.format == "source_target" else list(example.messages)


def _shares(chosen: list[Candidate]) -> dict:
    if not chosen:
        return {}
    return {"rougeL": float(np.mean([c.rougeL for c in chosen])), "loop_share": float(np.mean([c.loop for c in chosen])),
            "capped_share": float(np.mean([c.capped for c in chosen])),
            "invented_share": float(np.mean([c.invented for c in chosen]))}


def make_pairs(run: Any, examples: list, *, k: int, temperature: float, seed: int) -> tuple[list[dict], dict]:
    """Preference pairs (TRL layout: prompt, chosen, rejected) from `run`'s own outputs on `examples`: its
    greedy output and k samples each, ranked by ROUGE-L minus the penalties; and a summary (prompts,
    candidates, pairs kept, the chosen and rejected outputs' ROUGE-L and penalty shares)."""
    from lmtune import runtime
    from lmtune.generate_control import generate_outputs
    if k < 1:
        raise InputError(f"prefer: --k {k}: sample at least one output per prompt.")
    if temperature <= 0:
        raise InputError(f"prefer: --temperature {temperature}: sampling needs a temperature above 0.")
    task, device = run.task, runtime.device()
    model = run.model.to(device)
    cap = task.max_new_tokens
    # the run's constraint (schema, choices) still applies; the decoding search's penalties do not: the
    # candidates are the model's own behaviour, loops included, which is what the pairs teach it to avoid
    rounds = [generate_outputs(task, model, run.tokenizer, examples, device, {}, cap, "none")]
    for j in range(k):
        settings = {"temperature": temperature, "top_p": TOP_P, "seed": seed + 1000 * (j + 1)}
        rounds.append(generate_outputs(task, model, run.tokenizer, examples, device, settings, cap, "none"))
    pairs, chosen, rejected = [], [], []
    for i, ex in enumerate(examples):
        picked = pick_pair(score_candidates(ex, [r[i] for r in rounds]))
        if picked is None:
            continue
        best, worst = picked
        pairs.append({"prompt": _pair_prompt(task, ex), "chosen": best.text, "rejected": worst.text})
        chosen.append(best)
        rejected.append(worst)
    summary = {"prompts": len(examples), "candidates": len(examples) * (k + 1), "pairs": len(pairs), "k": k,
               "temperature": temperature, "top_p": TOP_P, "margin": MARGIN, "penalties": PENALTIES,
               "chosen": _shares(chosen), "rejected": _shares(rejected)}
    return pairs, summary


def prefer(run_dir: str | Path, *, k: int = 4, temperature: float = 0.8, max_prompts: int | None = None,
           objective: str = "dpo", run_name: str | None = None, progress: str = "bar", overrides: dict | None = None):
    """Pairs from the SFT run at run_dir (its train split, at most max_prompts prompts; dev pairs from its
    dev split), then a new run trained with train.objective `objective` from the SFT model's merged weights,
    its decoding searched again and its test split scored. Returns the new Run (as lmtune.train does)."""
    from lmtune.api import load
    from lmtune.artifacts import new_run_dir
    from lmtune.config import build_config
    from lmtune.io import write_json, write_jsonl
    from lmtune.recipe import train_splits
    from lmtune.recipe.stages import sample
    from lmtune.tasks import get_task
    from lmtune.tasks.base import Splits

    if objective not in ("dpo", "orpo"):
        raise InputError(f"prefer: --objective {objective}: choose dpo or orpo.")
    if max_prompts is not None and max_prompts < 1:
        raise InputError(f"prefer: --max-prompts {max_prompts}: give at least 1.")
    sft = load(run_dir)
    if sft.task.name != "generation" or getattr(sft.task, "objective", "sft") != "sft":
        raise InputError(f"{run_dir}: prefer starts from an SFT run of task generation (this one is "
                         f"{sft.task.name}{'' if sft.task.name != 'generation' else ', objective ' + sft.task.objective}).")
    cfg = sft.config
    splits = get_task("generation").read(cfg)  # the SFT run's own split (seeded), test included
    seed = cfg.train.seed
    train_ex = sample(splits.train, max_prompts or 0, seed)
    dev_cap = min(cfg.generate.search_examples, max_prompts) if max_prompts else cfg.generate.search_examples
    dev_ex = sample(splits.dev, dev_cap, seed)
    log.info("prefer: sampling %d outputs for %d train and %d dev prompts", k + 1, len(train_ex), len(dev_ex))
    t0 = time.perf_counter()
    pairs, summary = make_pairs(sft, train_ex, k=k, temperature=temperature, seed=seed)
    dev_pairs, dev_summary = make_pairs(sft, dev_ex, k=k, temperature=temperature, seed=seed + 1)
    sampling_seconds = time.perf_counter() - t0
    for name, found in (("train", pairs), ("dev", dev_pairs)):
        if not found:
            raise InputError(f"{run_dir}: no {name} prompt gave two outputs {MARGIN} apart in score: nothing to prefer. "
                             "Raise --k or --temperature (more varied samples), or --max-prompts.")

    d = cfg.to_dict()
    d["train"] = {**d["train"], "objective": objective, "lr": None, "head_lr": None, "metric": None, "progress": progress}
    d["peft"] = {**d["peft"], "method": "lora"}  # a new adapter over the SFT weights: the reference is the SFT model
    d["continual"] = {**d.get("continual", {}), "from_run": None}
    if run_name:
        d["run_name"] = run_name
    elif not (overrides or {}).get("run_name"):
        d["run_name"] = f"{Path(run_dir).name}-{objective}"
    new_cfg = build_config(d, overrides)
    new_dir = new_run_dir(new_cfg)  # claimed now: the pairs and the SFT weights go inside it
    pref = new_dir / "prefer"
    try:
        base = _merged_sft(sft, pref / "sft_model")
        write_jsonl(pref / "pairs.jsonl", pairs)
        write_jsonl(pref / "dev_pairs.jsonl", dev_pairs)
        d = new_cfg.to_dict()
        d["model"] = {**d["model"], "name": str(base), "gguf_file": None}
        d["data"] = {**d["data"], "train": str(pref / "pairs.jsonl"), "dev": str(pref / "dev_pairs.jsonl")}
        new_cfg = build_config(d)
        task = get_task("generation")
        task._read_constraint(new_cfg)
        train_pairs = task.read_file(new_cfg.data.train, new_cfg)
        dev_read = task.read_file(new_cfg.data.dev, new_cfg)
        info = {**splits.info, "sizes": {"train": len(train_pairs), "dev": len(dev_read), "test": len(splits.test)},
                "format": task.format, "prefer": {"from_run": str(run_dir)}}
        record = {"from_run": str(Path(run_dir).resolve()), "objective": objective, "train": summary, "dev": dev_summary,
                  "sampling_seconds": round(sampling_seconds, 3)}  # making the pairs; the training's own is metrics.train
        write_json(new_dir / "prefer.json", record)
    except BaseException:
        import shutil
        shutil.rmtree(new_dir, ignore_errors=True)  # our own half-written run, never user data
        raise
    run = train_splits(new_cfg, task, Splits(train_pairs, dev_read, splits.test, ["output"], info), run_dir=new_dir)
    from lmtune import results
    results.update(run.run_dir, prefer=record)
    run.metrics["prefer"] = record
    return run


def _merged_sft(sft: Any, out: Path) -> Path:
    """The SFT run's model as one standalone folder (its LoRA merged into the weights), the new run's base."""
    from lmtune.io import atomic_dir
    from lmtune.peft import is_peft, merge
    model = merge(sft.model, sft.config.peft.method) if is_peft(sft.model) else sft.model
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        sft.tokenizer.save_pretrained(tmp)
    return out
