"""Seconds per epoch on a GPU: the HF Trainer as usually configured, the Trainer tuned, and lmtune's
training loop with its fast path, in one process.

NER: a BERT-base-shaped token classifier (random weights: this measures speed only) on CoNLL-2003
train (../shared/data/conll2003, 14,041 sentences at their own lengths through the packaged MiniLM's
uncased WordPiece tokenizer, first sub-token labelled, 9 tags, truncated at 128), 1 epoch.
  - trainer_padded: run_ner as usually configured: pad to 128, fp32, batch 16.
  - trainer_tuned: dynamic padding, bf16, batch 32, group_by_length, 4 dataloader workers.
  - lmtune: lmtune.training.loop.train_loop with the NER task's collate / loss and every fast-path
    default on CUDA (bf16 autocast, fused AdamW, length buckets, each bucket's whole optimizer step
    recorded as one CUDA graph, no per-step host-device wait, prefetching), batch 32. It runs 2
    epochs: lmtune_s is the second; lmtune_first_epoch_s the first, which records the graphs.
  - lmtune_compiled: the same with the model compiled (train.compile default; the first epoch pays
    the compile).
  Order: tuned Trainer, lmtune, lmtune_compiled, the loss check, then (while --budget
  lasts) the Trainer as usually configured, lmtune without step graphs (lmtune_no_step_graphs: the
  model's forward and backward as CUDA graphs under reduce-overhead, the earlier default) and the
  classification workload; the JSON so far is printed after each stage.
Classification: SST-2-shaped: the first 20,000 SST-2 train sentences (../shared/data/sst2), the same
three runs with a sequence-classification head (2 labels).
Loss check: a small learnable synthetic task (a 4-layer BERT tags each token with its id mod 5, 20%
of tags noised), the same initial weights, schedule and batch size; lmtune's mean training loss over
the last 50 of 400 steps must be within 2% of the tuned Trainer's.

Without a GPU it prints that it needs one and exits 0. --data / --tokenizer point elsewhere (a copy
of conll2003/train.txt + sst2/train.tsv, and a tokenizer folder) on a machine without ../shared.
Last line JSON: {"ner": {"trainer_padded_s": S, "trainer_tuned_s": S, "lmtune_s": S,
"lmtune_first_epoch_s": S, "speedup_vs_tuned": X, "loss_check_ok": B, ...}, "classification": {...}}
Measured on an H200 (README, GPU fast path; run at 1f833a2, when the default compiled the model):
tuned Trainer 57.73 s, step graphs with compile 2.36 s (24.46x), without 3.05 s (18.93x), loss check
(with compile) 0.37% apart; SST-2-shaped: 59.21 s vs 3.17 s (18.68x) and 3.99 s (14.84x).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

MAX_LEN, SEED = 128, 0
FORCE: dict = {}  # --dry-run: the fast path's pieces on CPU too, so that the script's whole path runs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence, through lmtune's own CoNLL reader."""
    from lmtune.data.ner_readers import read_ner
    return [(ex.tokens, ex.tags) for ex in read_ner(path)[0]]


def ner_features(sents, tok) -> tuple[list[dict], int]:
    tags = sorted({t for _, ts in sents for t in ts})
    index = {t: i for i, t in enumerate(tags)}
    enc = tok([w for w, _ in sents], is_split_into_words=True, truncation=True, max_length=MAX_LEN)
    out = []
    for i, (_, ts) in enumerate(sents):
        seen, labels = set(), []
        for w in enc.word_ids(i):
            labels.append(-100 if w is None or w in seen else index[ts[w]])
            seen.add(w)
        ids = enc["input_ids"][i]
        out.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return out, len(tags)


def sst2_features(path: Path, tok, n: int) -> list[dict]:
    rows = [line.rsplit("\t", 1) for line in path.read_text(encoding="utf-8").splitlines()[1:n + 1]]
    enc = tok([r[0] for r in rows], truncation=True, max_length=MAX_LEN)
    return [{"input_ids": ids, "label": int(r[1]), "length": len(ids)} for ids, r in zip(enc["input_ids"], rows)]


