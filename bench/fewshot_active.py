"""Active learning, simulated with gold labels as the oracle (issue 48): lmtune's default query strategy vs random
sampling vs small-text 1.4's uncertainty strategies, same backbone, same retraining, CPU, one process.

Data (read from ../shared/data, never copied into the repo; the files below are written under --work):
SST-2 (bench/classification.py's seeded 4,000-sentence train sample, evaluated on the full dev set, as the other
benches do: SST-2 has no labeled test) and banking77 (its 10,003-row train, evaluated on its 3,080-row test).
Texts are de-duplicated (first label kept), so a pool row never repeats a labeled text.

Per seed (5 by default, the same for every strategy):
- the first 100 labels: a seeded stratified random sample, drawn by small-text's own
  `random_initialization_stratified` (how small-text's experiments start). Stratified rather than uniform because a
  uniform 100 of banking77's 77 classes misses about 20 classes, which lmtune's loop (`label --import`) rightly
  refuses to add later (a new class needs a retrain on it, not an import) and the test set would count as errors
  for every strategy alike;
- dev: a seeded 20 of those 100 (about lmtune's own dev share of a train file, 0.18 / 0.88), taken only from
  classes that keep another labeled row. Written as data.dev because lmtune's own split of 100 labels gives
  banking77 no dev row at all (77 classes with one or two rows each); the 20 count as labels on the x axis and
  stay the loop's dev, as `label --import` keeps a run's dev;
- pool: the rest of the train rows (SST-2: of the 4,000 sample); --pool N takes a seeded N of them (smoke runs);
- 10 rounds of 50: each strategy picks 50 pool rows, their gold labels are written as a labeled batch file and
  `lmtune.active.import_labeled` grows the train file and retrains (an ordinary lmtune run with lmtune's defaults:
  the same config, so the same retraining budget, for every strategy); accuracy on the test split after each round
  (the retrained run's own test figures; the test split is never used to pick or tune anything).

Strategies (one chain of run directories each):
- lmtune: `lmtune label`'s default strategy (read from the command's signature) through `lmtune.active.query`,
  the path a user's `lmtune label RUN --pool FILE` takes;
- random: lmtune's `random` strategy (a seeded sample per round), the same path;
- small-text's PredictionEntropy, LeastConfidence and BreakingTies: small-text's own query strategy classes, each
  given the same retrained run's calibrated class probabilities of the same candidate rows (lmtune's run wrapped as
  a small-text Classifier); "small_text_auc" is the best of the three means.
The 100-label starting run is trained once per (set, seed) and copied into every strategy's chain, so every curve
starts from the same model. lmtune's default today, entropy, ranks the same candidates by the same entropy of the same
probabilities as PredictionEntropy, so those two chains pick the same rows (a tie broken otherwise aside) and their
curves coincide.

Figures: area under the accuracy-vs-labels curve (trapezoid from 100 to 600 labels, divided by the x range:
0-100, the mean accuracy in points), mean over seeds (and std); seconds per round (the query plus the import and
retrain), mean over rounds and seeds.

Resumable: each (set, strategy, seed, round) is one JSON file under --work (its picks are written first, so a
stopped round repeats the same picks); a re-run continues after the last finished round. A finished round's parent
run keeps its files but not its model weights and checkpoints (a MiniLM run with its last checkpoint is ~350 MB, 550
of them ~190 GB; nothing reads a parent's weights once its child is trained), nor does a finished chain's last run.

Prints one line per round; the last line is JSON:
{"sst2": {"lmtune_auc": A, "random_auc": A, "small_text_auc": A, "s_per_round": S, "lmtune_strategy": NAME,
"small_text_best": NAME, "strategies": {NAME: {"auc": A, "auc_std": S, "labels": [...], "accuracy": [...],
"s_per_round": S, "query_s": S, "seeds": N}}}, "banking77": {...}}
Usage: python bench/fewshot_active.py [--work DIR] [--seeds 5] [--rounds 10] [--batch 50] [--initial 100]
       [--pool N] [--test N] [--only sst2,banking77]
Smoke: python bench/fewshot_active.py --work /tmp/al --seeds 1 --rounds 2 --batch 10 --pool 300 --test 200
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classification import SHARED, load_rows  # noqa: E402  (the benches' SST-2 sample and banking77 files)
from harness import write_csv  # noqa: E402  (bench/harness.py, the benches' shared helpers)

SETS = ("sst2", "banking77")
SEED = 42
DEV_SHARE = 0.2
SMALL_TEXT = {"st_entropy": "PredictionEntropy", "st_least_confidence": "LeastConfidence",
              "st_breaking_ties": "BreakingTies"}


def default_strategy() -> str:
    """`lmtune label`'s default --strategy: the strategy a user gets (read from the command, so it follows it)."""
    from lmtune.cli import cmd_label
    return inspect.signature(cmd_label).parameters["strategy"].default


