"""Distillation (`lmtune distill`) of a 5-fold cv ensemble into one model, and of a full model into a
3-layer truncation of it (issue 49).

Data: ../shared/data/banking77 (CSV text,category; 77 intents; 10,003 train / 3,080 test). Per seed, a
seeded half of train (5,003 rows) is the labeled sample and the other 5,000 train texts, labels removed,
are the unlabeled data (banking77 train texts not in the sample). lmtune's dev split is a seeded 10% of
the sample (lmtune's own split); test is banking77's test file and chooses nothing.

Backbone: the packaged MiniLM (all-MiniLM-L6-v2, 6 layers), CPU, lmtune's defaults for every run but one:
fine-tuning, not the few-shot path (fewshot.method none). A fold trains on 4,002 texts, 52 per class, which
lmtune's auto rule (median class <= 64) sends to SetFit: 160,000 contrastive pairs a fold, about 35 minutes on
2 cores, so one seed (5 folds and 4 student runs) took about 3 hours. Distillation is the question here, and
the issue's teacher is a cv ensemble of fine-tuned MiniLMs; the few-shot path is measured in bench/fewshot.py.
- teacher: `lmtune cv --folds 5` on the sample: 5 MiniLM runs, their ensemble (averaged calibrated
  probabilities) is the teacher.
- student: one MiniLM, `lmtune distill TEACHER --student MiniLM --unlabeled FILE` (the teacher's soft
  targets on the sample's train split and the 5,000 unlabeled texts; T 2, alpha 0.5, the defaults);
  hard_only: the same student trained on the hard labels alone (distill's own comparison run).
- cross-architecture: teacher one full MiniLM run on the sample (fold 1 of the cv), student its first
  3 encoder layers (`--student-layers 3`), with its hard-only comparison.
A seed costs about 45 minutes on 2 cores; --runs DIR keeps its run folders so that a stopped seed resumes
(its finished cv folds and students kept) in a later session on the same machine.
cost_ratio: the student's inference seconds per 1000 test texts over the teacher's (tokenising and the
forward pass, measured by distill in the same process, one after the other).

Accuracy on banking77's test file; means over --seeds seeds (default 3) with their standard deviation.

Last line JSON: {"distill": {"teacher_acc": A, "student_acc": A, "hard_only_acc": A, "cost_ratio": R, ...},
"cross_architecture": {"teacher_acc": A, "student_acc": A, "hard_only_acc": A, "teacher_texts_per_s": T,
"student_texts_per_s": T}}, each a mean over the seeds ("<figure>_std" beside it).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from harness import kept_unit  # noqa: E402  (bench/harness.py, the benches' shared helpers)
from lmtune.config import DEFAULT_MODEL, build_config  # noqa: E402
from lmtune.distill import distill  # noqa: E402
from lmtune.search.combine import cv  # noqa: E402

LABELED = 5003


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict], fields: tuple[str, ...]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def sample(work: Path, seed: int, limit: int | None) -> dict:
    rows = read_csv(SHARED / "banking77" / "train.csv")
    random.Random(seed).shuffle(rows)
    labeled, unlabeled = rows[:LABELED], rows[LABELED:]
    test = read_csv(SHARED / "banking77" / "test.csv")
    if limit:  # a seeded sample of test: its file is sorted by category, so its first rows are a few classes
        labeled, unlabeled = labeled[:limit], unlabeled[:limit]
        seen = {r["category"] for r in labeled}  # a small sample lacks some intents: test only the ones it has
        known = [r for r in test if r["category"] in seen]
        test = random.Random(seed).sample(known, min(limit, len(known)))
    return {"train": write_csv(work / "sample.csv", labeled, ("text", "category")),
            "unlabeled": write_csv(work / "unlabeled.csv", unlabeled, ("text",)),
            "test": write_csv(work / "test.csv", test, ("text", "category"))}


def config(work: Path, files: dict, seed: int, name: str) -> dict:
    return {"task": "classification", "output_dir": str(work / "runs"), "run_name": name, "model": {"name": DEFAULT_MODEL},
            "data": {"train": files["train"], "test": files["test"], "label_column": "category"},
            "train": {"seed": seed, "progress": "none"}, "fewshot": {"method": "none"}}  # fine-tuning: see the docstring


def accuracy(part: dict, metric: str) -> float:
    return float(part[metric])


def distilled(work: Path, name: str, teacher: str, files: dict, **options) -> dict:
    """`lmtune distill` into work/runs/NAME, or its section read back from the run's results.json when a
    resumed bench (--runs) finished it before; a student stopped half-way is trained again (distill has no
    resume)."""
    root = work / "runs" / name
    done = root / "results.json"
    if done.is_file() and "distill" in json.loads(done.read_text(encoding="utf-8")):
        print(f"{name}: kept from {root}", file=sys.stderr, flush=True)
        return json.loads(done.read_text(encoding="utf-8"))["distill"]
    shutil.rmtree(root, ignore_errors=True)
    return distill(teacher, student=DEFAULT_MODEL, unlabeled=files["unlabeled"],
                   overrides={"output_dir": str(work / "runs"), "run_name": name}, **options)


def one_seed(work: Path, seed: int, limit: int | None) -> dict:
    files = sample(work, seed, limit)
    # resume: with --runs, a cv stopped in an earlier session keeps its finished folds (lmtune cv --resume)
    result = cv(build_config(config(work, files, seed, "cv")), 5, resume=(work / "runs" / "cv" / "cv_plan.json").is_file())
    ensemble_dir = result["ensemble"]["run_dir"]
    d = distilled(work, "student", ensemble_dir, files)
    m = d["metric"]
    out = {"distill": {"teacher_acc": accuracy(d["teacher"], m), "student_acc": accuracy(d["student"], m),
                       "hard_only_acc": accuracy(d["hard_only"], m), "cost_ratio": d["cost_ratio"]}}
    fold1 = result["folds"][0]["run_dir"]
    x = distilled(work, "student-3-layers", fold1, files, student_layers=3)
    out["cross_architecture"] = {"teacher_acc": accuracy(x["teacher"], m), "student_acc": accuracy(x["student"], m),
                                 "hard_only_acc": accuracy(x["hard_only"], m),
                                 "teacher_texts_per_s": 1000 / x["teacher"]["seconds_per_1000"],
                                 "student_texts_per_s": 1000 / x["student"]["seconds_per_1000"],
                                 "cost_ratio": x["cost_ratio"]}
    return out


def mean_std(rows: list[dict]) -> dict:
    out: dict = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        out[k], out[f"{k}_std"] = round(statistics.fmean(values), 4), round(statistics.pstdev(values), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--limit", type=int, help="first N rows of each file (a quick check, not the bench)")
    ap.add_argument("--work", type=Path, help="keep each seed's figures here as JSON: a stopped run resumes at the first "
                                                "seed it had not finished (without it, nothing is kept)")
    ap.add_argument("--runs", type=Path, help="keep each seed's run folders here (about 1 GB a seed, so not in the "
                                                "repo): a seed stopped part-way resumes its cv and keeps its finished "
                                                "students; the folder of a finished seed is removed")
    ns = ap.parse_args()
    per_seed = []
    for seed in range(42, 42 + ns.seeds):
        def run(seed: int = seed) -> dict:  # in a temporary folder unless --runs: only the figures are kept
            if ns.runs is None:
                with tempfile.TemporaryDirectory() as tmp:
                    return one_seed(Path(tmp), seed, ns.limit)
            work = ns.runs / f"l{ns.limit or 'all'}-s{seed}"
            work.mkdir(parents=True, exist_ok=True)
            got = one_seed(work, seed, ns.limit)
            shutil.rmtree(work, ignore_errors=True)  # the figures are kept (kept_unit): the runs are not needed again
            return got
        got = kept_unit(ns.work / f"distill-l{ns.limit or 'all'}-s{seed}.json" if ns.work else None, f"seed {seed}", run)
        print(f"seed {seed}: {json.dumps(got)}", file=sys.stderr, flush=True)
        per_seed.append(got)
    result = {part: mean_std([r[part] for r in per_seed]) for part in ("distill", "cross_architecture")}
    d = result["distill"]
    print(f"student keeps {d['student_acc'] / d['teacher_acc']:.2%} of the ensemble's accuracy at {d['cost_ratio']:.3f} of "
          f"its inference cost; hard labels alone {d['hard_only_acc']:.4f}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