def synthetic_features(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [101] + [rng.randrange(1000, 2000) for _ in range(rng.randint(8, 40))] + [102]
        labels = [-100] + [i % 5 if rng.random() > 0.2 else rng.randrange(5) for i in ids[1:-1]] + [-100]
        out.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return out


def build_model(kind: str, num_labels: int, small: bool = False) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
    cfg = (BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_labels=num_labels)
           if small else BertConfig(num_labels=num_labels))  # BertConfig() is bert-base: 12 x 768, 30,522 words
    torch.manual_seed(SEED)
    return (BertForTokenClassification if kind == "ner" else BertForSequenceClassification)(cfg)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_accelerate_state() -> None:
    """The Trainer and our loop each build an Accelerator, with different precisions; accelerate keeps
    one process-wide state and refuses a second precision unless it is reset (as its own tests do)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def length_grouping(on: bool) -> dict:
    """The Trainer's length-grouped sampler: group_by_length until transformers 5.2x renamed it."""
    import dataclasses
    from transformers import TrainingArguments
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "group_by_length" in names:
        return {"group_by_length": on}
    return {"train_sampling_strategy": "group_by_length" if on else "random"}


def run_trainer(kind: str, features: list[dict], tok, num_labels: int, tuned: bool, lr: float = 5e-5,
                steps: int = 0, small: bool = False) -> dict:
    from transformers import (DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments)
    fresh_accelerate_state()
    model = build_model(kind, num_labels, small)
    batch = 32 if tuned else 16
    total = steps or math.ceil(len(features) / batch)
    rows = [{"input_ids": f["input_ids"], "attention_mask": [1] * f["length"],
             "labels": f["labels"] if kind == "ner" else f["label"]} for f in features]
    pad = {} if tuned else {"padding": "max_length", "max_length": MAX_LEN}
    collator = (DataCollatorForTokenClassification(tok, **pad) if kind == "ner" else DataCollatorWithPadding(tok, **pad))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, learning_rate=lr,
                                 num_train_epochs=1, max_steps=steps or -1, warmup_steps=int(0.1 * total), weight_decay=0.01,
                                 lr_scheduler_type="linear", save_strategy="no", eval_strategy="no", report_to="none",
                                 seed=SEED, disable_tqdm=True, logging_steps=min(50, total), bf16=tuned, **length_grouping(tuned),
                                 dataloader_num_workers=4 if tuned else 0, use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        sync()
        t0 = time.perf_counter()
        trainer.train()
        sync()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": round(seconds, 2), "last_loss": losses[-1] if losses else None}


def run_lmtune(kind: str, features: list[dict], tok, num_labels: int, epochs: int, lr: float = 5e-5,
               steps: int = 0, small: bool = False, **switches) -> dict:
    switches = {**FORCE, **switches}
    from accelerate import Accelerator
    from lmtune.config import TrainConfig
    from lmtune.tasks.classification import ClassificationTask
    from lmtune.tasks.ner import NerTask
    from lmtune.training.loop import LoopTask, train_loop
    task = NerTask() if kind == "ner" else ClassificationTask()
    fresh_accelerate_state()
    model = build_model(kind, num_labels, small)
    per_epoch = math.ceil(len(features) / 32)
    cfg = TrainConfig(epochs=epochs, max_steps=steps, batch_size=32, lr=lr, head_lr=lr, warmup_ratio=0.1, weight_decay=0.01,
                      precision="bf16", progress="none", seed=SEED, **switches)
    marks: list[float] = []

    def epoch_clock(state) -> None:
        if state.step % per_epoch == 0 or state.step == steps:
            sync()
            marks.append(time.perf_counter())

    loop_task = LoopTask(lambda items: task.collate(items, tok), lambda out, b: task.loss(out, b), task.num_items, None,
                         pad_values=task.pad_values(tok))
    sync()
    t0 = time.perf_counter()
    state = train_loop(model, features, loop_task, cfg, None, Accelerator(mixed_precision="bf16"), callbacks=(epoch_clock,))
    times = [b - a for a, b in zip([t0, *marks], marks)]
    losses = [h["train_loss"] for h in state.history if "train_loss" in h]
    return {"epoch_seconds": [round(t, 2) for t in times], "last_loss": sum(losses[-50:]) / len(losses[-50:]),
            "steps": state.step}