def sides() -> dict[str, tuple[str, str]]:
    """strategy name -> (who picks: lmtune or small-text, the strategy's own name)."""
    return {"lmtune": ("lmtune", default_strategy()), "random": ("lmtune", "random"),
            **{k: ("small-text", v) for k, v in SMALL_TEXT.items()}}


# ---- data -------------------------------------------------------------------------------------
def unique(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One row per text (the first label kept): lmtune's loop never asks about a text it was trained on, so a
    duplicate would be a pool row no strategy could pick."""
    seen: dict[str, str] = {}
    for text, label in rows:
        if text:
            seen.setdefault(text, label)
    return list(seen.items())


def first_labels(rows: list[tuple[str, str]], n: int, seed: int) -> list[int]:
    """small-text's seeded stratified initial sample (it draws from numpy's global generator, hence the seed)."""
    from small_text.initialization import random_initialization_stratified
    labels = sorted({y for _, y in rows})
    index = {y: i for i, y in enumerate(labels)}
    np.random.seed(seed)
    return [int(i) for i in random_initialization_stratified(np.array([index[y] for _, y in rows]), n_samples=n)]


def dev_rows(rows: list[tuple[str, str]], chosen: list[int], seed: int) -> set[int]:
    """A seeded DEV_SHARE of the first labels, from classes that keep at least one training row."""
    left: dict[str, int] = {}
    for i in chosen:
        left[rows[i][1]] = left.get(rows[i][1], 0) + 1
    dev: set[int] = set()
    for i in np.random.default_rng(seed).permutation(chosen):
        if len(dev) >= round(DEV_SHARE * len(chosen)):
            break
        if left[rows[i][1]] > 1:
            left[rows[i][1]] -= 1
            dev.add(int(i))
    return dev


def set_files(work: Path, name: str, seed: int, cfg: dict) -> dict:
    """The seed's files: first labels (train), dev, pool (text only) and its gold labels; the set's test file."""
    train, dev, evalset = load_rows(name, None)
    train = train + dev  # the whole sample: this bench carves its own first labels, dev and pool from it
    train = unique(train)
    test = evalset if not cfg["test"] else random.Random(SEED).sample(evalset, min(cfg["test"], len(evalset)))
    folder = work / name / f"seed{seed}"
    chosen = first_labels(train, cfg["initial"], seed)
    dev = dev_rows(train, chosen, seed)
    taken = set(chosen)
    pool = [r for i, r in enumerate(train) if i not in taken]
    if cfg["pool"]:
        pool = random.Random(seed).sample(pool, min(cfg["pool"], len(pool)))
    return {"train": write_csv(folder / "labeled0.csv", [train[i] for i in chosen if i not in dev]),
            "dev": write_csv(folder / "dev.csv", [train[i] for i in chosen if i in dev]),
            "pool": write_csv(folder / "pool.csv", [(t,) for t, _ in pool], header=("text",)),
            "gold": dict(pool), "test": write_csv(work / name / "test.csv", test),
            "first": [train[i][0] for i in chosen]}


# ---- small-text's strategies on lmtune's run ------------------------------------------------------
def run_classifier(run):
    """lmtune's retrained run as a small-text Classifier. small-text's query strategies read a classifier's
    predict_proba; this one gives the run's calibrated class probabilities, computed as `lmtune label` computes
    them for its own strategies, so both sides rank the same numbers. fit is never called: every strategy is
    retrained by lmtune (`label --import`), which is what keeps the retraining budget the same."""
    from small_text.classifiers import Classifier

    class RunClassifier(Classifier):
        def fit(self, train_set, weights=None):
            raise NotImplementedError("the benchmark retrains through lmtune for every strategy")

        def predict_proba(self, data_set) -> np.ndarray:
            examples = run.task.from_texts(list(data_set.x))
            enc = run.encode(examples)
            return run.task.label_scores(run.outputs(enc), enc, run.labels).probs

        def predict(self, data_set, return_proba=False):
            proba = self.predict_proba(data_set)
            return (proba.argmax(1), proba) if return_proba else proba.argmax(1)

    return RunClassifier()


def small_text_picks(run_dir: Path, strategy: str, candidates: list[str], n: int) -> list[str]:
    """The n candidates small-text's strategy picks, given the run as its classifier."""
    from small_text import query_strategies
    from small_text.base import LABEL_UNLABELED
    from small_text.data import TextDataset

    from lmtune import load
    run = load(run_dir)
    run.config.train.progress = "none"
    with warnings.catch_warnings():  # small-text 1.4's own TextDataset calls its deprecated label helper: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = TextDataset(candidates, np.full(len(candidates), LABEL_UNLABELED), target_labels=np.arange(len(run.labels)))
    picked = getattr(query_strategies, strategy)().query(run_classifier(run), dataset, np.arange(len(candidates)),
                                                         np.array([], dtype=int), np.array([], dtype=int), n=n)
    return [candidates[i] for i in picked]


