"""Keeping models current, on the packaged MiniLM, CPU, one process: drift checks, forgetting guards
in continual fine-tuning, and task-adaptive masked-LM pretraining. Data is read from ../shared/data.

- drift: a run fine-tuned on the seeded 4,000-sentence SST-2 train sample (1 epoch; dev split off it)
  checks the SST-2 dev set, 872 other SST-2 train sentences (a control from the same distribution) and
  Financial PhraseBank sentences; a run trained on banking77 intents group A checks group B's training
  data. The p-values are the MMD permutation test on the fine-tuned encoder's embeddings (up to 1,000
  per side) against the run's dev split. SST-2's train set holds phrases and its dev set whole sentences
  (half the length): a real shift, which the domain classifier's AUC confirms.
- forgetting: banking77's 77 intents split by a seeded draw into A (40) and B (37); train on A (its
  official test rows as test), then continue on B three ways from the same A run: naive (old labels
  kept, no guard), replay (20% of A's training rows), L2-SP (strength --l2sp). old_drop = accuracy on
  A's test before - after; new_acc = accuracy on B's test. The peer of the guards is naive continuation.
- tapt: MLM on the 67k SST-2 train sentences for --tapt-minutes, then the same fine-tuning as the drift
  run (same seed) from the adapted encoder; dev accuracy with and without, perplexity before / after on
  a held-out slice (the packaged MiniLM has no MLM head: "before" is the new head's, untrained).

Last line JSON: {"drift": {"sst2_vs_dev_p": P, "sst2_vs_finance_p": P, "banking_a_vs_b_p": P},
"forgetting": {"naive": {"old_drop": D, "new_acc": A}, "replay": {...}, "l2sp": {...}},
"tapt": {"with": A, "without": A, "ppl_before": X, "ppl_after": X}}
Usage: python bench/continual.py [--only drift,forgetting,tapt] [--tapt-minutes 15] [--epochs 2] [--l2sp 1.0]
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
from lmtune.pretrain import pretrain  # noqa: E402
from lmtune.config import build_config  # noqa: E402

SEED, BATCH, MAX_LEN = 42, 16, 128


def write(path: Path, rows: list[tuple], header=("text", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def sst2(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "sst2" / f"{split}.tsv", encoding="utf-8") as fh:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def finance() -> list[tuple[str]]:
    text = (SHARED / "financial_phrasebank" / "Sentences_50Agree.txt").read_text(encoding="latin-1")
    return [(line.rpartition("@")[0].strip(),) for line in text.splitlines() if "@" in line]


def banking(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "banking77" / f"{split}.csv", encoding="utf-8") as fh:
        return [(r["text"].strip(), r["category"]) for r in csv.DictReader(fh)]


def config(work: Path, name: str, data: dict, epochs: int, **sections) -> dict:
    return {"output_dir": str(work / "runs"), "run_name": name, "data": {**data, "max_length": MAX_LEN},
            "train": {"epochs": epochs, "batch_size": BATCH, "seed": SEED, "progress": "none"}, **sections}


def sst2_run(work: Path, model: str | None = None, name: str = "sst2"):
    sample = random.Random(SEED).sample(sst2("train"), 4000)  # the classification bench's sample
    data = {"train": write(work / "sst2_train.csv", sample), "dev": write(work / "sst2_dev.csv", sst2("dev"))}
    cfg = config(work, name, data, 1, **({"model": {"name": model}} if model else {}))
    return train(cfg)


def bench_drift(work: Path, out: dict, a_run) -> None:
    # the drift reference is a run's dev split (held out from training): here split off the 4,000-sentence
    # sample, so that SST-2's own dev set is new data to it
    sample = random.Random(SEED).sample(sst2("train"), 4000)
    run = train(config(work, "sst2_drift", {"train": write(work / "sst2_sample.csv", sample)}, 1))
    finance_file = write(work / "finance.csv", finance(), header=("text",))
    same = run.drift(write(work / "sst2_dev.csv", sst2("dev")))
    # a control from the same distribution as the run's training data: SST-2 train sentences outside the sample
    rest = [r for r in sst2("train") if r not in set(sample)]
    control = run.drift(write(work / "sst2_heldout_train.csv", random.Random(SEED + 1).sample(rest, 872)))
    other = run.drift(finance_file)
    ab = a_run.drift(work / "banking_b_train.csv")
    out["drift"] = {"sst2_vs_dev_p": same["input_shift"]["p_value"], "sst2_vs_finance_p": other["input_shift"]["p_value"],
                    "banking_a_vs_b_p": ab["input_shift"]["p_value"], "sst2_vs_heldout_train_p": control["input_shift"]["p_value"],
                    "sst2_vs_dev_domain_auc": same["input_shift"]["domain_auc"]}
    tokens = (same["vocabulary_shift"]["train"]["mean_tokens"], same["vocabulary_shift"]["new"]["mean_tokens"])
    print(f"sst2: mean tokens of the training sample {tokens[0]:.1f}, of dev {tokens[1]:.1f} (train holds phrases, dev "
          f"whole sentences); domain classifier AUC train vs dev {same['input_shift']['domain_auc']:.3f}", flush=True)
    for name, r in (("sst2 train vs sst2 dev", same), ("sst2 train vs 872 other sst2 train sentences", control),
                    ("sst2 train vs financial phrasebank", other),
                    ("banking77 A vs B", ab)):
        ls = f", label shift p {r['label_shift']['p_value']:.3g}" if "label_shift" in r else ""
        print(f"drift {name}: input shift p {r['input_shift']['p_value']:.4f} (domain AUC "
              f"{r['input_shift']['domain_auc']:.3f}){ls} -> {'SHIFT' if r['shifted'] else 'no shift'} "
              f"[{', '.join(f['kind'] for f in r['findings']) or '-'}]", flush=True)


def banking_groups(work: Path) -> tuple[dict, dict]:
    intents = sorted({y for _, y in banking("train")})
    a = set(random.Random(SEED).sample(intents, 40))
    files = {}
    for split in ("train", "test"):
        rows = banking(split)
        files[("a", split)] = write(work / f"banking_a_{split}.csv", [r for r in rows if r[1] in a])
        files[("b", split)] = write(work / f"banking_b_{split}.csv", [r for r in rows if r[1] not in a])
    return ({"train": files[("a", "train")], "test": files[("a", "test")]},
            {"train": files[("b", "train")], "test": files[("b", "test")]})


def bench_forgetting(work: Path, out: dict, a_run, b_data: dict, epochs: int, l2sp: float) -> None:
    guards = {"naive": {"missing_labels": "keep"}, "replay": {"replay": 0.2}, "l2sp": {"missing_labels": "keep", "l2sp": l2sp}}
    out["forgetting"] = {}
    for name, cont in guards.items():
        t0 = time.perf_counter()
        run = train(config(work, f"b_{name}", b_data, epochs, continual={"from_run": str(a_run.run_dir), **cont}))
        c = run.metrics["continual"]
        out["forgetting"][name] = {"old_drop": round(c["forgetting"], 4), "new_acc": round(run.metrics["test"]["accuracy"], 4)}
        print(f"continue on B, {name}: A test accuracy {c['before']:.4f} -> {c['after']:.4f} (drop {c['forgetting']:.4f}), "
              f"B test accuracy {run.metrics['test']['accuracy']:.4f}, {time.perf_counter() - t0:.0f}s", flush=True)
    f = out["forgetting"]
    for name in ("replay", "l2sp"):
        cut = 1 - f[name]["old_drop"] / f["naive"]["old_drop"] if f["naive"]["old_drop"] > 0 else float("nan")
        print(f"{name} vs naive: forgetting cut by {cut:.1%} (ratio {f[name]['old_drop'] / f['naive']['old_drop']:.2f}x), "
              f"B accuracy {100 * (f[name]['new_acc'] - f['naive']['new_acc']):+.1f} points", flush=True)


def bench_tapt(work: Path, out: dict, minutes: float) -> None:
    texts = work / "sst2_unlabeled.txt"
    texts.write_text("\n".join(t for t, _ in sst2("train")) + "\n", encoding="utf-8")
    cfg = build_config({"output_dir": str(work / "pre"), "run_name": "tapt", "data": {"max_length": 64},
                        "pretrain": {"files": [str(texts)], "max_minutes": minutes},
                        "train": {"epochs": 3, "batch_size": 32, "seed": SEED, "schedule": "constant", "progress": "none"}})
    r = pretrain(cfg)
    run = sst2_run(work, r["model_dir"], "sst2_tapt")
    t = out.setdefault("tapt", {})
    t.update({"with": round(run.metrics["dev"]["accuracy"], 4), "ppl_before": round(r["perplexity_before"], 2),
              "ppl_after": round(r["perplexity_after"], 2)})
    print(f"tapt: {r['steps']} MLM steps in {r['seconds']:.0f}s on {r['texts']} sentences, held-out perplexity "
          f"{r['perplexity_before']:.1f} -> {r['perplexity_after']:.2f}; SST-2 dev accuracy with {t['with']:.4f}"
          + (f" vs without {t['without']:.4f} ({100 * (t['with'] - t['without']):+.1f} points)" if "without" in t else ""),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="drift,forgetting,tapt")
    ap.add_argument("--tapt-minutes", type=float, default=15.0)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the banking77 runs")
    ap.add_argument("--l2sp", type=float, default=1.0)
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    parts = set(ns.only.split(","))
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a_run = None
        if parts & {"drift", "forgetting"}:
            a_data, b_data = banking_groups(work)
            a_run = train(config(work, "banking_a", a_data, ns.epochs))
            print(f"banking77 A: {a_run.metrics['test']['n']} test, accuracy {a_run.metrics['test']['accuracy']:.4f}", flush=True)
        if "drift" in parts:
            bench_drift(work, out, a_run)
        if "forgetting" in parts:
            bench_forgetting(work, out, a_run, b_data, ns.epochs, ns.l2sp)
        if "tapt" in parts:
            out.setdefault("tapt", {})["without"] = round(sst2_run(work).metrics["dev"]["accuracy"], 4)
            bench_tapt(work, out, ns.tapt_minutes)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
