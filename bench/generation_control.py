"""Controllable generation with the packaged SmolLM2-135M-Instruct, CPU (issue 50): structured output,
preference tuning against bad outputs, and GGUF export for llama.cpp.

Data (read from ../shared/data/dialogsum, never copied). bench/generation.py's splits: a seeded sample of
train_sample_5000.jsonl for training, a seeded 60 of the official dev set (early stopping, the decoding
search, DPO's dev pairs), a seeded 150 of the official test dialogues of at most 400 SmolLM2 tokens, each
scored against all three references (rouge-score, best reference, stemmed).

(a) structured: `task: generation` trained to write {"topic": str, "speakers": [str], "summary": str}
    for a dialogue; the targets come from the set's topic, its speaker tags (#Person1#, ... in order of
    first appearance) and its summary (json.dumps layout). `generate.schema` holds the JSON Schema. The
    150 test dialogues are decoded twice by the same model and decoding settings: with the schema enforced
    (xgrammar) and without. valid_*: share of outputs that are valid JSON under the schema. rougeL_*:
    ROUGE-L of the summary field against the three reference summaries (an output that does not parse
    gives its "summary" string when a regex finds one, else its whole text: the lenient reading for the
    unconstrained side).
(b) dpo: the DialogSum SFT run (bench/generation.py's config: LoRA, lmtune's defaults), then
    `lmtune prefer` on it: k sampled outputs (+ greedy) per training prompt ranked by ROUGE-L minus
    penalties for loops, cap hits and invented names/numbers, best vs worst as DPO pairs, a new LoRA
    on the SFT weights, the decoding search again. loops_* / invented_*: shares of test outputs with a
    repetition loop / with names or numbers found in neither the dialogue nor the references
    (lmtune.generate_control), each model with its own chosen decoding. train_s: the DPO training loop
    (the SFT run's is in "sft_train_s"); "prefer_s": sampling and ranking the pairs.
(c) gguf: the SFT run exported with `lmtune export --format gguf` at q8_0 and q4_k_m (LoRA merged).
    q8_token_agreement: llama.cpp's greedy tokens vs PyTorch's on 20 dev prompts, position by position
    (after a first divergence the rest counts as disagreement); q8_same_top_share: llama.cpp reading
    PyTorch's continuation, the share of steps whose top token is PyTorch's (llama.cpp's own "same top p"
    of llama-perplexity --kl-divergence: one step's agreement, free of the cascade after a first
    near-tie). rougeL_torch / rougeL_q4: greedy,
    64 new tokens, no other controls, on the 150 test dialogues, PyTorch vs llama.cpp with the q4_k_m file.

Each phase keeps its run directory and figures under --work (default: a temporary folder): re-running
with the same --work resumes after the last finished phase; --fresh starts over.

Last line JSON: {"structured": {"valid_constrained": F, "valid_unconstrained": F, "rougeL_constrained": R,
"rougeL_unconstrained": R}, "dpo": {"loops_sft": F, "loops_dpo": F, "invented_sft": F, "invented_dpo": F,
"rougeL_sft": R, "rougeL_dpo": R, "train_s": S}, "gguf": {"q8_token_agreement": F, "rougeL_torch": R,
"rougeL_q4": R, "mb_q8": M, "mb_q4": M}} (shares as fractions 0-1, ROUGE in points).
Usage: python bench/generation_control.py [--work DIR] [--train N] [--sft-train N] [--structured-train N] [--test N]
       [--k K] [--max-prompts N] [--only structured,sft,dpo,gguf]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from generation import MODEL, SEED, data, write  # noqa: E402
from generation import config as sft_config  # noqa: E402

from lmtune import load, train  # noqa: E402
from lmtune.config import build_config  # noqa: E402
from lmtune.generate_control import generate_outputs, rouge  # noqa: E402
from lmtune.tasks import get_task  # noqa: E402

CPU = torch.device("cpu")
PHASES = ("structured", "sft", "dpo", "gguf")
STRUCTURED_INSTRUCTION = "Give the dialogue's topic, its speakers and a summary as JSON."
SCHEMA = {"type": "object",
          "properties": {"topic": {"type": "string", "minLength": 1, "maxLength": 60},
                         "speakers": {"type": "array", "items": {"type": "string", "pattern": "^#Person[1-9]#$"},
                                      "minItems": 1, "maxItems": 4},
                         "summary": {"type": "string", "minLength": 1, "maxLength": 500}},
          "required": ["topic", "speakers", "summary"], "additionalProperties": False}
STRUCTURED_MAX_NEW = 200  # the longest target is ~150 tokens; the schema's maxLengths keep outputs under it


def speakers(dialogue: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"#Person\d+#", dialogue)))


def structured_target(row: dict, suffix: str = "") -> str:
    return json.dumps({"topic": row[f"topic{suffix}"], "speakers": speakers(row["dialogue"]), "summary": row[f"summary{suffix}"]})


def structured_files(work: Path, files: dict, n_train: int) -> dict:
    """bench/generation.py's splits (train cut to n_train), each row given its JSON target."""
    def load_rows(path: str) -> list[dict]:
        return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    train_rows = load_rows(files["train"])[:n_train]
    out = {"train": write(work / "s_train.jsonl", [{"dialogue": r["dialogue"], "target": structured_target(r)} for r in train_rows]),
           "dev": write(work / "s_dev.jsonl", [{"dialogue": r["dialogue"], "target": structured_target(r)}
                                               for r in load_rows(files["dev"])]),
           "test": write(work / "s_test.jsonl", [{"dialogue": r["dialogue"], "target": structured_target(r, "1"),
                                                  **{f"summary{k}": r[f"summary{k}"] for k in (1, 2, 3)}}
                                                 for r in load_rows(files["test"])])}
    (work / "schema.json").write_text(json.dumps(SCHEMA, indent=1), encoding="utf-8")
    out["schema"] = str(work / "schema.json")
    return out


