"""Full fine-tuning vs LoRA vs AdaLoRA vs bottleneck adapter vs prefix tuning, one process.

SST-2 (seeded 4,000-sentence sample of train, full dev; accuracy) and CoNLL-2003 (first 4,000
train sentences, scored on the official validation set, which is also the dev set: the test
file tunes nothing; entity F1), the packaged MiniLM, the same epochs for every method,
each with lmtune's default recipe for that method (lr per method, head always trained). Prints
per method: metric, trainable %, artifact MB (the model/ folder without tokenizer files), peak
memory (RSS sampled during training on CPU), training seconds.

Last line JSON: {"sst2": {"full": {"metric": M, "trainable_pct": P, "artifact_mb": MB,
"peak_mem_mb": MB, "train_s": S}, "lora": {...}, "adalora": {...}, "adapter": {...},
"prefix": {...}}, "conll2003": {...}}
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.data.ner_readers import read_ner  # noqa: E402

SEED = 42
METHODS = ["full", "lora", "adalora", "adapter", "prefix"]


def prepare(name: str, workdir: Path) -> dict:
    if name == "sst2":
        with open(SHARED / "sst2" / "train.tsv", encoding="utf-8") as fh:
            rows = [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
        for fname, part in (("train.csv", random.Random(SEED).sample(rows, 4000)), ("dev.csv", None)):
            if part is None:
                with open(SHARED / "sst2" / "dev.tsv", encoding="utf-8") as fh:
                    part = [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
            with open(workdir / fname, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["text", "label"])
                w.writerows(part)
        return {"task": "classification", "data": {"train": str(workdir / "train.csv"), "dev": str(workdir / "dev.csv")}}
    train_ex, _ = read_ner(SHARED / "conll2003" / "train.txt")
    with open(workdir / "train.conll", "w", encoding="utf-8") as fh:
        for ex in train_ex[:4000]:
            fh.write("".join(f"{t} {g}\n" for t, g in zip(ex.tokens, ex.tags)) + "\n")
    return {"task": "ner", "data": {"train": str(workdir / "train.conll"), "dev": str(SHARED / "conll2003" / "valid.txt")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sst2", "conll2003"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ns = ap.parse_args()
    result = {}
    for name in [ns.only] if ns.only else ["sst2", "conll2003"]:
        result[name] = {}
        with tempfile.TemporaryDirectory() as tmp:
            base = prepare(name, Path(tmp))
            metric = "accuracy" if base["task"] == "classification" else "f1"
            for method in ns.methods.split(","):
                cfg = {**base, "output_dir": str(Path(tmp) / "runs"), "run_name": method,
                       "data": {**base["data"], "max_length": 128},
                       "peft": {"method": "none" if method == "full" else method},
                       "train": {"epochs": ns.epochs, "batch_size": 16, "seed": SEED, "progress": "none"}}
                run = train(cfg)
                t = run.metrics["train"]
                row = {"metric": round(run.metrics["dev"][metric], 4), "trainable_pct": round(t["trainable_pct"], 3),
                       "artifact_mb": round(t["artifact_mb"], 2), "peak_mem_mb": round(t["peak_mem_mb"]),
                       "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}
                result[name][method] = row
                full = result[name].get("full", {}).get("metric")
                rel = f", {row['metric'] / full:.1%} of full" if full else ""
                print(f"{name} {method}: {metric} {row['metric']:.4f}{rel} | trainable {row['trainable_pct']:.2f}% | "
                      f"artifact {row['artifact_mb']:.2f} MB | peak memory {row['peak_mem_mb']} MB | "
                      f"{row['train_s']:.1f}s (lr {t['lr']:.0e})", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
