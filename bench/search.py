"""Hyperparameter search, cross-validation ensembles and model soups on banking77, one process, CPU,
the packaged MiniLM. Data from ../shared/data/banking77: a seeded 5,000-example sample of train (lmtune
splits dev off it as usual) and the official test set.

- baseline: lmtune's defaults, one run.
- tune: 12 trials of `lmtune tune` (default search space: lr, batch size, warmup, weight decay; every
  trial trains the default 3 epochs; TPE seed 0) with pruning (successive halving from the dev metric
  at every half epoch), and the same 12 trials without pruning (same sampler seed):
  the best trial's test accuracy, and the wall time of each study; the peer of the pruned study is the
  unpruned one.
- cv + ensemble: 5-fold `lmtune cv` with the pruned study's best config (each fold its own seed), and
  the ensemble of the five fold models (averaged calibrated probabilities), on test.
- soup: greedy soup of the pruned study's complete trials; its test accuracy, and its predict time on
  test next to the best single trial's.

Last line JSON: {"banking77": {"baseline": {"accuracy": A}, "tune_best": {"accuracy": A, "wall_s": S,
"wall_s_no_pruning": S}, "cv_ensemble": {"accuracy": A}, "soup": {"accuracy": A, "predict_s": S},
"single_predict_s": S}}
Usage: python bench/search.py [--trials 12] [--folds 5] [--sample 5000]
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

from lmtune import load, train  # noqa: E402
from lmtune.config import build_config, load_config  # noqa: E402
from lmtune.search.combine import cv, soup  # noqa: E402
from lmtune.search.tune import tune  # noqa: E402

SEED = 42


def banking(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "banking77" / f"{split}.csv", encoding="utf-8") as fh:
        return [(r["text"].strip(), r["category"]) for r in csv.DictReader(fh)]


def write(path: Path, rows: list[tuple]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def predict_seconds(run_dir: str, test_file: str) -> float:
    run = load(run_dir)
    run.config.train.progress = "none"
    run.predict(["warm up"])
    t0 = time.perf_counter()
    run.predict_file(test_file)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--sample", type=int, default=5000)
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {"train": write(work / "train.csv", random.Random(SEED).sample(banking("train"), ns.sample)),
                "test": write(work / "test.csv", banking("test"))}
        base = {"output_dir": str(work / "runs"), "data": data, "train": {"seed": SEED, "progress": "none"}}

        baseline = train({**base, "run_name": "baseline"})
        b_acc = baseline.metrics["test"]["accuracy"]
        print(f"baseline (defaults): test accuracy {b_acc:.4f}, {baseline.metrics['train']['train_seconds']:.0f}s", flush=True)

        walls, studies = {}, {}
        for name, prune in (("pruned", True), ("no_pruning", False)):
            t0 = time.perf_counter()
            studies[name] = tune(build_config({**base, "run_name": f"tune_{name}"}), ns.trials, prune=prune)
            walls[name] = time.perf_counter() - t0
            s = studies[name]
            print(f"tune {name}: {s['complete']} complete, {s['pruned']} pruned in {walls[name]:.0f}s; best trial "
                  f"{s['best']['number']} dev {s['best']['dev']:.4f} test {s['best']['test']:.4f} {s['best']['params']}", flush=True)
        best = studies["pruned"]["best"]
        print(f"pruned / unpruned wall time: {walls['pruned'] / walls['no_pruning']:.2f}x; best trial test "
              f"{best['test']:.4f} vs baseline {b_acc:.4f} ({100 * (best['test'] - b_acc):+.1f} points)", flush=True)

        best_cfg = load_config(Path(best["run_dir"]) / "config.yaml", {"output_dir": str(work / "runs"), "run_name": "cv"})
        cv_result = cv(best_cfg, ns.folds)
        e_acc = cv_result["ensemble"]["test"]["accuracy"]
        single = max(b_acc, best["test"])
        per_fold = ", ".join(f"{f['test']['accuracy']:.4f}" for f in cv_result["folds"])
        print(f"{ns.folds}-fold cv: test accuracy per fold {per_fold} "
              f"(mean {cv_result['mean']['test']['accuracy']:.4f}); ensemble {e_acc:.4f} vs best single run {single:.4f} "
              f"({100 * (e_acc - single):+.1f} points)", flush=True)

        complete = [t["run_dir"] for t in studies["pruned"]["trials"] if t["state"] == "complete"]
        s = soup(complete, work / "runs" / "soup", greedy=True)
        soup_s, single_s = predict_seconds(s["run_dir"], data["test"]), predict_seconds(best["run_dir"], data["test"])
        print(f"greedy soup of {len(complete)} complete trials kept {len(s['members'])}: test accuracy {s['test']['accuracy']:.4f} "
              f"vs best trial {best['test']:.4f}; predict on test {soup_s:.1f}s vs {single_s:.1f}s "
              f"({soup_s / single_s:.2f}x)", flush=True)
    out = {"banking77": {"baseline": {"accuracy": round(b_acc, 4)},
                         "tune_best": {"accuracy": round(best["test"], 4), "wall_s": round(walls["pruned"], 1),
                                       "wall_s_no_pruning": round(walls["no_pruning"], 1)},
                         "cv_ensemble": {"accuracy": round(e_acc, 4)},
                         "soup": {"accuracy": round(s["test"]["accuracy"], 4), "predict_s": round(soup_s, 2)},
                         "single_predict_s": round(single_s, 2)}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