def summary_field(text: str) -> str:
    try:
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("summary"), str):
            return value["summary"]
    except ValueError:
        pass
    m = re.search(r'"summary"\s*:\s*"((?:[^"\\]|\\.)*)', text)
    return m.group(1) if m else text


def phase_structured(work: Path, files: dict, n_train: int) -> dict:
    """Train (or reuse the finished run under --work), then decode the test dialogues twice with the
    run's decoding settings: with the schema enforced and without."""
    s = structured_files(work, files, n_train)
    cfg = {"task": "generation", "output_dir": str(work / "runs"), "run_name": "structured", "model": {"name": MODEL},
           "data": {"train": s["train"], "dev": s["dev"], "test": s["test"], "text_column": "dialogue", "label_column": "target"},
           "generate": {"instruction": STRUCTURED_INSTRUCTION, "max_new_tokens": STRUCTURED_MAX_NEW, "schema": s["schema"]},
           "train": {"seed": SEED, "progress": "bar"}}
    reused = finished_run(work, "structured")
    run = reused or train(build_config(cfg))
    task = run.task
    metrics = results(run.run_dir)
    before = dict(task.decoding)
    if reused is not None:
        rechoose(task, metrics)
    test = task.read_file(s["test"], run.config)
    refs = [[json.loads(line)[f"summary{k}"] for k in (1, 2, 3)]
            for line in Path(s["test"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    out: dict = {"run_dir": str(run.run_dir), "train": n_train, "test": len(test), "decoding": task.decoding,
                 "decoding_at_training": before, "train_s": round(metrics["summary"]["train_seconds"], 1)}
    for side, constraint in (("constrained", "run"), ("unconstrained", None)):
        t0 = time.perf_counter()
        generated = task.generate(run.model, run.tokenizer, test, CPU, progress="bar", constraint=constraint)
        texts = [g["text"] for g in generated]
        out[f"valid_{side}"] = round(task.constraint.valid_share(texts), 4)
        out[f"rougeL_{side}"] = round(100 * rouge(refs, [summary_field(t) for t in texts])["rougeL"], 2)
        out[f"cut_{side}"] = round(sum(not g["finished"] for g in generated) / len(generated), 4)
        out[f"generate_s_{side}"] = round(time.perf_counter() - t0, 1)
        print(side, {k: v for k, v in out.items() if k.endswith(side)}, file=sys.stderr)
    return out


def rechoose(task, metrics: dict) -> None:
    """A run trained before the decoding search's current rule (under a constraint, the settings keeping the
    most outputs valid come first): the rule applied to the run's saved dev trials. The trials' generations
    are seeded and the rule reads only their scores, so this is the setting training picks today."""
    from lmtune.generate_control import choose_setting
    trials = _find(metrics.get("task_report", {}), "trials")
    if trials:
        rows = [{k: v for k, v in r.items() if k not in ("failed", "passed")} for r in trials]
        task.decoding = choose_setting(rows)["settings"]


def _find(obj, key: str):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def finished_run(work: Path, name: str):
    """The run named `name` under work/runs that training finished (results.json written), loaded; or None."""
    done = sorted((work / "runs").glob(f"{name}*/results.json"), key=lambda p: p.stat().st_mtime)
    return load(str(done[-1].parent)) if done else None


def results(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))


def figures(run_dir: str | Path) -> dict:
    """The run's own test scores (training generated all test outputs with the decoding it chose on dev),
    in bench/generation.py's units, and its training time."""
    r = results(run_dir)
    m = r["metrics"]["test"]
    return {"rougeL": round(100 * m["rougeL"], 2), "rouge1": round(100 * m["rouge1"], 2), "rouge2": round(100 * m["rouge2"], 2),
            "repeat_share": round(m["repeat_share"], 4), "truncated_share": round(m["truncated_share"], 4),
            "invented_share": round(m["invented_share"], 4), "length_ratio": round(m["length_ratio"], 3), "n": m["n"],
            "train_s": round(r["summary"]["train_seconds"], 1)}


def phase_sft(work: Path, files: dict, n_train: int) -> dict:
    """bench/generation.py's SFT run; on fewer than its 600 dialogues, the first n_train of its sample."""
    lines = [x for x in Path(files["train"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    if n_train < len(lines):
        (work / "sft_train.jsonl").write_text("".join(x + "\n" for x in lines[:n_train]), encoding="utf-8")
        files = {**files, "train": str(work / "sft_train.jsonl")}
    run = finished_run(work, "sft") or train(build_config({**sft_config(work, files), "run_name": "sft"}))
    return {"run_dir": str(run.run_dir), "decoding": run.task.decoding, **figures(run.run_dir)}


def phase_dpo(work: Path, files: dict, sft: dict, k: int, max_prompts: int | None) -> dict:
    from lmtune.prefer import prefer
    t0 = time.perf_counter()
    run = finished_run(work, "dpo") or prefer(sft["run_dir"], k=k, max_prompts=max_prompts, run_name="dpo")
    total = time.perf_counter() - t0
    summary = json.loads((Path(run.run_dir) / "prefer.json").read_text(encoding="utf-8"))
    return {"run_dir": str(run.run_dir), "decoding": run.task.decoding, "prefer": summary,
            "prefer_total_s": round(total, 1), **figures(run.run_dir)}


def phase_gguf(files: dict, sft: dict) -> dict:
    from lmtune.export.gguf import export_gguf, llama_cpp_greedy
    q8 = export_gguf(sft["run_dir"], quantize="q8_0", sample=20)
    q4 = export_gguf(sft["run_dir"], quantize="q4_k_m", sample=20)
    run = load(sft["run_dir"])
    task, tok = run.task, run.tokenizer
    test = task.read_file(files["test"], run.config)
    greedy = generate_outputs(task, run.model, tok, test, CPU, {}, 64, progress="bar", constraint=None)  # no other controls
    torch_rouge = rouge([ex.references for ex in test], [g["text"] for g in greedy])["rougeL"]
    t0 = time.perf_counter()
    ids = llama_cpp_greedy(q4["path"], [task.prompt_ids(ex, tok) for ex in test], 64, stop_ids={tok.eos_token_id})
    q4_s = time.perf_counter() - t0
    texts = [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
    q4_rouge = rouge([ex.references for ex in test], texts)["rougeL"]
    return {"q8_token_agreement": q8["verify"]["token_agreement"], "q8_identical_share": q8["verify"].get("identical_share"),
            "q8_verifier": q8["verify"].get("verifier"), "q8_same_top_share": q8["verify"].get("same_top_share"),
            "q4_token_agreement": q4["verify"]["token_agreement"], "q4_same_top_share": q4["verify"].get("same_top_share"),
            "rougeL_torch": round(100 * torch_rouge, 2), "rougeL_q4": round(100 * q4_rouge, 2), "q4_generate_s": round(q4_s, 1),
            "mb_q8": round(q8["bytes"] / 2**20, 1), "mb_q4": round(q4["bytes"] / 2**20, 1)}


def cached(work: Path, name: str, make) -> dict:
    path = work / f"{name}.json"
    if path.exists():
        print(f"{name}: figures kept from {path}", file=sys.stderr)
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    out = make()
    out["phase_s"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(name, json.dumps(out), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="folder for runs and phase figures (resumable); default a temporary one")
    ap.add_argument("--fresh", action="store_true", help="clear --work first")
    ap.add_argument("--train", type=int, default=600, help="the training sample (bench/generation.py's 600)")
    ap.add_argument("--sft-train", type=int, default=600, help="SFT training dialogues: the first N of the sample")
    ap.add_argument("--structured-train", type=int, default=300)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--k", type=int, default=4, help="sampled outputs per prompt for the preference pairs")
    ap.add_argument("--max-prompts", type=int, default=200, help="training prompts sampled for pairs (CPU cost)")
    ap.add_argument("--only", default=",".join(PHASES))
    args = ap.parse_args()
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    task = get_task("generation")
    cfg0 = build_config(sft_config(work, {"train": "", "dev": "", "test": ""}))
    task.configure(cfg0)
    _, tokenizer = task.build_model(cfg0, ["output"])
    files = data(work, args.train, args.test, tokenizer)
    result: dict = {}
    if "structured" in phases:
        s = cached(work, "structured", lambda: phase_structured(work, files, args.structured_train))
        result["structured"] = {k: s[k] for k in ("valid_constrained", "valid_unconstrained", "rougeL_constrained",
                                                  "rougeL_unconstrained")}
    sft = cached(work, "sft", lambda: phase_sft(work, files, args.sft_train)) if {"sft", "dpo", "gguf"} & set(phases) else None
    if "dpo" in phases:
        d = cached(work, "dpo", lambda: phase_dpo(work, files, sft, args.k, args.max_prompts))
        result["dpo"] = {"loops_sft": sft["repeat_share"], "loops_dpo": d["repeat_share"],
                         "invented_sft": sft["invented_share"], "invented_dpo": d["invented_share"],
                         "rougeL_sft": sft["rougeL"], "rougeL_dpo": d["rougeL"], "train_s": d["train_s"],
                         "sft_train_s": sft["train_s"], "pairs": d["prefer"].get("train", {}).get("pairs"),
                         "sampling_s": d["prefer"].get("sampling_seconds")}
    if "gguf" in phases:
        result["gguf"] = cached(work, "gguf", lambda: phase_gguf(files, sft))
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