def lmtune_epochs(kind: str, features: list[dict], tok, num_labels: int, small: bool, **switches) -> dict:
    """lmtune's two epochs, with its defaults unless switches say otherwise; an error is reported, not hidden."""
    try:
        ours = run_lmtune(kind, features, tok, num_labels, epochs=2, small=small, **switches)
    except Exception as e:  # noqa: BLE001
        log(f"{kind}: lmtune {switches or 'defaults'} failed: {e!r}"[:400])
        return {"error": repr(e)[:300]}
    log(f"{kind}: lmtune {switches or 'defaults'}: epochs {ours['epoch_seconds']} s")
    return {"second": ours["epoch_seconds"][-1], "first": ours["epoch_seconds"][0]}


def workload(kind: str, features: list[dict], tok, num_labels: int, small: bool, out: dict, budget_left) -> dict:
    """Fills `out` stage by stage (the caller prints it after each workload): tuned Trainer, lmtune,
    the Trainer as usually configured, lmtune without CUDA graphs."""
    tokens = sum(f["length"] for f in features)
    log(f"{kind}: {len(features)} sequences, {tokens} tokens, longest {max(f['length'] for f in features)}")
    tuned = run_trainer(kind, features, tok, num_labels, tuned=True, small=small)
    log(f"{kind}: Trainer tuned {tuned['seconds']} s")
    out.update(trainer_tuned_s=tuned["seconds"])
    ours = lmtune_epochs(kind, features, tok, num_labels, small)
    if "error" in ours:
        out["lmtune_error"] = ours["error"]
        ours = lmtune_epochs(kind, features, tok, num_labels, small, step_graphs="off")
    if "error" not in ours:
        out.update(lmtune_s=ours["second"], lmtune_first_epoch_s=ours["first"],
                   speedup_vs_tuned=round(tuned["seconds"] / ours["second"], 2))
    variant(kind, features, tok, num_labels, small, out, "compiled", compile="default")
    if "lmtune_compiled_s" in out:
        out["compiled_speedup_vs_tuned"] = round(tuned["seconds"] / out["lmtune_compiled_s"], 2)
    if budget_left() > 0:
        as_usual(kind, features, tok, num_labels, small, out)
    return out


def as_usual(kind: str, features: list[dict], tok, num_labels: int, small: bool, out: dict) -> dict:
    """The Trainer as usually configured, and tokens/s of every run measured so far."""
    tokens = sum(f["length"] for f in features)
    padded = run_trainer(kind, features, tok, num_labels, tuned=False, small=small)
    log(f"{kind}: Trainer as usually configured {padded['seconds']} s")
    out.update(trainer_padded_s=padded["seconds"])
    if "lmtune_s" in out:
        out["speedup_vs_padded"] = round(padded["seconds"] / out["lmtune_s"], 2)
    out["tokens_per_s"] = {k.removesuffix("_s"): round(tokens / out[k]) for k in ("trainer_padded_s", "trainer_tuned_s", "lmtune_s")
                           if k in out}
    return out


def variant(kind: str, features: list[dict], tok, num_labels: int, small: bool, out: dict, name: str, **switches) -> None:
    """lmtune with some fast-path switches changed: lmtune_NAME_s and lmtune_NAME_first_epoch_s."""
    ours = lmtune_epochs(kind, features, tok, num_labels, small, **switches)
    if "error" not in ours:
        out.update({f"lmtune_{name}_s": ours["second"], f"lmtune_{name}_first_epoch_s": ours["first"]})


