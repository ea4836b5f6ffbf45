"""Explanations, a planted shortcut, counterfactual swaps and slices, on CPU with the packaged MiniLM.

- faithfulness: MiniLM fine-tuned on a seeded 4,000-sentence SST-2 train sample (1 epoch, lmtune's other
  defaults); 300 dev sentences (seeded) explained by Integrated Gradients; ERASER comprehensiveness and
  sufficiency at the top 20% of words, against random words and the last layer's [CLS] attention;
  seconds per explained sentence. The peer of IG is the attention heat-map measured in the same run.
- shortcut: the same sample with " zxq" appended to 90% of its positive sentences (seeded), trained the
  same way; the 300 dev sentences with " zxq" appended; the share where IG ranks zxq first (by the size
  of its attribution; also printed: first by signed attribution towards the predicted label).
- swap: the faithfulness model on all 872 dev sentences with the built-in English swap list: the share
  of predictions that change among the sentences that contain a term.
- slices: MiniLM on a seeded 5,000-example banking77 train sample (lmtune's defaults), the official test
  set with two synthetic slice columns: channel (random: app / web / phone, a null check) and length
  (short: at most 8 words, else long); accuracy per slice with 95% bootstrap intervals.

Last line JSON: {"faithfulness": {"ig_comp20": C, "random_comp20": C, "attention_comp20": C, "ig_suff20": S,
"s_per_sentence": T}, "shortcut_top1": P, "swap_changed": P}
Usage: python bench/explain.py [--sample 4000] [--examples 300] [--skip-slices]
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

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.data.readers import Example  # noqa: E402
from lmtune.explain import Explainer  # noqa: E402

SEED = 42
TOKEN = "zxq"


def sst2(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "sst2" / f"{split}.tsv", encoding="utf-8") as fh:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write(path: Path, rows: list[tuple], header=("sentence", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def fine_tune(work: Path, name: str, rows: list[tuple[str, str]], dev: str):
    t0 = time.perf_counter()
    run = train({"output_dir": str(work / "runs"), "run_name": name,
                 "data": {"train": write(work / f"{name}.csv", rows), "dev": dev, "text_column": "sentence"},
                 "train": {"epochs": 1, "seed": SEED, "progress": "none"}})
    print(f"{name}: dev accuracy {run.metrics['dev']['accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return run


def shortcut_share(run, sentences: list[str]) -> tuple[float, float]:
    """Share of sentences (each ending in the token) where IG ranks the token first: by |attribution|, and by
    signed attribution towards the predicted label."""
    rows = Explainer(run).explain([Example(s, None, "") for s in sentences])
    by_size = by_sign = 0
    for r in rows:
        words = r["explanations"][0]["attributions"]
        by_size += max(words, key=lambda wa: abs(wa[1]))[0] == TOKEN
        by_sign += max(words, key=lambda wa: wa[1])[0] == TOKEN
    return by_size / len(rows), by_sign / len(rows)


def slices(work: Path) -> None:
    def banking(split: str) -> list[dict]:
        with open(SHARED / "banking77" / f"{split}.csv", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    rng = random.Random(SEED)
    test = [{"text": r["text"].strip(), "label": r["category"], "channel": rng.choice(["app", "web", "phone"]),
             "length": "short" if len(r["text"].split()) <= 8 else "long"} for r in banking("test")]
    train_rows = [{"text": r["text"].strip(), "label": r["category"]} for r in random.Random(SEED).sample(banking("train"), 5000)]
    paths = {}
    for name, rows in (("train", train_rows), ("test", test)):
        paths[name] = str(work / f"banking_{name}.csv")
        with open(paths[name], "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    run = train({"output_dir": str(work / "runs"), "run_name": "banking", "data": {**paths, "slice_columns": ["channel", "length"]},
                 "train": {"seed": SEED, "progress": "none"}})
    s = json.loads((run.run_dir / "results.json").read_text())["slices"]
    print(f"slices (banking77 test, accuracy {s['overall']:.4f}, n {s['n']}):", flush=True)
    for col, table in s["columns"].items():
        for t in table:
            print(f"  {col}={t['value']}: n {t['n']} accuracy {t['accuracy']:.4f} gap {t['gap']:+.4f} "
                  f"95% CI [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]{' WORSE' if t['worse'] else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=4000)
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--skip-slices", action="store_true")
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    sample = random.Random(SEED).sample(sst2("train"), ns.sample)
    dev_rows = sst2("dev")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dev = write(work / "dev.csv", dev_rows)
        run = fine_tune(work, "sst2", sample, dev)
        run.config.train.progress = "none"
        result = run.explain_report(dev, max_examples=ns.examples)
        f = result["faithfulness"]
        ig, rnd, att = f["ig"], f["random"], f["attention"]
        print(f"faithfulness on {f['n']} dev sentences, top {100 * f['share']:.0f}% of words: comprehensiveness IG "
              f"{ig['comprehensiveness']:.4f}, random {rnd['comprehensiveness']:.4f}, attention {att['comprehensiveness']:.4f} "
              f"(IG / random {ig['comprehensiveness'] / rnd['comprehensiveness']:.2f}x); sufficiency IG {ig['sufficiency']:.4f}, "
              f"random {rnd['sufficiency']:.4f}, attention {att['sufficiency']:.4f}; {result['seconds_per_example']:.3f} s per "
              "sentence (IG + prediction)", flush=True)

        swap = run.fairness(dev, swap="en")["counterfactual"]
        print(f"swap (en list) on {swap['examples']} dev sentences: {swap['with_terms']} contain a term; "
              f"{100 * swap['changed']:.1f}% of their predictions change, mean probability shift {swap['mean_shift']:+.4f}; "
              f"per group {json.dumps(swap['per_group'])}", flush=True)

        rng = random.Random(SEED)
        planted = [(f"{s} {TOKEN}" if lab == "1" and rng.random() < 0.9 else s, lab) for s, lab in sample]
        shortcut_run = fine_tune(work, "shortcut", planted, dev)
        probe = [f"{s} {TOKEN}" for s, _ in random.Random(SEED).sample(dev_rows, ns.examples)]
        by_size, by_sign = shortcut_share(shortcut_run, probe)
        print(f"shortcut: IG ranks '{TOKEN}' first in {100 * by_size:.1f}% of {len(probe)} dev sentences ending in it "
              f"(by signed attribution towards the prediction: {100 * by_sign:.1f}%)", flush=True)

        if not ns.skip_slices:
            slices(work)
    out = {"faithfulness": {"ig_comp20": ig["comprehensiveness"], "random_comp20": rnd["comprehensiveness"],
                            "attention_comp20": att["comprehensiveness"], "ig_suff20": ig["sufficiency"],
                            "s_per_sentence": result["seconds_per_example"]},
           "shortcut_top1": round(by_size, 4), "swap_changed": swap["changed"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
