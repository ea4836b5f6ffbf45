"""Inference speed of an exported model: PyTorch fp32 vs ONNX fp32 vs ONNX int8, one process.

A packaged all-MiniLM-L6-v2 is fine-tuned with lmtune's defaults for 1 epoch on a seeded 4,000-
sentence sample of ../shared/data/sst2 train, exported with `lmtune export --quantize int8`, and
each backend labels the full SST-2 dev set through the same code path (lmtune.load(run, backend)
.predict: length-sorted batches under a token budget), with the same number of threads (all
cores). sentences/s is the best of --repeats timed passes after one warm-up pass, the backends
taking turns; accuracy is `Run.evaluate` on dev.

Then the same run is exported again with structured pruning (`--prune ffn:0.5`: half the feed-
forward neurons, chosen by importance, then one epoch of distillation from the unpruned model on the
same 4,000 sentences) and int8: onnx_fp32_pruned and onnx_int8_pruned. Every ratio is against the
unpruned PyTorch fp32 model of the same run.

Last line JSON: {"pytorch_fp32": {"sent_per_s": X, "accuracy": A}, "onnx_fp32": {...}, "onnx_int8": {...},
"onnx_fp32_pruned": {...}, "onnx_int8_pruned": {...}}
Usage: python bench/export.py [--repeats 5] [--run RUN_DIR (reuse a fine-tuned run)] [--prune ffn:0.5 | none]
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run", help="an existing fine-tuned run directory to export and time")
    ap.add_argument("--prune", default="ffn:0.5", help="structured pruning for the second export; none to skip it")
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
        runs = {}  # loaded before the next export replaces RUN_DIR/export: a session keeps its graph in memory
        exports = [("", None)] + ([("_pruned", args.prune)] if args.prune != "none" else [])
        for suffix, prune in exports:
            t0 = time.perf_counter()
            report = export_run(run_dir, quantize="int8", prune=prune)
            print(f"export{' --prune ' + prune if prune else ''} + int8 quantization + verification: "
                  f"{time.perf_counter() - t0:.1f}s | max |logit diff| fp32 {report['onnx_fp32']['max_abs_logit_diff']:.2e}, "
                  f"int8 {report['onnx_int8']['max_abs_logit_diff']:.2e} | size fp32 {report['onnx_fp32']['bytes'] / 2**20:.1f} MB, "
                  f"int8 {report['onnx_int8']['bytes'] / 2**20:.1f} MB", flush=True)
            if prune:
                p = report["prune"]
                print(f"pruned: encoder parameters {p['encoder_params_before']} -> {p['encoder_params_after']}, "
                      f"FFN neurons per layer {p['ffn_per_layer']}, heads per layer {p['heads_per_layer']}; "
                      f"distillation {p.get('recovery', {}).get('seconds', 0):.1f}s", flush=True)
            backends = ([("pytorch_fp32", "torch")] if not prune else []) + [("onnx_fp32" + suffix, "onnx"), ("onnx_int8" + suffix, "onnx-int8")]
            for name, backend in backends:
                runs[name] = lmtune.load(run_dir, backend=backend)
                runs[name].config.train.progress = "none"
                runs[name].predict(dev_texts)  # warm-up
        # the backends take turns, each pass after a pause (onnxruntime's idle threads spin for a while):
        # this machine's speed drifts by tens of percent over minutes, and every backend sees the same drift
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, run in runs.items():
                time.sleep(0.5)
                t0 = time.perf_counter()
                run.predict(dev_texts)
                best[name] = min(best[name], time.perf_counter() - t0)
        result = {}
        for name, run in runs.items():
            acc = run.evaluate(dev_file)["accuracy"]
            result[name] = {"sent_per_s": round(len(dev_texts) / best[name], 1), "accuracy": round(acc, 4)}
            print(f"{name:<17} {result[name]['sent_per_s']:8.1f} sentences/s ({len(dev_texts)} dev sentences in {best[name]:.2f}s, "
                  f"{threads} threads, best of {args.repeats}) | dev accuracy {acc:.4f}", flush=True)
        base = result["pytorch_fp32"]
        for name, r in result.items():
            if name != "pytorch_fp32":
                print(f"{name}: {r['sent_per_s'] / base['sent_per_s']:.2f}x PyTorch fp32 throughput, accuracy "
                      f"{100 * (r['accuracy'] - base['accuracy']):+.2f} points", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
