"""Long documents: lmtune's windows vs truncation, and the usual Hugging Face recipe, same backbone,
same process.

Data (read from ../shared/data/bbc_news/bbc_news.jsonl, never copied): full-text BBC articles, 5
topics, the file's seeded 80/20 split (1,781 / 444); a seeded 10% of train is lmtune's dev (the peer
trains on the same remaining rows and uses no dev). Backbone: the packaged MiniLM. Every side uses
max_length 64, so a median article (419 word pieces) is ~6x the window, as a 3,000-token filing is
for a 512-token encoder. 1 epoch, batch 16, CPU.

Sides:
- windows: lmtune defaults with data.long_text windows (every token in some window; at most
  data.max_windows windows per document trained on; window logits averaged at prediction);
- truncate: lmtune defaults, first 64 tokens only;
- peer: AutoModelForSequenceClassification, Trainer, lr 2e-5, linear decay, dynamic padding,
  truncation at 64 (the first window only).
predict_ms_per_doc: wall time to predict the test set (after training, model in memory) / documents.

Last line JSON: {"longdoc": {"windows": {"accuracy": A, "macro_f1": F, "predict_ms_per_doc": T},
"truncate": {...}, "peer": {...}}}
Usage: python bench/longdoc.py [--limit N]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "bbc_news" / "bbc_news.jsonl"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402

SEED, BATCH, MAX_LEN = 42, 16, 64


def read() -> tuple[list, list, list]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows = [(r["text"], r["label"]) for r in rows if r["split"] == "train"]
    test_rows = [(r["text"], r["label"]) for r in rows if r["split"] == "test"]
    idx = list(range(len(train_rows)))
    random.Random(SEED).shuffle(idx)
    k = len(idx) // 10
    return [train_rows[i] for i in sorted(idx[k:])], [train_rows[i] for i in sorted(idx[:k])], test_rows


def run_peer(train_rows, test_rows, labels) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    set_seed(SEED)
    index = {lab: i for i, lab in enumerate(labels)}
    path = resolve_model(DEFAULT_MODEL)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    def encode(rows):
        enc = tok([t for t, _ in rows], truncation=True, max_length=MAX_LEN)
        return [{**{k: enc[k][i] for k in enc}, "labels": index[y]} for i, (_, y) in enumerate(rows)]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=2e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, logging_steps=10**6, disable_tqdm=True,
                                 use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows), data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = trainer.predict(encode(test_rows)).predictions.argmax(-1)  # tokenizing is part of predicting
        predict_s = time.perf_counter() - t0
    gold = np.array([index[y] for _, y in test_rows])
    return {"accuracy": round(float(accuracy_score(gold, pred)), 4),
            "macro_f1": round(float(f1_score(gold, pred, average="macro")), 4),
            "predict_ms_per_doc": round(1000 * predict_s / len(test_rows), 2), "train_s": round(train_s, 1)}


def run_lmtune(train_rows, dev_rows, test_rows, long_text: str, workdir: Path) -> dict:
    files = {}
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    cfg = {"output_dir": str(workdir / "runs"), "run_name": long_text,
           "data": {**{k: str(v) for k, v in files.items()}, "max_length": MAX_LEN, "long_text": long_text},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    t0 = time.perf_counter()
    rows = run.predict([text for text, _ in test_rows])
    predict_s = time.perf_counter() - t0
    acc = float(np.mean([r["label"] == y for r, (_, y) in zip(rows, test_rows)]))
    assert abs(acc - m["accuracy"]) < 1e-9, (acc, m["accuracy"])  # predict and evaluate agree
    return {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "predict_ms_per_doc": round(1000 * predict_s / len(test_rows), 2),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1),
            "train_windows": t["steps"] * BATCH}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="cap every split at N documents (a quick check, not the benchmark)")
    ns = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"benchmark data not found at {DATA}")
    tr, dv, te = read()
    if ns.limit:  # seeded samples: the files are sorted by topic
        tr, dv, te = (random.Random(SEED).sample(x, min(ns.limit, len(x))) for x in (tr, dv, te))
    labels = sorted({y for _, y in tr})
    torch.manual_seed(SEED)
    out = {"peer": run_peer(tr, te, labels)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("truncate", "windows"):
            out[mode] = run_lmtune(tr, dv, te, mode, Path(tmp))
    err_w, err_t = 1 - out["windows"]["accuracy"], 1 - out["truncate"]["accuracy"]
    for name in ("windows", "truncate", "peer"):
        r = out[name]
        print(f"{name}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, predict {r['predict_ms_per_doc']:.1f} ms/doc, "
              f"train {r['train_s']:.1f}s", flush=True)
    print(f"bbc_news: {len(tr)} train, {len(dv)} dev, {len(te)} test at max_length {MAX_LEN} | test error: windows {err_w:.4f}, "
          f"truncate {err_t:.4f}: windows cut the error by {100 * (1 - err_w / err_t) if err_t else 0:.0f}% (relative)", flush=True)
    print(json.dumps({"longdoc": {k: {m: v for m, v in r.items() if m in ("accuracy", "macro_f1", "predict_ms_per_doc")}
                                  for k, r in out.items()}}))


if __name__ == "__main__":
    main()
