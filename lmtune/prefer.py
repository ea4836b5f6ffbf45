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
from lmtune.tasks.preference import preference_grad_accum

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


def make_pairs(run: Any, examples: list, *, k: int, temperature: float, seed: int,
               keep_references: bool = False, progress: str = "none") -> tuple[list[dict], dict]:
    """Preference pairs (TRL layout: prompt, chosen, rejected) from `run`'s own outputs on `examples`: its
    greedy output and k samples each, ranked by ROUGE-L minus the penalties; and a summary (prompts,
    candidates, pairs kept, the chosen and rejected outputs' ROUGE-L and penalty shares).
    keep_references: each pair also keeps its example's true references (a `references` list, which TRL
    ignores), so the dev pairs score the new run's decoding against the data, not against the SFT model's
    own chosen sample."""
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
    rounds = [generate_outputs(task, model, run.tokenizer, examples, device, {}, cap, progress)]
    for j in range(k):
        settings = {"temperature": temperature, "top_p": TOP_P, "seed": seed + 1000 * (j + 1)}
        log.info("prefer: sample %d of %d for %d prompts", j + 1, k, len(examples))
        rounds.append(generate_outputs(task, model, run.tokenizer, examples, device, settings, cap, progress))
    pairs, chosen, rejected = [], [], []
    for i, ex in enumerate(examples):
        picked = pick_pair(score_candidates(ex, [r[i] for r in rounds]))
        if picked is None:
            continue
        best, worst = picked
        pair = {"prompt": _pair_prompt(task, ex), "chosen": best.text, "rejected": worst.text}
        if keep_references and ex.references:
            pair["references"] = list(ex.references)
        pairs.append(pair)
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
    its decoding searched again and its test split scored. Returns the new Run (as lmtune.train does).

    The pairs are also kept in the SFT run (RUN/prefer_pairs/<settings>/): a call with the same settings
    reuses them instead of sampling again, so a training that fails or is stopped loses no sampling."""
    from lmtune.api import load
    from lmtune.artifacts import new_run_dir
    from lmtune.config import build_config
    from lmtune.io import write_json, write_jsonl
    from lmtune.recipe import train_splits
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
    _check_mergeable(sft, run_dir)  # before the sampling, the expensive part
    cfg = sft.config
    splits = get_task("generation").read(cfg)  # the SFT run's own split (seeded), test included
    pairs, dev_pairs, record, kept = _pairs_of(sft, Path(run_dir), splits, k=k, temperature=temperature, max_prompts=max_prompts,
                                               progress=progress)

    d = cfg.to_dict()
    # the SFT run's lr and epochs were for its rows: the preference run takes its own defaults (epochs and lr of
    # lmtune.tasks.preference), unless the overrides give them
    train = {k: v for k, v in d["train"].items() if k != "epochs"}
    # a pair is two sequences: its micro-batches take half the SFT run's rows each (the SFT run's peak memory)
    train["grad_accum"] = preference_grad_accum(int(train.get("batch_size") or 1), int(train.get("grad_accum") or 1))
    d["train"] = {**train, "objective": objective, "lr": None, "head_lr": None, "metric": None, "progress": progress}
    d["peft"] = {**d["peft"], "method": "lora"}  # a new adapter over the SFT weights: the reference is the SFT model
    d["continual"] = {**d.get("continual", {}), "from_run": None}
    if run_name:
        d["run_name"] = run_name
    elif not (overrides or {}).get("run_name"):
        d["run_name"] = f"{Path(run_dir).name}-{objective}"
    new_cfg = build_config(d, overrides)
    new_dir = new_run_dir(new_cfg)  # claimed now: the pairs and the SFT weights go inside it
    pref = new_dir.resolve() / "prefer"  # absolute in the config, so the run loads from any directory
    try:
        base = _merged_sft(sft, pref / "sft_model")
        write_jsonl(pref / "pairs.jsonl", pairs)
        write_jsonl(pref / "dev_pairs.jsonl", dev_pairs)
        d = new_cfg.to_dict()
        d["model"] = {**d["model"], "name": str(base), "gguf_file": None}
        d["data"] = {**d["data"], "train": str(pref / "pairs.jsonl"), "dev": str(pref / "dev_pairs.jsonl")}
        new_cfg = build_config(d)
        task, train_pairs, dev_read = _preference_task(sft.task, new_cfg)
        info = {**splits.info, "sizes": {"train": len(train_pairs), "dev": len(dev_read), "test": len(splits.test)},
                "format": task.format, "prefer": {"from_run": str(Path(run_dir).resolve())}}
        record = {**record, "objective": objective}
        write_json(new_dir / "prefer.json", record)
    except BaseException:
        import shutil
        shutil.rmtree(new_dir, ignore_errors=True)  # our own half-written run, never user data
        raise
    try:
        run = train_splits(new_cfg, task, Splits(train_pairs, dev_read, splits.test, ["output"], info), run_dir=new_dir)
    except BaseException:
        if kept is not None:
            log.error("prefer: the %s run failed; its pairs are kept in %s, and `lmtune prefer %s` with the same --k, "
                      "--temperature and --max-prompts reuses them", objective, kept, run_dir)
        raise
    from lmtune import results
    results.update(run.run_dir, prefer=record)
    run.metrics["prefer"] = record
    return run


def _check_mergeable(sft: Any, run_dir: str | Path) -> None:
    """The new run trains a LoRA over the SFT model's merged weights: an SFT adapter that cannot be merged
    (prefix, prompt, lmtune's bottleneck adapter) is refused before anything is sampled."""
    from lmtune.peft import is_peft, mergeable
    method = sft.config.peft.method
    if is_peft(sft.model) and method not in mergeable():
        raise InputError(f"{run_dir}: peft.method {method} cannot be merged into the model's weights, and prefer trains a "
                         f"new LoRA over the SFT model's merged weights; start from a run trained with peft.method "
                         f"{', '.join(mergeable())} or none (full fine-tuning).")


def _pairs_of(sft: Any, run_dir: Path, splits: Any, *, k: int, temperature: float,
              max_prompts: int | None, progress: str = "none") -> tuple[list[dict], list[dict], dict, Path | None]:
    """(train pairs, dev pairs, the prefer.json record, the folder that keeps them): read back from the SFT
    run's prefer_pairs/ when an earlier call with the same settings made them, else sampled and kept there.
    The folder is None when the SFT run cannot be written to (the pairs then live only in the new run)."""
    from lmtune.io import atomic_dir, write_json, write_jsonl
    from lmtune.recipe.stages import sample
    cfg = sft.config
    seed = cfg.train.seed
    settings = {"k": k, "temperature": temperature, "max_prompts": max_prompts, "seed": seed, "top_p": TOP_P,
                "margin": MARGIN, "penalties": PENALTIES}
    kept = run_dir / "prefer_pairs" / f"k{k}-t{temperature:g}-p{max_prompts or 'all'}-s{seed}"
    earlier = _read_kept(kept, settings)
    if earlier is not None:
        log.info("prefer: reusing the pairs sampled by an earlier call, kept in %s", kept)
        return (*earlier, kept)
    train_ex = sample(splits.train, max_prompts or 0, seed)
    dev_cap = min(cfg.generate.search_examples, max_prompts) if max_prompts else cfg.generate.search_examples
    dev_ex = sample(splits.dev, dev_cap, seed)
    log.info("prefer: sampling %d outputs for %d train and %d dev prompts", k + 1, len(train_ex), len(dev_ex))
    t0 = time.perf_counter()
    pairs, summary = make_pairs(sft, train_ex, k=k, temperature=temperature, seed=seed, progress=progress)
    dev_pairs, dev_summary = make_pairs(sft, dev_ex, k=k, temperature=temperature, seed=seed + 1, keep_references=True,
                                        progress=progress)
    sampling_seconds = time.perf_counter() - t0
    for name, found in (("train", pairs), ("dev", dev_pairs)):
        if not found:
            raise InputError(f"{run_dir}: no {name} prompt gave two outputs {MARGIN} apart in score: nothing to prefer. "
                             "Raise --k or --temperature (more varied samples), or --max-prompts.")
    record = {"from_run": str(run_dir.resolve()), "train": summary, "dev": dev_summary,
              "sampling_seconds": round(sampling_seconds, 3)}  # making the pairs; the training's own is metrics.train
    try:
        with atomic_dir(kept) as tmp:
            write_jsonl(tmp / "pairs.jsonl", pairs)
            write_jsonl(tmp / "dev_pairs.jsonl", dev_pairs)
            write_json(tmp / "pairs.json", {"settings": settings, "record": record})
    except OSError as e:  # a read-only SFT run: the new run still holds its own copy
        log.warning("prefer: cannot keep the pairs in %s (%s); they are written to the new run only", kept, e)
        return pairs, dev_pairs, record, None
    return pairs, dev_pairs, record, kept


def _read_kept(kept: Path, settings: dict) -> tuple[list[dict], list[dict], dict] | None:
    """The pairs an earlier call kept, when they were made with these exact settings."""
    import json
    try:
        meta = json.loads((kept / "pairs.json").read_text(encoding="utf-8"))
        if meta.get("settings") != json.loads(json.dumps(settings)):  # JSON round trip: tuples are lists there
            return None
        rows = [[json.loads(line) for line in (kept / name).read_text(encoding="utf-8").splitlines() if line.strip()]
                for name in ("pairs.jsonl", "dev_pairs.jsonl")]
    except (OSError, ValueError):
        return None
    return rows[0], rows[1], {**meta["record"], "pairs_reused": True}


# the task state a run's decoding follows (structured output, stop strings) that the pairs files do not carry:
# the new run keeps the SFT run's, json_layout included (set by the SFT run's read() from its targets)
CONSTRAINT_STATE = ("schema", "regex", "choices", "label_set", "stop", "json_layout", "json_schema")


def _preference_task(sft_task: Any, cfg: Any) -> tuple[Any, list, list]:
    """The new run's generation task with its train and dev pairs read, and the SFT run's constraint state."""
    from lmtune.tasks import get_task
    task = get_task("generation")
    train_pairs = task.read_file(cfg.data.train, cfg)
    dev_read = task.read_file(cfg.data.dev, cfg)
    state = sft_task.state()
    task.set_state({key: state[key] for key in CONSTRAINT_STATE if key in state})
    return task, train_pairs, dev_read


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
