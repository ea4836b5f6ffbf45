"""Diagnostics benchmark: label-noise search, out-of-scope abstention, calibration; one process.

Data (read from ../shared/data, never copied): SST-2 (seeded 4,000-sentence sample of train, or
all of it for calibration; the full dev set) and CLINC150 "full". Backbone: the packaged all-MiniLM-L6-v2, lmtune defaults.

1. Noisy labels: a seeded 20% of the 4,000 SST-2 labels are flipped. lmtune's label-noise search
   (data.label_noise_folds, confident learning by cleanlab on out-of-fold probabilities) ranks
   every row; precision_at_800 = share of truly flipped rows among the 800 lowest-ranked. Then dev
   accuracy of a model trained on the noisy rows as-is vs after dropping the rows cleanlab flags
   (data.drop_label_noise), same recipe otherwise.
2. CLINC150 out-of-scope: train on in-scope train; dev = in-scope val + oos_val (threshold
   chosen there); scored on test + oos_test. (a) none: argmax, never abstains; (b) threshold on
   the raw max-softmax; (c) threshold on the temperature-calibrated max probability; (d) oos_class:
   a 151st class trained on oos_train (plus the variant with a calibrated threshold on top); (e)
   mahalanobis: threshold on minus the Mahalanobis distance of the [CLS] feature to the nearest
   class mean (abstain.score mahalanobis; means and covariance fitted on train), for the in-scope
   model and for the oos_class model.
   Thresholds are chosen on dev for --target: accuracy_loss (default; refuse as much as possible
   while dev in-scope accuracy drops at most --accuracy-loss, default 0.015, leaving a margin under
   the 2-point bound for dev/test variation) or false_accept (at most --far of dev out-of-scope
   answered); the other target's figures are printed too. in_scope_acc counts an abstention on an
   in-scope example as an error.
3. Calibration: SST-2 dev ECE (15 bins) before / after temperature scaling of a model trained on
   all of SST-2 train (67,349 sentences; --calibration-train N for a seeded sample). The
   temperature is fitted on dev itself in lmtune; to be honest about that,
   ece_after here is cross-fitted: each half of dev is calibrated by the temperature fitted on the
   other half, and the pooled probabilities are scored (ece_after_in_sample: fitted and scored on
   all of dev). ece_noise_mean / ece_noise_95: the ECE a perfectly calibrated model with the same
   confidences would show on 872 sentences (200 simulated draws), i.e. the estimator's own noise.

Last line JSON: {"noisy_labels": {"precision_at_800": P, "acc_noisy": A, "acc_cleaned": A},
"clinc150": {"none": {"in_scope_acc": A, "oos_recall": R}, "threshold": {...}, "calibrated": {...},
"oos_class": {...}}, "calibration": {"ece_before": E, "ece_after": E, "ece_after_in_sample": E,
"ece_noise_mean": E, "ece_noise_95": E}}
Usage: python bench/diagnose.py [--only noise,clinc,calibration] [--epochs-clinc 3] [--folds 5]
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

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import lmtune  # noqa: E402
from lmtune.evaluate.calibration import ece, fit_temperature, softmax  # noqa: E402

SEED = 42
LIMIT = 0  # --limit N: smoke-test on N rows per file (not for figures)


def limit(rows: list) -> list:
    return random.Random(SEED).sample(rows, min(LIMIT, len(rows))) if LIMIT else rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def sst2(n: int = 4000) -> tuple[list, list]:
    def read(name):
        with open(SHARED / "sst2" / name, encoding="utf-8") as fh:
            return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    train = read("train.tsv")
    return limit(random.Random(SEED).sample(train, min(n, len(train)))), limit(read("dev.tsv"))


def base(tmp: Path, name: str, train_file: str, dev_file: str, test_file: str | None = None, **sections) -> dict:
    cfg = {"output_dir": str(tmp / "runs"), "run_name": name, "data": {"train": train_file, "dev": dev_file, "test": test_file},
           "train": {"epochs": 1, "progress": "none", "seed": SEED}}
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    return cfg


def noisy_labels(tmp: Path, folds: int) -> dict:
    train, dev = sst2()
    rng = random.Random(SEED + 1)
    flipped = set(rng.sample(range(len(train)), len(train) // 5))
    noisy = [(t, str(1 - int(y)) if i in flipped else y) for i, (t, y) in enumerate(train)]
    train_file, dev_file = write_csv(tmp / "sst2_noisy.csv", noisy), write_csv(tmp / "sst2_dev.csv", dev)
    t0 = time.perf_counter()
    cleaned = lmtune.train(base(tmp, "cleaned", train_file, dev_file, data={"label_noise_folds": folds, "drop_label_noise": True}))
    search_s = time.perf_counter() - t0
    result = json.loads((cleaned.run_dir / "label_noise.json").read_text())
    # rows keep file order (dev is a separate file), so ranking index i is noisy row i
    k = min(800, len(flipped))
    top = result["ranking"][:k]
    precision = len(set(top) & flipped) / k
    flagged = {r["index"] for r in result["flagged"]}
    as_is = lmtune.train(base(tmp, "noisy", train_file, dev_file))
    out = {"precision_at_800": round(precision, 4), "acc_noisy": round(as_is.metrics["dev"]["accuracy"], 4),
           "acc_cleaned": round(cleaned.metrics["dev"]["accuracy"], 4)}
    print(f"noisy labels: {len(flipped)} of {len(train)} flipped | {folds}-fold search + cleaned training {search_s:.0f}s | "
          f"precision@800 {precision:.4f} | cleanlab flagged {len(flagged)} (precision {len(flagged & flipped) / max(len(flagged), 1):.4f}, "
          f"recall {len(flagged & flipped) / len(flipped):.4f}) | dev acc noisy {out['acc_noisy']:.4f} -> cleaned {out['acc_cleaned']:.4f}",
          flush=True)
    return out


def clinc(tmp: Path, epochs: int, far: float, accuracy_loss: float, main_target: str) -> dict:
    data = json.loads((SHARED / "clinc150" / "data_full.json").read_text())
    keep = sorted({y for _, y in data["train"]})[:10] + ["oos"] if LIMIT else None  # smoke test: 10 intents
    rows = {k: [(t, y) for t, y in v if keep is None or y in keep] for k, v in data.items()}
    files = {"train": write_csv(tmp / "clinc_train.csv", rows["train"]),
             "train_oos": write_csv(tmp / "clinc_train_oos.csv", rows["train"] + rows["oos_train"]),
             "dev": write_csv(tmp / "clinc_dev.csv", rows["val"] + rows["oos_val"]),
             "test": write_csv(tmp / "clinc_test.csv", rows["test"] + rows["oos_test"])}

    def pick(m: dict) -> dict:
        return {"in_scope_acc": round(m["in_scope_accuracy"], 4), "oos_recall": round(m["oos_recall"], 4)}

    t0 = time.perf_counter()
    run = lmtune.train(base(tmp, "clinc_inscope", files["train"], files["dev"], files["test"],
                            train={"epochs": epochs}, abstain={"oos_label": "oos", "score": "mahalanobis"}))
    inscope_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    oos_run = lmtune.train(base(tmp, "clinc_oos_class", files["train_oos"], files["dev"], files["test"],
                                train={"epochs": epochs}, abstain={"oos_label": "oos", "score": "mahalanobis"}))
    oos_s = time.perf_counter() - t0
    inscope, oos_class = lmtune.load(run.run_dir), lmtune.load(oos_run.run_dir)
    out = {"none": pick(run.metrics["test"].get("no_abstention", run.metrics["test"])),
           "oos_class": pick(oos_run.metrics["test"].get("no_abstention", oos_run.metrics["test"]))}
    variants = {"threshold": (inscope, False, "probability"), "calibrated": (inscope, True, "probability"),
                "mahalanobis": (inscope, True, "mahalanobis"), "oos_class_calibrated": (oos_class, True, "probability"),
                "oos_class_mahalanobis": (oos_class, True, "mahalanobis")}
    other = {}
    # the thresholds are chosen on dev (in-scope val + oos_val) only; test is scored once per variant
    for target, value in (("false_accept", far), ("accuracy_loss", accuracy_loss)):
        for name, (model, calibrated, score) in variants.items():
            model.tune_abstention(files["dev"], target, value, calibrated=calibrated, score=score)
            (out if target == main_target else other)[name] = pick(model.evaluate(files["test"]))
            (out if target == main_target else other)[name]["target"] = f"{target} {value}"
    print(f"clinc150: {len(rows['train'])} in-scope train, test {len(rows['test'])} in-scope + {len(rows['oos_test'])} oos, "
          f"{epochs} epochs ({inscope_s:.0f}s / {oos_s:.0f}s); thresholds chosen on dev", flush=True)
    for name, r in [*out.items(), *((f"{k} (other target)", v) for k, v in other.items())]:
        print(f"  {name:<36} in-scope acc {r['in_scope_acc']:.4f}  oos recall {r['oos_recall']:.4f}  {r.get('target', '')}", flush=True)
    return out


def calibration(tmp: Path, n_train: int, epochs: int) -> dict:
    train, dev = sst2(n_train)
    run = lmtune.train(base(tmp, "sst2_clean", write_csv(tmp / "sst2_train.csv", train), write_csv(tmp / "sst2_dev2.csv", dev),
                            train={"epochs": epochs}))
    m = run.metrics["dev"]
    # cross-fitted: the temperature of one half of dev scores the other half
    enc = run.encode(run.task.read_file(str(tmp / "sst2_dev2.csv"), run.config, run.labels))
    logits = np.stack(run.outputs(enc))
    gold = np.array([run.labels.index(ex.label) for ex in enc.examples])
    # pooled out-of-fold probabilities (each half calibrated by the other half's temperature), scored
    # as one set: the ECE of two 436-sentence halves averaged would add estimator bias of its own
    halves = np.random.default_rng(SEED).permutation(len(gold)) % 2 == 0
    probs = np.zeros_like(logits, dtype=float)
    for a in (halves, ~halves):
        probs[~a] = softmax(logits[~a], fit_temperature(logits[a], gold[a]))
    ece_cross = ece(probs, gold)
    noise_mean, noise_95 = m["ece_noise"]
    out = {"ece_before": round(m["ece_uncalibrated"], 4), "ece_after": round(float(ece_cross), 4),
           "ece_after_in_sample": round(m["ece"], 4), "ece_noise_mean": round(noise_mean, 4), "ece_noise_95": round(noise_95, 4)}
    print(f"calibration ({len(train)} SST-2 train sentences, {epochs} epoch(s); dev acc {m['accuracy']:.4f}): "
          f"temperature {run.task.temperature:.3f} | ECE before {out['ece_before']:.4f} | after, cross-fitted on dev "
          f"halves {out['ece_after']:.4f} | after, fitted and measured on all of dev {m['ece']:.4f} | a perfectly calibrated "
          f"model with these confidences would score {noise_mean:.4f} on average, {noise_95:.4f} at the 95th percentile",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="noise,clinc,calibration")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs-clinc", type=int, default=3)
    ap.add_argument("--far", type=float, default=0.2, help="false_accept target value")
    ap.add_argument("--accuracy-loss", type=float, default=0.015, help="accuracy_loss target value")
    ap.add_argument("--target", default="accuracy_loss", choices=["accuracy_loss", "false_accept"],
                    help="target whose results go into the JSON line (both are printed)")
    ap.add_argument("--calibration-train", type=int, default=0, help="SST-2 train sentences for the calibration model (0: all)")
    ap.add_argument("--calibration-epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    global LIMIT
    LIMIT = args.limit
    import logging
    logging.basicConfig(level=logging.WARNING)
    result = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = args.only.split(",")
        if "noise" in parts:
            result["noisy_labels"] = noisy_labels(tmp, args.folds)
        if "clinc" in parts:
            result["clinc150"] = clinc(tmp, args.epochs_clinc, args.far, args.accuracy_loss, args.target)
        if "calibration" in parts:
            result["calibration"] = calibration(tmp, args.calibration_train or 10**9, args.calibration_epochs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