def loss_check(tok, steps: int = 400) -> dict:
    feats = synthetic_features(steps * 32, 1)
    peer = run_trainer("ner", feats, tok, 5, tuned=True, lr=1e-3, steps=steps, small=True)
    ours = run_lmtune("ner", feats, tok, 5, epochs=1, lr=1e-3, steps=steps, small=True)
    gap = abs(ours["last_loss"] - peer["last_loss"]) / peer["last_loss"]
    log(f"loss check: lmtune {ours['last_loss']:.4f} vs Trainer tuned {peer['last_loss']:.4f} ({100 * gap:.2f}% apart)")
    return {"lmtune_loss": round(ours["last_loss"], 4), "trainer_tuned_loss": round(peer["last_loss"], 4),
            "relative_gap": round(gap, 4), "ok": gap <= 0.02}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="folder with conll2003/train.txt and sst2/train.tsv (default ../shared/data)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the packaged MiniLM)")
    ap.add_argument("--sst2", type=int, default=20000, help="SST-2 sentences for the classification workload")
    ap.add_argument("--budget", type=float, default=480, help="seconds; later workloads are skipped past it")
    ap.add_argument("--only", choices=("ner", "classification"), default=None, help="one workload only (the other is null)")
    ap.add_argument("--dry-run", action="store_true", help="CPU allowed, small model, 256 sequences: checks the script, measures nothing")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/gpu_epoch.py needs a CUDA GPU: none here, nothing measured")
        print(json.dumps({"ner": None, "classification": None, "skipped": "no CUDA GPU"}))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lmtune").setLevel(logging.INFO)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    data = args.data or SHARED
    if args.tokenizer is None:
        from lmtune.config import DEFAULT_MODEL
        from lmtune.models import resolve_model
        args.tokenizer = resolve_model(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    log(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (dry run)'}, torch {torch.__version__}")
    result: dict = {"ner": {}}
    n = 256 if args.dry_run else None
    if args.dry_run:
        FORCE.update(length_buckets="on", sync_free="on", prefetch="on", step_graphs="on")

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    if args.only != "classification":
        ner_stages(data, tok, n, args.dry_run, result, left)
    else:
        result["ner"] = None
    if args.only == "ner" or (args.only is None and left() <= 0):
        result["classification"] = {"skipped": "--only ner" if args.only else f"past the {args.budget:.0f} s budget"}
    else:
        sst2 = sst2_features(data / "sst2" / "train.tsv", tok, n or args.sst2)
        result["classification"] = workload("classification", sst2, tok, 2, args.dry_run, {}, left)
    print(json.dumps(result))


def ner_stages(data: Path, tok, n: int | None, dry_run: bool, result: dict, left) -> None:
    """The NER workload, the loss check, then the optional NER stages while the budget lasts."""
    feats, n_tags = ner_features(read_conll(data / "conll2003" / "train.txt")[:n], tok)
    workload("ner", feats, tok, n_tags, dry_run, result["ner"], lambda: -1.0)  # the loss check comes first
    print(json.dumps(result), flush=True)
    try:
        result["ner"]["loss_check"] = loss_check(tok, 40 if dry_run else 400)
        result["ner"]["loss_check_ok"] = result["ner"]["loss_check"]["ok"]
    except Exception as e:  # noqa: BLE001 - reported, never hidden
        result["ner"]["loss_check_ok"] = False
        result["ner"]["loss_check_error"] = repr(e)[:300]
    print(json.dumps(result), flush=True)
    if left() > 0:
        as_usual("ner", feats, tok, n_tags, dry_run, result["ner"])
        print(json.dumps(result), flush=True)
    if left() > 0:
        variant("ner", feats, tok, n_tags, dry_run, result["ner"], "no_step_graphs", step_graphs="off")
        print(json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
