"""Labeling less (issue 48): few-shot classification, self-training on unlabeled text, and active learning, on the
packaged encoders, CPU, one process.

Data (read from ../shared/data, never copied into the repo; the files each unit trains on are written under --work):
SST-2 (train; evaluated on its dev set, as the other benches do: SST-2 has no labeled test), banking77 (train; its
test set) and ChnSentiCorp (train; its test set). Train texts are de-duplicated (first label kept), so no text is in
two of a sample's parts. SST-2's and ChnSentiCorp's labels 0 / 1 are written as negative / positive, the names their
READMEs give them and the names the Hugging Face copies' ClassLabel carries (what lmtune reads from the hub); every
side gets the same files.

Few-shot means few labels for dev too. Each sample is a seeded per-class draw from train: k rows per class for train
and, disjoint from them, k rows per class for dev (lmtune's early stopping and calibration see no more labels than
k per class twice over). A class with fewer than 2k rows gives dev what is left after its k, but at least a quarter
of its rows, and trains on the rest (banking77 at 64 per class: 5 intents of 35 to 82 rows train on fewer than 64).
The evaluation split is never used to pick or tune anything.

Phase fewshot: SST-2 and banking77 at 8 and 64 labeled examples per class with the packaged all-MiniLM-L6-v2,
ChnSentiCorp at 8 per class with the packaged m3e-small; 5 seeded samples each (seeds 0-4). Sides, same backbone,
same files:
- lmtune: its defaults (fewshot.method auto; its rule and the method it chose are recorded per unit);
- setfit: SetFit 1.2 as its docs show it, `SetFitModel.from_pretrained(<the encoder's folder>)`, `setfit.Trainer` with
  `setfit.TrainingArguments` at its defaults (sampling_strategy oversampling, one body epoch at 2e-5, batch 16,
  CosineSimilarityLoss, scikit-learn LogisticRegression head), trained on the train rows (SetFit's defaults read no
  dev set: eval_strategy no). Set besides the defaults: report_to none (the defaults report to every installed
  tracker: wandb, installed here, stops without an API key), output_dir under --work, seed = the sample's seed.
  One exception, for CPU time alone: where the default oversampling of all unique pairs would give more than
  50,000 pairs (banking77: ~375,000 at 8 per class, ~23 million at 64), num_iterations 20 (the SetFit paper's
  setting and setfit < 1.0's default; also lmtune's pair budget: 2 x 20 pairs per text), with max_steps set to the
  length of that one epoch, which trains the same pairs in the same order but stops setfit's pair generator from
  first listing all ~12 million combinations (several GB). The unit's record says which setting ran;
- plain: lmtune with fewshot.method none (a new softmax head on the encoder, fine-tuned by cross-entropy).
accuracy: on the evaluation split. train_s: seconds of training alone, measured alike: lmtune's contrastive stage
plus its training loop (with its dev evaluations and checkpoint writes; its L-BFGS head fit, seconds at most, falls
between them and is not counted), setfit's `trainer.train()` (body and head, with its checkpoint writes); wall_s: the
whole unit (loading, training, evaluation, for lmtune also its report).
Mean and sample standard deviation (n - 1) over the seeds.

Phase self_training: SST-2 and banking77 at 16 per class (train and dev drawn as above) plus 5,000 unlabeled texts, a
seeded sample of the other train rows (labels removed: the file has a text column only), given as data.unlabeled;
against the same run (same files, seed and defaults) without data.unlabeled. accuracy and ECE (expected calibration
error, 15 bins, of the calibrated probabilities) on the evaluation split, both from lmtune's own results.json: the
same definition for both sides. Seeds as above.

Phase active: bench/fewshot_active.py's phase_active (simulated active learning with gold labels as the oracle;
its docstring states its protocol), run when that module is importable; its options are this script's --active-*
options (--seeds is shared).

Resumable: each (phase, set, size, seed, side) is one JSON file under --work (work/PHASE/SET_K/seedN/SIDE.json),
written when the unit ends; a re-run skips finished units and repeats an interrupted one from its start. A finished
lmtune unit keeps its run folder without its weights (results.json, report.md, logs). --work refuses units of other
settings (--limit, --unlabeled, --st-per-class): smoke figures never mix with real ones.

Prints one line per unit and per row; work/summary.json keeps every figure (training seconds, chosen methods, the
acceptance checks). The last line is JSON, means over the seeds (accuracies and ECE as fractions; the active AUCs in points, as
bench/fewshot_active.py gives them):
{"fewshot": {"sst2_8": {"lmtune": A, "setfit": A, "plain": A, "lmtune_std": S, "setfit_std": S}, "sst2_64": {...},
"banking77_8": {...}, "banking77_64": {...}, "chnsenticorp_8": {...}}, "self_training": {"sst2": {"with": A,
"without": A, "ece_with": E, "ece_without": E}, "banking77": {...}}, "active": {"sst2": {"lmtune_auc": A,
"random_auc": A, "small_text_auc": A, "s_per_round": S}, "banking77": {...}}}
Usage: python bench/fewshot.py [--work DIR] [--only fewshot,self_training,active] [--seeds 5] [--sets sst2,...]
       [--sizes 8,64] [--sides lmtune,setfit,plain] [--limit N] [--unlabeled 5000] [--st-per-class 16] [--active-...]
Smoke: python bench/fewshot.py --work /tmp/fs --seeds 1 --sets sst2 --sizes 8 --limit 200 --unlabeled 300
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.evaluate.calibration import ece  # noqa: E402
from lmtune.io import write_json  # noqa: E402
from lmtune.models import resolve_model  # noqa: E402

from harness import kept_unit as unit, summary as seed_summary, write_csv  # noqa: E402  (bench/harness.py, the benches' shared helpers)

try:  # the active-learning phase is another script's (bench/fewshot_active.py); the others run without it
    import fewshot_active
except ModuleNotFoundError as missing:
    if missing.name != "fewshot_active":
        raise
    fewshot_active = None

PHASES = ("fewshot", "self_training", "active")
M3E = "moka-ai/m3e-small"
# (set, labeled examples per class): the rows; ChnSentiCorp with m3e-small, the others with MiniLM
FEWSHOT_ROWS = (("sst2", 8), ("sst2", 64), ("banking77", 8), ("banking77", 64), ("chnsenticorp", 8))
SELF_TRAINING_SETS = ("sst2", "banking77")
SIDES = ("lmtune", "setfit", "plain")
SETFIT_MAX_DEFAULT_PAIRS = 50_000  # above it, setfit's default pair count is days of CPU: num_iterations 20 instead
SETFIT_ITERATIONS = 20
SENTIMENT = {"0": "negative", "1": "positive"}


# ---- data -------------------------------------------------------------------------------------------------------
def _unique(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for text, label in rows:
        if text:
            seen.setdefault(text, label)
    return list(seen.items())


def _tsv(path: Path, text: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:  # SST-2 has bare quotes: QUOTE_NONE (shared/README.md)
        return [(r[text].strip(), SENTIMENT[r["label"]]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _banking(split: str) -> list[tuple[str, str]]:
    with open(SHARED / "banking77" / f"{split}.csv", encoding="utf-8", newline="") as fh:  # quoted newlines: a real parser
        return [(r["text"].strip(), r["category"]) for r in csv.DictReader(fh)]


def load_set(name: str) -> dict:
    """train rows (de-duplicated), evaluation rows, the evaluation split's name and the backbone."""
    if name == "sst2":
        train_rows, eval_rows, split = _tsv(SHARED / "sst2" / "train.tsv", "sentence"), _tsv(SHARED / "sst2" / "dev.tsv", "sentence"), "dev"
    elif name == "banking77":
        train_rows, eval_rows, split = _banking("train"), _banking("test"), "test"
    elif name == "chnsenticorp":
        d = SHARED / "chnsenticorp"
        train_rows, eval_rows, split = _tsv(d / "train.tsv", "text_a"), _tsv(d / "test.tsv", "text_a"), "test"
    else:
        raise SystemExit(f"unknown set {name!r}")
    return {"train": _unique(train_rows), "eval": eval_rows, "split": split,
            "model": M3E if name == "chnsenticorp" else DEFAULT_MODEL}


