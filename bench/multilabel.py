"""lmtune multi-label vs the usual Hugging Face recipe, same backbone, same process.

Data (read from ../shared/data/goemotions, never copied): 28 labels (27 emotions + neutral); a seeded
10,000-text sample of train, the full dev set (lmtune's thresholds, temperatures and checkpoint
choice) and the full test set (scored). Backbone: the packaged all-MiniLM-L6-v2. Both sides: 1 epoch,
batch 16, max_length 128, CPU.

Peer ("the usual recipe"): AutoModelForSequenceClassification with
problem_type="multi_label_classification" (BCE), Trainer, lr 2e-5, linear decay, dynamic padding
(DataCollatorWithPadding), a 0.5 threshold for every label. lmtune: its defaults (task multilabel:
per-label thresholds and temperatures fitted on dev, length-grouped batches, warmup, head lr).
train_s as in bench/classification.py (training only; lmtune's in-loop dev evaluation and
checkpoint write are subtracted).

Last line JSON: {"goemotions": {"lmtune": {"macro_f1": F, "micro_f1": F, "train_s": S}, "peer": {...}}}
Usage: python bench/multilabel.py [--train 10000]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "goemotions"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402

BATCH, MAX_LEN, SEED = 16, 128, 42


def read_split(name: str, names: list[str]) -> list[tuple[str, list[str]]]:
    """Headless TSV: text, comma-separated label ids, comment id; CSV-quoted texts (see the data README)."""
    with open(SHARED / f"{name}.tsv", encoding="utf-8", newline="") as fh:
        return [(row[0], [names[int(i)] for i in row[1].split(",")]) for row in csv.reader(fh, delimiter="\t")]


def run_peer(train_rows, test_rows, labels: list[str]) -> dict:
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments,
                              set_seed)
    set_seed(SEED)
    index = {lab: i for i, lab in enumerate(labels)}
    path = resolve_model(DEFAULT_MODEL)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels),
                                                                   problem_type="multi_label_classification")

    def multi_hot(labs):
        v = [0.0] * len(labels)
        for lab in labs:
            v[index[lab]] = 1.0
        return v

    def encode(rows):
        enc = tok([t for t, _ in rows], truncation=True, max_length=MAX_LEN)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": multi_hot(labs)} for i, (_, labs) in enumerate(rows)]

    train_ds, test_ds = encode(train_rows), encode(test_rows)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=2e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, logging_steps=100, disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(test_ds)
    decided = (1 / (1 + np.exp(-pred.predictions)) >= 0.5).astype(int)
    gold = np.array([multi_hot(labs) for _, labs in test_rows])
    return {"macro_f1": round(float(f1_score(gold, decided, average="macro", zero_division=0)), 4),
            "micro_f1": round(float(f1_score(gold, decided, average="micro", zero_division=0)), 4), "train_s": round(train_s, 1)}


def run_lmtune(train_rows, dev_rows, test_rows, workdir: Path) -> dict:
    files = {}
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t, "labels": labs}, ensure_ascii=False) + "\n" for t, labs in rows),
                               encoding="utf-8")
    cfg = {"task": "multilabel", "output_dir": str(workdir / "runs"), "run_name": "bench",
           "data": {**{k: str(v) for k, v in files.items()}, "label_column": "labels", "max_length": MAX_LEN},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    return {"macro_f1": round(m["macro_f1"], 4), "micro_f1": round(m["micro_f1"], 4),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1),
            "dev_macro_f1": round(run.metrics["dev"]["macro_f1"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10000, help="seeded train sample size")
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    names = (SHARED / "labels.txt").read_text(encoding="utf-8").split("\n")
    train_rows = random.Random(SEED).sample(read_split("train", names), ns.train)
    dev_rows, test_rows = read_split("dev", names), read_split("test", names)
    labels = sorted({lab for _, labs in train_rows for lab in labs})
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    peer = run_peer(train_rows, test_rows, labels)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_lmtune(train_rows, dev_rows, test_rows, Path(tmp))
    print(f"goemotions: {len(train_rows)} train, {len(dev_rows)} dev, {len(test_rows)} test, {len(labels)} labels | "
          f"lmtune macro-F1 {ours['macro_f1']:.4f} micro-F1 {ours['micro_f1']:.4f} in {ours['train_s']:.1f}s | "
          f"peer macro-F1 {peer['macro_f1']:.4f} micro-F1 {peer['micro_f1']:.4f} in {peer['train_s']:.1f}s | "
          f"macro-F1 {100 * (ours['macro_f1'] - peer['macro_f1']):+.1f} points, micro-F1 {100 * (ours['micro_f1'] - peer['micro_f1']):+.1f} "
          f"points, time ratio {ours['train_s'] / peer['train_s']:.2f}x", flush=True)
    print(json.dumps({"goemotions": {"lmtune": {k: ours[k] for k in ("macro_f1", "micro_f1", "train_s")}, "peer": peer}}))


if __name__ == "__main__":
    main()
