"""lmtune's default recipe vs the usual Hugging Face Trainer recipe, same backbone, same process.

Data (read from ../shared/data, never copied), split by bench/harness.py as the suite splits it: SST-2
(the seeded 4,000-sentence sample of train, 10% of it carved off as dev; tested on the full GLUE dev
set, whose test has no labels) and banking77 (train minus a seeded 10% dev; tested on test). Backbone:
the packaged all-MiniLM-L6-v2. Both sides: 1 epoch, batch 16, max_length 128, CPU, same threads, the
same training rows.

Peer ("the usual recipe"): Trainer with dynamic padding (DataCollatorWithPadding), lr 2e-5,
linear decay, default optimizer. lmtune: its defaults (length-grouped batches, warmup, weight
decay, head lr) with train.epochs=1 and batch 16, the carved dev as its dev split (early stopping and
calibration read it; the test file is read only for the final evaluation: until 2026-12 lmtune was given
the evaluation file itself as its dev). train_s is wall time of training only: the peer's trainer.train() (no
evaluation, no saving), and lmtune's training loop minus the time of that one in-loop dev
evaluation and checkpoint write, which the peer does not do; loop_s (lmtune's loop including
them) is printed too.

Prints per data set: accuracy, train seconds, ratios; the last line is JSON:
{"sst2": {"lmtune": {"accuracy": A, "train_s": S}, "peer": {...}}, "banking77": {...}}
Usage: python bench/classification.py [--only sst2|banking77] [--limit N] [--set train.lr=1e-4 ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from harness import load_test, train_dev  # noqa: E402  (bench/harness.py: the suite's clean splits)
from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402

BATCH, MAX_LEN, SEED = 16, 128, 42


def load_rows(name: str, limit: int | None) -> tuple[list, list, list]:
    """(train, dev, test) as (text, label) pairs: harness.train_dev's clean split, then the test rows."""
    train, dev = train_dev(name, limit)
    return [[(r["text"], r["label"]) for r in rows] for rows in (train, dev, load_test(name))]


def run_peer(train_rows: list, eval_rows: list, labels: list[str]) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    set_seed(SEED)
    path = resolve_model(DEFAULT_MODEL)
    index = {lab: i for i, lab in enumerate(labels)}
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    def encode(rows):
        enc = tok([t for t, _ in rows], truncation=True, max_length=MAX_LEN)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": index[y]} for i, (_, y) in enumerate(rows)]

    train_ds, eval_ds = encode(train_rows), encode(eval_rows)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=2e-5, num_train_epochs=1, lr_scheduler_type="linear",
                                 save_strategy="no", eval_strategy="no", report_to="none", seed=SEED,
                                 logging_steps=50, disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(eval_ds)
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {"accuracy": round(acc, 4), "train_s": round(train_s, 1)}


def run_lmtune(train_rows: list, dev_rows: list, eval_rows: list, workdir: Path, sets: dict) -> dict:
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("eval", eval_rows)):
        with open(workdir / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(rows)
    cfg = {"output_dir": str(workdir / "runs"), "run_name": "bench",
           "data": {"train": str(workdir / "train.csv"), "dev": str(workdir / "dev.csv"),
                    "test": str(workdir / "eval.csv"), "max_length": MAX_LEN},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg, overrides=sets)
    t = run.metrics["train"]
    pure = t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"]
    return {"accuracy": round(run.metrics["test"]["accuracy"], 4), "train_s": round(pure, 1),
            "loop_s": round(t["train_seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sst2", "banking77"])
    ap.add_argument("--limit", type=int, help="subsample train (quick checks; not for reported figures)")
    ap.add_argument("--set", action="append", default=[], help="lmtune override key=value (experiments)")
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in ns.set)}
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    result = {}
    for name in [ns.only] if ns.only else ["sst2", "banking77"]:
        train_rows, dev_rows, eval_rows = load_rows(name, ns.limit)
        labels = sorted({y for _, y in train_rows})
        peer = run_peer(train_rows, eval_rows, labels)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_lmtune(train_rows, dev_rows, eval_rows, Path(tmp), sets)
        result[name] = {"lmtune": {k: ours[k] for k in ("accuracy", "train_s")}, "peer": peer}
        print(f"{name}: {len(train_rows)} train, {len(dev_rows)} dev, {len(eval_rows)} test | "
              f"lmtune acc {ours['accuracy']:.4f} in {ours['train_s']:.1f}s (loop with eval+ckpt {ours['loop_s']:.1f}s) | "
              f"Trainer acc {peer['accuracy']:.4f} in {peer['train_s']:.1f}s | "
              f"time ratio lmtune/Trainer {ours['train_s'] / peer['train_s']:.2f}x, "
              f"accuracy diff {ours['accuracy'] - peer['accuracy']:+.4f}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
