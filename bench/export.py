"""Inference speed of an exported model: PyTorch fp32 vs ONNX fp32 vs ONNX int8, one process.

A packaged all-MiniLM-L6-v2 is fine-tuned with lmtune's defaults for 1 epoch on a seeded 4,000-
sentence sample of ../shared/data/sst2 train, exported with `lmtune export --quantize int8`, and
each backend labels the full SST-2 dev set through the same code path (lmtune.load(run, backend)
.predict: length-sorted batches under a token budget), with the same number of threads (all
cores). sentences/s is the best of --repeats timed passes after one warm-up pass; accuracy is
`Run.evaluate` on dev.

Last line JSON: {"pytorch_fp32": {"sent_per_s": X, "accuracy": A}, "onnx_fp32": {...}, "onnx_int8": {...}}
Usage: python bench/export.py [--repeats 3] [--run RUN_DIR (reuse a fine-tuned run)]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/peft.py would shadow peft
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lmtune  # noqa: E402
from lmtune.export.onnx import export_run  # noqa: E402

SEED = 42


def sst2(tmp: Path) -> tuple[str, str, list[str]]:
    def read(name):
        with open(SHARED / "sst2" / name, encoding="utf-8") as fh:
            return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    files = {}
    for name, rows in (("train", random.Random(SEED).sample(read("train.tsv"), 4000)), ("dev", read("dev.tsv"))):
        with open(tmp / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(rows)
        files[name] = (str(tmp / f"{name}.csv"), [t for t, _ in rows])
    return files["train"][0], files["dev"][0], files["dev"][1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", help="an existing fine-tuned run directory to export and time")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train_file, dev_file, dev_texts = sst2(tmp)
        if args.run:
            run_dir = Path(args.run)
        else:
            run_dir = lmtune.train({"output_dir": str(tmp / "runs"), "run_name": "sst2",
                                    "data": {"train": train_file, "dev": dev_file},
                                    "train": {"epochs": 1, "progress": "none", "seed": SEED}}).run_dir
        t0 = time.perf_counter()
        report = export_run(run_dir, quantize="int8")
        print(f"export + int8 quantization + verification: {time.perf_counter() - t0:.1f}s | max |logit diff| fp32 "
              f"{report['onnx_fp32']['max_abs_logit_diff']:.2e}, int8 {report['onnx_int8']['max_abs_logit_diff']:.2e} | "
              f"size fp32 {report['onnx_fp32']['bytes'] / 2**20:.1f} MB, int8 {report['onnx_int8']['bytes'] / 2**20:.1f} MB",
              flush=True)
        result = {}
        for name, backend in (("pytorch_fp32", "torch"), ("onnx_fp32", "onnx"), ("onnx_int8", "onnx-int8")):
            run = lmtune.load(run_dir, backend=backend)
            run.config.train.progress = "none"
            run.predict(dev_texts)  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run.predict(dev_texts)
                best = min(best, time.perf_counter() - t0)
            acc = run.evaluate(dev_file)["accuracy"]
            result[name] = {"sent_per_s": round(len(dev_texts) / best, 1), "accuracy": round(acc, 4)}
            print(f"{name:<13} {result[name]['sent_per_s']:8.1f} sentences/s ({len(dev_texts)} dev sentences in {best:.2f}s, "
                  f"{threads} threads) | dev accuracy {acc:.4f}", flush=True)
        base = result["pytorch_fp32"]
        for name in ("onnx_fp32", "onnx_int8"):
            r = result[name]
            print(f"{name}: {r['sent_per_s'] / base['sent_per_s']:.2f}x PyTorch fp32 throughput, accuracy "
                  f"{100 * (r['accuracy'] - base['accuracy']):+.2f} points", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