# ---- one strategy's chain of runs -----------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.replace(path)


def test_accuracy(run_dir: str | Path) -> float:
    from lmtune.artifacts import RunDir
    return float(RunDir(run_dir).read_metrics()["test"]["accuracy"])


def drop_weights(run_dir: str | Path) -> None:
    """A finished parent's model weights (its child is trained; nothing reads them again): disk, not results."""
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.onnx"):
        for f in Path(run_dir).rglob(pattern):
            f.unlink()


def first_run(folder: Path, files: dict, seed: int, sets: dict) -> dict:
    """The 100-label run every strategy starts from (lmtune's defaults, with --set's overrides, which every
    retrain inherits through the run's config; the test file is only evaluated)."""
    from lmtune import train
    done = read_json(folder / "round-0.json")
    if done:
        return done
    cfg = {"output_dir": str(folder / "runs"), "run_name": "start",
           "data": {"train": str(files["train"]), "dev": str(files["dev"]), "test": str(files["test"]), "max_length": 128},
           "train": {"seed": seed, "progress": "none"}}
    t0 = time.perf_counter()
    run = train(cfg, overrides=sets)
    out = {"round": 0, "labels": len(files["first"]), "accuracy": test_accuracy(run.run_dir),
           "train_s": round(time.perf_counter() - t0, 1), "run_dir": str(Path(run.run_dir).resolve())}
    write_json(folder / "round-0.json", out)
    return out


def chain_start(chain: Path, start: dict) -> dict:
    """The strategy's copy of the starting run: each chain keeps its own labeling record (active.json) in its
    runs, so strategies never see each other's batches."""
    done = read_json(chain / "round-0.json")
    if done:
        return done
    target = chain / "runs" / Path(start["run_dir"]).name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(start["run_dir"], target)
    out = {**start, "run_dir": str(target.resolve())}
    write_json(chain / "round-0.json", out)
    return out


