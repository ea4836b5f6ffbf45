"""The honest-quality suite's shared pieces (issue 47): the eight bench sets with clean splits, their
metrics, and the statistics every comparison uses.

Splits. `train_dev(name)` returns the training and dev rows of a set and reads only its train (and
official dev) files; where a set has no dev, a dev is carved from train with a fixed seed (SPLIT_SEED),
the same rows for every side and every training seed. `load_test(name)` is the only function that
reads a test split: bench/suite.py calls it once, after every side has trained and every choice (the
peer's learning rate) has been made on dev. tests/test_bench_splits.py checks both.

| set | train | dev | test |
|---|---|---|---|
| sst2 | seeded 4,000 of train.tsv, minus the dev | seeded 10% of that sample | dev.tsv (GLUE's test has no labels) |
| banking77 | train.csv (10,003), minus the dev | seeded 10% of train | test.csv |
| conll2003 | first 4,000 sentences of train.txt | valid.txt | test.txt |
| goemotions | seeded 10,000 of train.tsv | dev.tsv | test.tsv |
| mrpc | msr_paraphrase_train.txt, minus the dev | seeded 10% of train (GLUE's 3,668 / 408) | msr_paraphrase_test.txt |
| stsb | sts-train.csv | sts-dev.csv | sts-test.csv |
| squad | seeded 3,000 questions of 70% of dev-v1.1's articles | 10% of those articles (<= 600 questions) | the other 30% |
| semeval | TRAIN_FILE.TXT, minus the dev | seeded 10% of train | TEST_FILE_FULL.TXT |

SQuAD's train, dev and test come from the one file the project has, split by article (bench/qa.py's
split): the test articles never reach train_dev's rows.

Rows are plain dicts, each with its `source` (file:line or file:id): classification and relation
{text, label}; pairs {text, text_pair, label} (stsb: a float); multilabel {text, labels}; ner {tokens,
tags}; qa {id, question, context, answers: {text, answer_start}}.

Statistics (`summary`, `paired_bootstrap`): mean and sample std over seeds; the difference of the
two sides' seed-mean metric on test with a percentile interval from scipy.stats.bootstrap (paired: the
same resampled test examples for both sides and every seed). Metrics that are sums over examples
(accuracy, F1 from counts, SQuAD F1) resample per-example counts; the others (Spearman, SemEval's
official macro-F1) are recomputed on each resample. A win is a difference whose interval excludes 0.

`python bench/harness.py` prints each set's train / dev sizes (it reads no test file).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

SPLIT_SEED = 42  # the data splits: fixed, whatever the training seeds
DEV_SHARE = 0.1
csv.field_size_limit(10**7)


@dataclass(frozen=True)
class BenchSet:
    """One set of the suite: its task kind (which lmtune task and which HF example recipe), its headline
    metric, and the files its train / dev and its test come from (relative to the shared data root)."""
    name: str
    kind: str  # classification, pairs, regression, multilabel, ner, relation, qa
    metric: str  # a key of METRICS
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    title: str


SETS: dict[str, BenchSet] = {s.name: s for s in (
    BenchSet("sst2", "classification", "accuracy", ("sst2/train.tsv",), ("sst2/dev.tsv",), "SST-2 (4k sample)"),
    BenchSet("banking77", "classification", "accuracy", ("banking77/train.csv",), ("banking77/test.csv",), "banking77"),
    BenchSet("mrpc", "pairs", "accuracy", ("mrpc/msr_paraphrase_train.txt",), ("mrpc/msr_paraphrase_test.txt",), "MRPC"),
    BenchSet("stsb", "regression", "spearman", ("stsb/sts-train.csv", "stsb/sts-dev.csv"), ("stsb/sts-test.csv",), "STS-B"),
    BenchSet("conll2003", "ner", "entity_f1", ("conll2003/train.txt", "conll2003/valid.txt"), ("conll2003/test.txt",),
             "CoNLL-2003 (4k)"),
    BenchSet("goemotions", "multilabel", "macro_f1", ("goemotions/train.tsv", "goemotions/dev.tsv", "goemotions/labels.txt"),
             ("goemotions/test.tsv", "goemotions/labels.txt"), "GoEmotions (10k)"),
    BenchSet("semeval", "relation", "official_macro_f1", ("semeval2010_task8/TRAIN_FILE.TXT",),
             ("semeval2010_task8/TEST_FILE_FULL.TXT",), "SemEval-2010 RE"),
    BenchSet("squad", "qa", "squad_f1", ("squad/dev-v1.1.json",), ("squad/dev-v1.1.json",), "SQuAD (3k train)"),
)}
ORDER = list(SETS)  # the priority order is the table's order

SIZES = {"sst2": 4000, "goemotions": 10000, "conll2003": 4000, "squad": 3000}  # the acceptance's train sizes


# ---------------------------------------------------------------- reading the files (one reader per format)

def _tsv(path: Path, header: bool) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file whose quotes are bare (MRPC, SST-2, STS-B: QUOTE_NONE)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:  # MRPC starts with a BOM
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    start = 2 if header else 1
    return [(start + i, r) for i, r in enumerate(rows[1:] if header else rows)]


def _sst2(path: Path) -> list[dict]:
    return [{"text": r[0].strip(), "label": r[1], "source": f"{path.name}:{n}"} for n, r in _tsv(path, True) if len(r) == 2]


def _banking77(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [{"text": r["text"].strip(), "label": r["category"], "source": f"{path.name}:{i + 2}"}
                for i, r in enumerate(csv.DictReader(fh))]


def _mrpc(path: Path) -> list[dict]:
    return [{"text": r[3], "text_pair": r[4], "label": r[0], "source": f"{path.name}:{n}"}
            for n, r in _tsv(path, True) if len(r) == 5]


def _stsb(path: Path) -> list[dict]:  # 7 or 9 fields: genre, file, year, id, score, s1, s2[, source, source]
    return [{"text": r[5], "text_pair": r[6], "label": float(r[4]), "source": f"{path.name}:{n}"}
            for n, r in _tsv(path, False) if len(r) >= 7]


def _conll(path: Path) -> list[dict]:
    from lmtune.data.ner_readers import read_ner  # lmtune's CoNLL reader (DOCSTART, BIO check), as bench/ner.py
    examples, _ = read_ner(path)
    return [{"tokens": ex.tokens, "tags": ex.tags, "source": ex.source} for ex in examples]


def _goemotions(path: Path, labels_path: Path) -> list[dict]:
    """Headerless TSV: text, comma-separated label ids, comment id; CSV-quoted texts (see the data README)."""
    names = labels_path.read_text(encoding="utf-8").split("\n")
    with open(path, encoding="utf-8", newline="") as fh:
        return [{"text": r[0], "labels": [names[int(i)] for i in r[1].split(",")], "source": f"{path.name}:{r[2]}"}
                for r in csv.reader(fh, delimiter="\t")]


def _semeval(path: Path) -> list[dict]:
    """4-line blocks: id<TAB>"sentence", label, Comment, blank (only the outermost quotes stripped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for k in range(0, len(lines) - 1, 4):
        sent = lines[k].split("\t", 1)[1].strip()
        rows.append({"text": sent[1:-1] if sent.startswith('"') and sent.endswith('"') else sent,
                     "label": lines[k + 1].strip(), "source": f"{path.name}:{k + 1}"})
    return rows


def _squad_articles(path: Path) -> list[list[dict]]:
    out = []
    for art in json.loads(path.read_text(encoding="utf-8"))["data"]:
        out.append([{"id": qa["id"], "question": qa["question"], "context": para["context"], "source": f"{path.name}:{qa['id']}",
                     "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                    for para in art["paragraphs"] for qa in para["qas"] if qa["question"].strip()])
    return out


def _squad_split(arts: list[list[dict]]) -> tuple[list[int], list[int], list[int]]:
    """bench/qa.py's split by article: 30% of the articles test, 10% of the rest dev, the others train."""
    order = list(range(len(arts)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_test = int(0.3 * len(order))
    test, rest = order[:n_test], order[n_test:]
    n_dev = max(1, len(rest) // 10)
    return rest[n_dev:], rest[:n_dev], test


# ---------------------------------------------------------------- splits

def carve_dev(rows: list[dict], share: float = DEV_SHARE, seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """A seeded share of rows as dev, the rest train, both in the file's order: the same split for every
    side and every training seed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = max(1, int(len(rows) * share))
    return [rows[i] for i in sorted(order[k:])], [rows[i] for i in sorted(order[:k])]


def cap(rows: list[dict], limit: int | None) -> list[dict]:
    """A seeded sample of at most `limit` rows in file order (smoke runs; some files are sorted by class)."""
    if not limit or limit >= len(rows):
        return rows
    keep = sorted(random.Random(SPLIT_SEED).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def train_dev(name: str, limit: int | None = None, root: Path = SHARED, full: bool = False) -> tuple[list[dict], list[dict]]:
    """The training and dev rows of a set; reads no test file. `full`: the ceiling's training data (the
    whole train file where the suite samples it: SST-2, CoNLL, GoEmotions, SQuAD's train articles), with
    the same dev. `limit` caps both (smoke runs)."""
    train, dev = _train_dev(name, root, full)
    return cap(train, limit), cap(dev, limit)


def _train_dev(name: str, root: Path, full: bool) -> tuple[list[dict], list[dict]]:
    if name == "sst2":
        rows = _sst2(root / "sst2" / "train.tsv")
        sample = random.Random(SPLIT_SEED).sample(rows, min(SIZES["sst2"], len(rows)))  # bench/classification.py's sample
        train, dev = carve_dev(sample)
        if full:  # every other train sentence joins the sample's train; the dev stays the same
            held = {r["source"] for r in dev}
            train = [r for r in rows if r["source"] not in held]
        return train, dev
    if name == "banking77":
        return carve_dev(_banking77(root / "banking77" / "train.csv"))
    if name == "mrpc":
        return carve_dev(_mrpc(root / "mrpc" / "msr_paraphrase_train.txt"))
    if name == "stsb":
        return _stsb(root / "stsb" / "sts-train.csv"), _stsb(root / "stsb" / "sts-dev.csv")
    if name == "conll2003":
        train = _conll(root / "conll2003" / "train.txt")
        return (train if full else train[:SIZES["conll2003"]]), _conll(root / "conll2003" / "valid.txt")
    if name == "goemotions":
        folder = root / "goemotions"
        train = _goemotions(folder / "train.tsv", folder / "labels.txt")
        if not full:
            train = random.Random(SPLIT_SEED).sample(train, min(SIZES["goemotions"], len(train)))  # bench/multilabel.py's
        return train, _goemotions(folder / "dev.tsv", folder / "labels.txt")
    if name == "semeval":
        return carve_dev(_semeval(root / "semeval2010_task8" / "TRAIN_FILE.TXT"))
    if name == "squad":
        arts = _squad_articles(root / "squad" / "dev-v1.1.json")
        train_arts, dev_arts, _ = _squad_split(arts)
        train = [q for i in train_arts for q in arts[i]]
        dev = [q for i in dev_arts for q in arts[i]]
        if not full and SIZES["squad"] < len(train):
            train = random.Random(SPLIT_SEED).sample(train, SIZES["squad"])
        return train, random.Random(SPLIT_SEED).sample(dev, min(600, len(dev)))
    raise KeyError(f"unknown set {name!r}; sets: {', '.join(SETS)}")


def load_test(name: str, limit: int | None = None, root: Path = SHARED) -> list[dict]:
    """The test rows of a set: the final evaluation's only reader of a test split."""
    if name == "sst2":
        rows = _sst2(root / "sst2" / "dev.tsv")
    elif name == "banking77":
        rows = _banking77(root / "banking77" / "test.csv")
    elif name == "mrpc":
        rows = _mrpc(root / "mrpc" / "msr_paraphrase_test.txt")
    elif name == "stsb":
        rows = _stsb(root / "stsb" / "sts-test.csv")
    elif name == "conll2003":
        rows = _conll(root / "conll2003" / "test.txt")
    elif name == "goemotions":
        rows = _goemotions(root / "goemotions" / "test.tsv", root / "goemotions" / "labels.txt")
    elif name == "semeval":
        rows = _semeval(root / "semeval2010_task8" / "TEST_FILE_FULL.TXT")
    elif name == "squad":
        arts = _squad_articles(root / "squad" / "dev-v1.1.json")
        rows = [q for i in _squad_split(arts)[2] for q in arts[i]]
    else:
        raise KeyError(f"unknown set {name!r}; sets: {', '.join(SETS)}")
    return cap(rows, limit)


def gold(name: str, rows: list[dict]) -> list:
    """What a side's predictions are scored against: a label, a float, a label list, a tag list, or a
    question's answer texts."""
    kind = SETS[name].kind
    if kind == "multilabel":
        return [r["labels"] for r in rows]
    if kind == "ner":
        return [r["tags"] for r in rows]
    if kind == "qa":
        return [r["answers"]["text"] for r in rows]
    return [r["label"] for r in rows]


# ---------------------------------------------------------------- metrics (one scorer for every side)

@dataclass(frozen=True)
class Metric:
    """A headline metric. `counts` (per example, summed over any resample) and `from_counts` when the metric
    is a function of summed per-example counts; `score` recomputes it from gold and predictions otherwise."""
    name: str
    score: Callable[[list, list, dict], float]
    counts: Callable[[list, list, dict], np.ndarray] | None = None
    from_counts: Callable[[np.ndarray], np.ndarray] | None = None


def _accuracy_counts(g: list, p: list, _: dict) -> np.ndarray:
    return np.array([[float(a == b), 1.0] for a, b in zip(g, p)])


def _ratio(c: np.ndarray) -> np.ndarray:
    return c[..., 0] / np.maximum(c[..., 1], 1e-12)


def _multilabel_counts(g: list, p: list, ctx: dict) -> np.ndarray:
    """Per example and label: true positive, false positive, false negative (flattened label-major)."""
    labels = ctx["labels"]
    gold_hot = np.array([[lab in set(x) for lab in labels] for x in g])
    pred_hot = np.array([[lab in set(x) for lab in labels] for x in p])
    tp, fp, fn = gold_hot & pred_hot, ~gold_hot & pred_hot, gold_hot & ~pred_hot
    return np.concatenate([tp, fp, fn], axis=1).astype(float)


def _macro_f1(c: np.ndarray) -> np.ndarray:
    # sklearn's f1_score(average="macro", zero_division=0) over every label of train
    tp, fp, fn = np.split(c, 3, axis=-1)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0).mean(-1)


def _entity_counts(g: list, p: list, _: dict) -> np.ndarray:
    """Per sentence: correct entities, predicted entities, gold entities, extracted by seqeval's strict
    IOB2 reading (so the summed F1 is seqeval.metrics.f1_score(mode="strict", scheme=IOB2))."""
    from seqeval.scheme import IOB2, Entities

    def ents(tags: list[str]) -> set:
        return {(e.start, e.end, e.tag) for e in Entities([tags], IOB2).entities[0]}
    rows = []
    for a, b in zip(g, p):
        ga, pb = ents(a), ents(b)
        rows.append([len(ga & pb), len(pb), len(ga)])
    return np.array(rows, dtype=float)


def _entity_f1(c: np.ndarray) -> np.ndarray:
    return 2 * c[..., 0] / np.maximum(c[..., 1] + c[..., 2], 1e-12)


def _squad_counts(g: list, p: list, ctx: dict) -> np.ndarray:
    from lmtune.tasks.qa import em_f1  # SQuAD v1.1's normalization and token F1, as bench/qa.py scores both sides
    return np.array([[em_f1(b or "", a, False)[1], 1.0] for a, b in zip(g, p)])


def _spearman(g: list, p: list, _: dict) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(np.asarray(p, float), np.asarray(g, float)).statistic)


def _official(g: list, p: list, ctx: dict) -> float:
    from lmtune.tasks.relation import official_scores  # the SemEval-2010 Task 8 scorer's macro-F1 (bench/relation.py)
    return float(official_scores(list(g), list(p), "Other")["official_macro_f1"])


def _from(counts: Callable, reduce: Callable) -> Callable[[list, list, dict], float]:
    return lambda g, p, ctx: float(reduce(counts(g, p, ctx).sum(0)))


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _from(_accuracy_counts, _ratio), _accuracy_counts, _ratio),
    "macro_f1": Metric("macro-F1", _from(_multilabel_counts, _macro_f1), _multilabel_counts, _macro_f1),
    "entity_f1": Metric("entity F1", _from(_entity_counts, _entity_f1), _entity_counts, _entity_f1),
    "squad_f1": Metric("F1", _from(_squad_counts, _ratio), _squad_counts, _ratio),
    "spearman": Metric("Spearman", _spearman),
    "official_macro_f1": Metric("official macro-F1", _official),
}


def score(name: str, gold_values: list, pred: list, ctx: dict | None = None) -> float:
    """The set's headline metric of predictions against gold (the same scorer for every side)."""
    return METRICS[SETS[name].metric].score(gold_values, pred, ctx or {})


# ---------------------------------------------------------------- statistics

def summary(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed) over seeds."""
    arr = np.asarray(values, float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def paired_bootstrap(metric: Metric, gold_values: list, preds_a: list[list], preds_b: list[list], ctx: dict | None = None,
                     n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Difference of seed-mean metrics, side a minus side b, on the test set, with its percentile interval
    from scipy.stats.bootstrap over the test examples (paired: one resample of examples serves both sides
    and all their seeds). preds_a / preds_b: one prediction list per seed. A win: the interval excludes 0."""
    from scipy.stats import bootstrap
    ctx = ctx or {}
    n = len(gold_values)
    index = np.arange(n)
    if metric.counts is not None:  # sums of per-example counts: every resample is one matrix product
        counts_a = [metric.counts(gold_values, p, ctx) for p in preds_a]
        counts_b = [metric.counts(gold_values, p, ctx) for p in preds_b]

        def side(counts: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
            return np.mean([metric.from_counts(weights @ c) for c in counts], axis=0)

        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            flat = idx.reshape(-1, n)
            weights = np.zeros(flat.shape)
            np.add.at(weights, (np.arange(len(flat))[:, None], flat), 1.0)  # how often each example was drawn
            return (side(counts_a, weights) - side(counts_b, weights)).reshape(idx.shape[:-1])
        vectorized = True
    else:
        def statistic(idx: np.ndarray) -> float:
            g = [gold_values[i] for i in idx]
            return (np.mean([metric.score(g, [p[i] for i in idx], ctx) for p in preds_a])
                    - np.mean([metric.score(g, [p[i] for i in idx], ctx) for p in preds_b]))
        vectorized = False
    observed = (np.mean([metric.score(gold_values, p, ctx) for p in preds_a])
                - np.mean([metric.score(gold_values, p, ctx) for p in preds_b]))
    res = bootstrap((index,), statistic, paired=True, vectorized=vectorized, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed),
                    **({"batch": 50} if vectorized else {}))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"diff": float(observed), "low": low, "high": high, "confidence": confidence, "n_resamples": n_resamples,
            "n_examples": n, "win": bool(low > 0), "loss": bool(high < 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated sets")
    ns = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED}")
    for name in ns.only.split(","):
        train, dev = train_dev(name)
        print(f"{name}: {len(train)} train, {len(dev)} dev ({SETS[name].kind}, {METRICS[SETS[name].metric].name})", flush=True)


if __name__ == "__main__":
    main()


def write_csv(path: Path, rows: list[tuple], header: tuple = ("text", "label")) -> Path:
    """A CSV of rows under header, written whole then renamed (a stopped bench leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)
    return path


def answer_span(seq_ids: list, offsets: list, start: int, end: int) -> tuple[int, int]:
    """run_qa's prepare_train_features for one window: the first and last token of the answer's characters
    [start, end), or (0, 0) (the CLS token) where the window's context does not hold the whole answer."""
    ctx = [i for i, x in enumerate(seq_ids) if x == 1]
    if not ctx or offsets[ctx[0]][0] > start or offsets[ctx[-1]][1] < end:
        return 0, 0
    return next(i for i in ctx if offsets[i][1] > start), next(i for i in reversed(ctx) if offsets[i][0] < end)


def code_version() -> dict:
    """The commit the bench runs at, whether the tree has uncommitted changes, and the date: a kept unit carries it,
    so figures kept in the repo (bench/results/units/) say which code made them when the key's settings match."""
    import datetime
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            # uncommitted changes to the code, not to results (a bench writes its own units and results files)
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def kept_unit(path: Path | None, tag: str, make: Callable[[], dict]) -> dict:
    """One unit of a resumable bench (a side, seed, set ...): its figures read back from `path` when an earlier
    run finished it, else made now, timed (wall_s), stamped with the code that made it (made_at: code_version)
    and written whole (lmtune.io.write_json: temp + rename, so a stopped run never leaves half a unit). path
    None: nothing is kept."""
    import time

    from lmtune.io import write_json
    if path is not None and path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        made = kept.get("made_at", {})
        print(f"{tag}: kept from {path} (made at commit {made.get('commit', 'unknown')}"
              f"{', uncommitted changes' if made.get('dirty') else ''})", file=sys.stderr, flush=True)
        return kept
    made_at = code_version()  # before the work: what the code was when it started
    t0 = time.perf_counter()
    out = make()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["made_at"] = made_at
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, out)
    return out
