"""Robustness benchmark: plain fine-tuning vs FGM vs PGD vs word-level (typo) adversarial training
vs augmentation, one process.

Data (read from ../shared/data, never copied): SST-2, a seeded 4,000-sentence sample of train and
the full dev set. Backbone: the packaged all-MiniLM-L6-v2, lmtune defaults, 1 epoch each; only
the robustness setting differs. typo_adv trains, at every step, on the worst (highest-loss) of 8
random typo versions of each training sentence next to the clean one: the attack's own kind of
perturbation, drawn from train sentences with other seeds (dev is never seen). Each model is scored on clean dev, on dev under the typo attack
(random keyboard/swap/delete/insert edits of 20% of the words, at least one) and under the
word-substitution attack (WordNet synonyms for 20% of the words); the word-importance search
attack (greedy, 10%-of-words budget, at least one word) runs on the plain model. Attacks are the
same seeded perturbations for every model; negations, numbers and names are never changed.
train_s is the training loop's time without its dev evaluation and checkpoint write.

Last line JSON: {"plain": {"clean_acc": A, "typo_acc": A, "synonym_acc": A, "train_s": S}, "fgm": {...},
"pgd": {...}, "typo_adv": {...}, "augment": {...}, "attack_success_rate": R}
Usage: python bench/robust.py [--limit N (smoke test only)] [--only plain,fgm,...]
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

import lmtune  # noqa: E402

SEED = 42
SETTINGS = {
    "plain": {},
    "fgm": {"adversarial": {"method": "fgm", "epsilon": 0.3}},
    "pgd": {"adversarial": {"method": "pgd", "epsilon": 0.3, "alpha": 0.1, "steps": 3}},
    "augment": {"augment": {"methods": ["synonym", "insert", "swap", "delete", "typo"], "multiplier": 1, "prob": 0.1}},
    "typo_adv": {"adversarial": {"method": "typo", "rate": 0.2, "candidates": 8}},
}


def write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def sst2(limit: int) -> tuple[list, list]:
    def read(name):
        with open(SHARED / "sst2" / name, encoding="utf-8") as fh:
            return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    train, dev = random.Random(SEED).sample(read("train.tsv"), 4000), read("dev.tsv")
    if limit:
        train, dev = train[:limit], dev[: max(limit // 4, 20)]
    return train, dev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--only", default=",".join(SETTINGS))
    args = ap.parse_args()
    train, dev = sst2(args.limit)
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = {"train": write_csv(tmp / "train.csv", train), "dev": write_csv(tmp / "dev.csv", dev)}
        for name in args.only.split(","):
            cfg = {"output_dir": str(tmp / "runs"), "run_name": name, "data": dict(files),
                   "train": {"epochs": 1, "progress": "none", "seed": SEED}, **SETTINGS[name]}
            run = lmtune.train(cfg)
            t = run.metrics["train"]
            train_s = t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"]
            t0 = time.perf_counter()
            methods = ["typo", "synonym", "search"] if name == "plain" else ["typo", "synonym"]
            r = run.attack_examples(run.task.read_file(files["dev"], run.config, run.labels, require_label=True),
                                    methods=methods, rate=0.2, budget=0.1, synonyms="wordnet")
            attack_s = time.perf_counter() - t0
            a = r["attacks"]
            out[name] = {"clean_acc": round(r["clean"]["accuracy"], 4), "typo_acc": round(a["typo"]["accuracy"], 4),
                         "synonym_acc": round(a["synonym"]["accuracy"], 4), "train_s": round(train_s, 1)}
            drop = out[name]["clean_acc"] - out[name]["typo_acc"]
            print(f"{name}: clean {out[name]['clean_acc']:.4f} | typo {out[name]['typo_acc']:.4f} (drop {drop:.4f}, "
                  f"{a['typo']['avg_words_changed']:.2f} words) | synonym {out[name]['synonym_acc']:.4f} "
                  f"({a['synonym']['avg_words_changed']:.2f} words) | train {train_s:.1f}s ({t['seconds_per_step']:.3f} s/step) "
                  f"| attacks {attack_s:.0f}s", flush=True)
            if "search" in a:
                s = a["search"]
                out["attack_success_rate"] = round(s["success_rate"], 4)
                print(f"search attack on {name}: flipped {s['flipped']} of {s['attacked']} correct predictions "
                      f"({s['success_rate']:.1%}) within a 10% budget, {s['avg_words_changed']:.2f} words "
                      f"({s['avg_fraction_changed']:.1%}) changed on average; e.g. {json.dumps(s['examples'][:2])}", flush=True)
    if "plain" in out:
        base = out["plain"]["clean_acc"] - out["plain"]["typo_acc"]
        for name in ("fgm", "pgd", "typo_adv", "augment"):
            if name in out:
                drop = out[name]["clean_acc"] - out[name]["typo_acc"]
                print(f"{name} vs plain: typo drop {drop:.4f} vs {base:.4f} ({(1 - drop / base) if base else 0:.0%} less), "
                      f"clean {out[name]['clean_acc'] - out['plain']['clean_acc']:+.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