def one_round(chain: Path, files: dict, side: tuple[str, str], prev: dict, r: int, batch: int, seed: int,
              labeled: set[str]) -> dict:
    from lmtune import active
    who, strategy = side
    picks_file = chain / f"picks-{r}.json"
    picks = read_json(picks_file)
    if picks is None:
        t0 = time.perf_counter()
        if who == "lmtune":
            rec = active.query(prev["run_dir"], files["pool"], batch, strategy, "csv", seed=seed * 1000 + r)
            texts = [row["text"] for row in rec["rows"]]
        else:
            candidates = [t for t in files["gold"] if t not in labeled]
            texts = small_text_picks(Path(prev["run_dir"]), strategy, candidates, min(batch, len(candidates)))
        picks = {"texts": texts, "query_s": round(time.perf_counter() - t0, 2)}
        write_json(picks_file, picks)
    labels_file = write_csv(chain / f"labels-{r}.csv", [(t, files["gold"][t]) for t in picks["texts"]])
    t0 = time.perf_counter()
    rec = active.import_labeled(prev["run_dir"], labels_file)
    retrain_s = time.perf_counter() - t0
    out = {"round": r, "labels": prev["labels"] + len(picks["texts"]), "accuracy": test_accuracy(rec["run_dir"]),
           "query_s": picks["query_s"], "retrain_s": round(retrain_s, 1),
           "seconds": round(picks["query_s"] + retrain_s, 1), "run_dir": rec["run_dir"]}
    write_json(chain / f"round-{r}.json", out)
    return out


def run_chain(chain: Path, files: dict, side: tuple[str, str], start: dict, cfg: dict, seed: int, tag: str) -> list[dict]:
    chain.mkdir(parents=True, exist_ok=True)
    rounds = [chain_start(chain, start)]
    labeled = set(files["first"])
    for r in range(1, cfg["rounds"] + 1):
        done = read_json(chain / f"round-{r}.json")
        if done is None:
            done = one_round(chain, files, side, rounds[-1], r, cfg["batch"], seed, labeled)
            print(f"{tag} round {r}: {done['labels']} labels, accuracy {done['accuracy']:.4f}, "
                  f"{done['seconds']:.1f}s (query {done['query_s']:.1f}s)", flush=True)
            drop_weights(rounds[-1]["run_dir"])
        labeled |= set((read_json(chain / f"picks-{r}.json") or {"texts": []})["texts"])
        rounds.append(done)
    drop_weights(rounds[-1]["run_dir"])  # the chain is done: its figures are in the round files
    return rounds


# ---- figures ----------------------------------------------------------------------------------------
def auc(rounds: list[dict]) -> float:
    """Area under accuracy (points) vs labels, trapezoid, divided by the labels' range: 0-100."""
    x = np.array([p["labels"] for p in rounds], dtype=float)
    y = 100 * np.array([p["accuracy"] for p in rounds])
    return float(np.trapezoid(y, x) / (x[-1] - x[0])) if x[-1] > x[0] else float(y[0])


def summarize(chains: dict[str, list[list[dict]]]) -> dict:
    """Per strategy: AUC mean and std over seeds, the mean curve, seconds per round."""
    out = {}
    for name, seeds in chains.items():
        aucs = [auc(rounds) for rounds in seeds]
        later = [p for rounds in seeds for p in rounds[1:]]
        out[name] = {"auc": round(float(np.mean(aucs)), 2), "auc_std": round(float(np.std(aucs)), 2),
                     "labels": [p["labels"] for p in seeds[0]],
                     "accuracy": [round(float(np.mean([rounds[k]["accuracy"] for rounds in seeds])), 4)
                                  for k in range(len(seeds[0]))],
                     "s_per_round": round(float(np.mean([p["seconds"] for p in later])), 1) if later else None,
                     "query_s": round(float(np.mean([p["query_s"] for p in later])), 2) if later else None,
                     "seeds": len(seeds)}
    return out


def headline(detail: dict) -> dict:
    best = max(SMALL_TEXT, key=lambda k: detail[k]["auc"])
    return {"lmtune_auc": detail["lmtune"]["auc"], "random_auc": detail["random"]["auc"],
            "small_text_auc": detail[best]["auc"], "s_per_round": detail["lmtune"]["s_per_round"],
            "lmtune_strategy": default_strategy(), "small_text_best": SMALL_TEXT[best], "strategies": detail}