def per_class_sample(rows: list[tuple[str, str]], k: int, seed: int, tag: str) -> tuple[list, list, list]:
    """(train, dev, rest): per class, a seeded shuffle; k rows train and k rows dev; a class of fewer than 2k rows
    gives dev what is left after k but at least a quarter of its rows (dev stays as few-shot as train)."""
    rng = random.Random(f"{tag}:{k}:{seed}")  # str seeds are stable across processes (hash randomization aside)
    by_class: dict[str, list] = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    train_rows, dev_rows, rest = [], [], []
    for label in sorted(by_class):
        group = list(by_class[label])
        rng.shuffle(group)
        n = len(group)
        n_dev = min(k, max(n - k, math.ceil(n / 4)))
        n_train = min(k, n - n_dev)
        train_rows += group[:n_train]
        dev_rows += group[n_train:n_train + n_dev]
        rest += group[n_train + n_dev:]
    return train_rows, dev_rows, rest


def eval_sample(rows: list, limit: int | None) -> list:
    return random.Random(f"eval:{limit}").sample(rows, limit) if limit and limit < len(rows) else rows


# ---- units ------------------------------------------------------------------------------------------------------
def fresh_folder(folder: Path) -> Path:
    """An interrupted unit starts over: its earlier run folder goes."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def drop_weights(run_dir: Path) -> None:
    """A finished unit's model folders and checkpoints (~90 MB each; nothing reads them again): disk, not results."""
    for name in ("model", "checkpoints"):
        for d in sorted(run_dir.rglob(name), key=lambda p: -len(p.parts)):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def run_lmtune(folder: Path, files: dict, model: str, seed: int, **sections) -> dict:
    """lmtune's defaults on the unit's files (plus the given sections); the figures from its results.json."""
    cfg = {"output_dir": str(folder), "run_name": "run", "model": {"name": model},
           "data": {"train": files["train"], "dev": files["dev"], "test": files["test"], **sections.pop("data", {})},
           "train": {"seed": seed, "progress": "none"}, **sections}
    run = train(cfg)
    run_dir = Path(run.run_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    test, summary, fewshot = results["metrics"]["test"], results["summary"], results.get("fewshot") or {}
    contrastive = fewshot.get("contrastive_seconds") or 0.0
    out = {"accuracy": round(test["accuracy"], 4), "ece": round(test["ece"], 4), "macro_f1": round(test["macro_f1"], 4),
           "train_s": round(contrastive + summary["train_seconds"], 1), "contrastive_s": round(contrastive, 1),
           "loop_s": round(summary["train_seconds"], 1), "method": fewshot.get("method"), "why": fewshot.get("why"),
           "pairs": fewshot.get("pairs"), "dev_accuracy": round(results["metrics"]["dev"]["accuracy"], 4),
           "run_dir": str(run_dir)}
    if "selftrain" in results:
        st = results["selftrain"]
        out["selftrain"] = {"final_round": st["final_round"], "pseudo_labels_kept": st["pseudo_labels_kept"],
                            "stop_reason": st["stop_reason"],
                            "rounds": [{k: r.get(k) for k in ("round", "threshold", "pseudo_labels", "dev", "kept")}
                                       for r in st["rounds"]],
                            "student_methods": student_methods(run_dir)}
    drop_weights(run_dir)
    return out


def student_methods(run_dir: Path) -> dict:
    """Each self-training round's student: the few-shot method it chose (fewshot's rule on its own train split,
    labels plus pseudo-labels) and why; kept and dropped rounds alike."""
    out = {}
    for path in sorted(run_dir.glob("selftrain/round-*/fewshot.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        out[path.parent.name] = f"{record['method']} ({record['why']})"
    return out


def setfit_pairs_by_default(labels: list[str]) -> int:
    """The pairs setfit 1.2's default sampling (oversampling) trains on: every unique pair, with replacement
    (setfit.sampler.shuffle_combinations), negatives and positives each brought to the larger count."""
    counts = np.array(list({lab: labels.count(lab) for lab in set(labels)}.values()), dtype=np.int64)
    n = int(counts.sum())
    positive = int((counts * (counts + 1) // 2).sum())
    negative = n * (n + 1) // 2 - positive
    return 2 * max(positive, negative)


def run_setfit(folder: Path, train_rows: list, eval_rows: list, model: str, seed: int) -> dict:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    labels = sorted({y for _, y in train_rows})
    index = {lab: i for i, lab in enumerate(labels)}
    default_pairs = setfit_pairs_by_default([y for _, y in train_rows])
    args = {"output_dir": str(folder / "setfit"), "report_to": "none", "seed": seed}
    if default_pairs > SETFIT_MAX_DEFAULT_PAIRS:
        pairs = 2 * SETFIT_ITERATIONS * len(train_rows)
        # max_steps = that epoch's steps: the same pairs in the same order, without listing every combination first
        args.update(num_iterations=SETFIT_ITERATIONS, max_steps=math.ceil(pairs / 16))
    t0 = time.perf_counter()
    body = SetFitModel.from_pretrained(resolve_model(model))
    trainer = Trainer(model=body, args=TrainingArguments(**args),
                      train_dataset=Dataset.from_dict({"text": [t for t, _ in train_rows],
                                                       "label": [index[y] for _, y in train_rows]}))
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    probs = body.predict_proba([t for t, _ in eval_rows], as_numpy=True)
    gold = np.array([index[y] for _, y in eval_rows])
    shutil.rmtree(folder / "setfit", ignore_errors=True)  # its checkpoint: disk, not results
    return {"accuracy": round(float((probs.argmax(-1) == gold).mean()), 4), "ece": round(ece(probs, gold), 4),
            "train_s": round(train_s, 1), "load_s": round(t1 - t0, 1), "default_pairs": default_pairs,
            "setting": {k: v for k, v in args.items() if k != "output_dir"}}


def sample_files(folder: Path, data: dict, k: int, seed: int, tag: str, limit: int | None) -> tuple[dict, list, list, list]:
    train_rows, dev_rows, rest = per_class_sample(data["train"], k, seed, tag)
    eval_rows = eval_sample(data["eval"], limit)
    files = {"train": str(write_csv(folder / "train.csv", train_rows)), "dev": str(write_csv(folder / "dev.csv", dev_rows)),
             "test": str(write_csv(folder / "test.csv", eval_rows))}
    return files, train_rows, eval_rows, rest


def fewshot_unit(folder: Path, data: dict, name: str, k: int, seed: int, side: str, limit: int | None) -> dict:
    box = fresh_folder(folder)
    files, train_rows, eval_rows, _ = sample_files(box, data, k, seed, name, limit)
    if side == "setfit":
        return run_setfit(box, train_rows, eval_rows, data["model"], seed)
    return run_lmtune(box, files, data["model"], seed, **({"fewshot": {"method": "none"}} if side == "plain" else {}))


def self_training_unit(folder: Path, data: dict, name: str, k: int, seed: int, side: str, limit: int | None,
                       n_unlabeled: int) -> dict:
    """The same run (files, seed, defaults) with or without data.unlabeled: a seeded sample of the train rows
    outside the labeled sample, written without their labels."""
    box = fresh_folder(folder)
    files, _, _, rest = sample_files(box, data, k, seed, f"st:{name}", limit)
    if side == "without":
        return run_lmtune(box, files, data["model"], seed)
    pool = random.Random(f"unlabeled:{name}:{seed}").sample(rest, min(n_unlabeled, len(rest)))
    unlabeled = str(write_csv(box / "unlabeled.csv", [(t,) for t, _ in pool], header=("text",)))
    return {**run_lmtune(box, files, data["model"], seed, data={"unlabeled": unlabeled}), "unlabeled_rows": len(pool)}


# ---- phases -----------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    s = seed_summary(values)  # bench/harness.py's: mean and the sample std over seeds (0 for one seed)
    return round(s["mean"], 4), round(s["std"], 4)


def phase_fewshot(work: Path, args) -> tuple[dict, dict]:
    headline, detail = {}, {}
    for name, k in FEWSHOT_ROWS:
        if name not in args.sets or k not in args.sizes:
            continue
        data, row = load_set(name), f"{name}_{k}"
        figures: dict[str, list[dict]] = {side: [] for side in args.sides}
        for seed in args.seeds:
            folder = work / "fewshot" / row / f"seed{seed}"
            for side in args.sides:
                tag = f"fewshot {row} seed {seed} {side}"
                f = unit(folder / f"{side}.json", tag, partial(fewshot_unit, folder / side, data, name, k, seed, side, args.limit))
                figures[side].append(f)
                print(f"{tag}: accuracy {f['accuracy']:.4f}, train {f['train_s']:.1f}s"
                      + (f" ({f['method']})" if f.get("method") else "") + (f" setfit {f['setting']}" if side == "setfit" else ""),
                      flush=True)
        summary = {"examples_per_class": k, "eval_split": data["split"], "model": data["model"], "seeds": len(args.seeds)}
        for side, rows in figures.items():
            acc, std = mean_std([f["accuracy"] for f in rows])
            summary[side] = {"accuracy": acc, "accuracy_std": std, "train_s": round(statistics.fmean(f["train_s"] for f in rows), 1),
                             "ece": round(statistics.fmean(f["ece"] for f in rows), 4),
                             **({"methods": sorted({f["method"] for f in rows})} if side != "setfit" else
                                {"settings": [f["setting"] for f in rows][:1]})}
        headline[row] = {side: summary[side]["accuracy"] for side in SIDES if side in summary}
        headline[row].update({f"{side}_std": summary[side]["accuracy_std"] for side in ("lmtune", "setfit") if side in summary})
        summary["checks"] = fewshot_checks(summary, k)
        detail[row] = summary
        print(f"fewshot {row} ({len(args.seeds)} seeds, {data['split']}): "
              + " | ".join(f"{side} {summary[side]['accuracy']:.4f} ± {summary[side]['accuracy_std']:.4f} "
                           f"in {summary[side]['train_s']:.1f}s" for side in args.sides)
              + (f" | checks {summary['checks']}" if summary["checks"] else ""), flush=True)
    return headline, detail


def fewshot_checks(summary: dict, k: int) -> dict:
    """The issue's acceptance on a row: lmtune >= SetFit's mean; at 8 per class, >= plain + 5 points."""
    checks = {}
    if "lmtune" in summary and "setfit" in summary:
        checks["lmtune_ge_setfit"] = summary["lmtune"]["accuracy"] >= summary["setfit"]["accuracy"]
    if "lmtune" in summary and "plain" in summary and k == 8:
        checks["lmtune_ge_plain_plus_5"] = summary["lmtune"]["accuracy"] >= summary["plain"]["accuracy"] + 0.05
    return checks


def phase_self_training(work: Path, args) -> tuple[dict, dict]:
    headline, detail = {}, {}
    k = args.st_per_class
    for name in SELF_TRAINING_SETS:
        if name not in args.sets:
            continue
        data = load_set(name)
        figures: dict[str, list[dict]] = {"with": [], "without": []}
        for seed in args.seeds:
            folder = work / "self_training" / f"{name}_{k}" / f"seed{seed}"
            for side in figures:
                tag = f"self_training {name}_{k} seed {seed} {side}"
                f = unit(folder / f"{side}.json", tag,
                         partial(self_training_unit, folder / side, data, name, k, seed, side, args.limit, args.unlabeled))
                figures[side].append(f)
                extra = (f", round {f['selftrain']['final_round']} kept, {f['selftrain']['pseudo_labels_kept']} pseudo-labels "
                         f"({f['selftrain']['stop_reason']}); students: {f['selftrain'].get('student_methods')}") \
                    if "selftrain" in f else ""
                print(f"{tag}: accuracy {f['accuracy']:.4f}, ECE {f['ece']:.4f}, {f['wall_s']:.1f}s{extra}", flush=True)
        summary = {"examples_per_class": k, "unlabeled": args.unlabeled, "eval_split": data["split"], "seeds": len(args.seeds)}
        for side, rows in figures.items():
            acc, std = mean_std([f["accuracy"] for f in rows])
            summary[side] = {"accuracy": acc, "accuracy_std": std, "ece": round(statistics.fmean(f["ece"] for f in rows), 4),
                             "wall_s": round(statistics.fmean(f["wall_s"] for f in rows), 1),
                             "methods": sorted({str(f["method"]) for f in rows})}
        summary["with"]["pseudo_labels_kept"] = [f["selftrain"]["pseudo_labels_kept"] for f in figures["with"]]
        summary["with"]["final_round"] = [f["selftrain"]["final_round"] for f in figures["with"]]
        summary["with"]["student_methods"] = sorted({m.split(" ")[0] for f in figures["with"]
                                                     for m in f["selftrain"].get("student_methods", {}).values()})
        summary["checks"] = {"with_ge_without_plus_2": summary["with"]["accuracy"] >= summary["without"]["accuracy"] + 0.02,
                             "ece_no_worse": summary["with"]["ece"] <= summary["without"]["ece"]}
        headline[name] = {"with": summary["with"]["accuracy"], "without": summary["without"]["accuracy"],
                          "ece_with": summary["with"]["ece"], "ece_without": summary["without"]["ece"]}
        detail[name] = summary
        print(f"self_training {name} ({k} per class + {args.unlabeled} unlabeled, {len(args.seeds)} seeds): "
              f"with {summary['with']['accuracy']:.4f} ± {summary['with']['accuracy_std']:.4f} (ECE {summary['with']['ece']:.4f}) | "
              f"without {summary['without']['accuracy']:.4f} ± {summary['without']['accuracy_std']:.4f} "
              f"(ECE {summary['without']['ece']:.4f}) | checks {summary['checks']}", flush=True)
    return headline, detail


ACTIVE_KEYS = ("lmtune_auc", "random_auc", "small_text_auc", "s_per_round")


def phase_active(work: Path, args) -> tuple[dict, dict]:
    if fewshot_active is None:
        print("active: bench/fewshot_active.py is not importable; phase skipped", flush=True)
        return {}, {}
    detail = fewshot_active.phase_active(work, args)
    return {name: {k: figures[k] for k in ACTIVE_KEYS} for name, figures in detail.items()}, detail


# ---- main -------------------------------------------------------------------------------------------------------
def check_settings(work: Path, args) -> None:
    """Units measured under other settings are not mixed in (smoke figures with real ones)."""
    fixed = {"limit": args.limit, "unlabeled": args.unlabeled, "st_per_class": args.st_per_class}
    path = work / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != fixed:
            raise SystemExit(f"{work}: holds units of other settings {saved} (now {fixed}); give another --work")
    write_json(path, fixed)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="folder for the units' figures and runs (resumable); default a temporary one")
    ap.add_argument("--only", default=",".join(PHASES), help="comma-separated phases: fewshot,self_training,active")
    ap.add_argument("--seeds", type=int, default=5, help="seeded samples per row: seeds 0..N-1")
    ap.add_argument("--sets", default="sst2,banking77,chnsenticorp", help="comma-separated sets (smoke runs)")
    ap.add_argument("--sizes", default="8,64", help="comma-separated examples per class of the fewshot rows (smoke runs)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated fewshot sides (smoke runs)")
    ap.add_argument("--limit", type=int, help="a seeded N of each evaluation split (smoke runs; not for reported figures)")
    ap.add_argument("--unlabeled", type=int, default=5000, help="self_training: unlabeled train texts")
    ap.add_argument("--st-per-class", type=int, default=16, help="self_training: labeled examples per class")
    if fewshot_active is not None:
        fewshot_active.add_arguments(ap, prefix="active-")
    args = ap.parse_args()
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"--only: unknown phase {bad[0]!r}; choose from {', '.join(PHASES)}")
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if any(s not in SIDES for s in args.sides):
        ap.error(f"--sides: choose from {', '.join(SIDES)}")
    args.seeds = list(range(args.seeds))
    return args


def main() -> None:
    args = parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, args)
    result, detail = {}, {}
    for phase, run in (("fewshot", phase_fewshot), ("self_training", phase_self_training), ("active", phase_active)):
        if phase in args.phases:
            result[phase], detail[phase] = run(work, args)
    write_json(work / "summary.json", {"settings": {k: v for k, v in vars(args).items() if k != "phases"}, **detail})
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