# ---- the phase --------------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """The phase's options (bench/fewshot.py adds them with prefix "active-"; --seeds is shared)."""
    p = f"--{prefix}"
    ap.add_argument(f"{p}rounds", type=int, default=10, help="labeling rounds after the first labels")
    ap.add_argument(f"{p}batch", type=int, default=50, help="rows labeled per round")
    ap.add_argument(f"{p}initial", type=int, default=100, help="first labels (seeded, stratified)")
    ap.add_argument(f"{p}pool", type=int, help="a seeded sample of the pool (smoke runs; not for reported figures)")
    ap.add_argument(f"{p}test", type=int, help="a seeded sample of the test split (smoke runs)")
    ap.add_argument(f"{p}sets", default=",".join(SETS), help="comma-separated: sst2,banking77")
    ap.add_argument(f"{p}set", action="append", default=[], metavar="KEY=VALUE",
                    help="lmtune config override for every run of every strategy (smoke runs: train.epochs=1)")


def _settings(args) -> dict:
    def get(name, default=None):
        for key in (f"active_{name}", name):
            if getattr(args, key, None) is not None:
                return getattr(args, key)
        return default
    seeds = get("seeds", 5)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in str(seeds).split(",") if str(s).strip()] \
        if isinstance(seeds, str) else list(seeds)
    sets = [s.strip() for s in str(get("sets", ",".join(SETS))).split(",") if s.strip()]
    bad = [s for s in sets if s not in SETS]
    if bad:
        raise SystemExit(f"active learning: unknown set {bad[0]!r}; choose from {', '.join(SETS)}")
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in get("set", []))}
    return {"seeds": seeds, "sets": sets, "rounds": get("rounds", 10), "batch": get("batch", 50),
            "initial": get("initial", 100), "pool": get("pool"), "test": get("test"), "overrides": overrides}


def phase_active(work: Path, args) -> dict:
    """The active-learning phase under work/active: {set: headline figures + per-strategy detail}. args: an
    argparse namespace; reads seeds (a count or a list) and rounds, batch, initial, pool, test, sets (each also
    as active_NAME), with this file's defaults where absent."""
    cfg = _settings(args)
    work = Path(work) / "active"
    work.mkdir(parents=True, exist_ok=True)
    fixed = {k: cfg[k] for k in ("rounds", "batch", "initial", "pool", "test", "overrides")}
    saved = read_json(work / "settings.json")
    if saved is not None and saved != fixed:
        raise SystemExit(f"{work}: holds rounds of other settings {saved} (now {fixed}); give another --work")
    write_json(work / "settings.json", fixed)
    if not SHARED.is_dir():
        raise SystemExit(f"benchmark data not found at {SHARED}")
    result = {}
    for name in cfg["sets"]:
        chains: dict[str, list[list[dict]]] = {k: [] for k in sides()}
        for seed in cfg["seeds"]:
            files = set_files(work, name, seed, cfg)
            folder = work / name / f"seed{seed}"
            start = first_run(folder, files, seed, cfg["overrides"])
            print(f"{name} seed {seed}: {start['labels']} first labels, accuracy {start['accuracy']:.4f}", flush=True)
            for side, how in sides().items():
                chains[side].append(run_chain(folder / side, files, how, start, cfg, seed, f"{name} {side} seed {seed}"))
            drop_weights(start["run_dir"])
        result[name] = headline(summarize(chains))
        h = result[name]
        print(f"{name}: AUC lmtune ({h['lmtune_strategy']}) {h['lmtune_auc']:.2f} | random {h['random_auc']:.2f} | "
              f"small-text best ({h['small_text_best']}) {h['small_text_auc']:.2f} | "
              f"{h['s_per_round']}s per round", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="folder for the rounds' figures and runs (resumable); default a temporary one")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    ap.add_argument("--only", help="comma-separated sets (same as --sets)")
    add_arguments(ap)
    args = ap.parse_args()
    if args.only:
        args.sets = args.only
    tmp = None if args.work else tempfile.TemporaryDirectory()
    result = phase_active(Path(args.work or tmp.name), args)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
