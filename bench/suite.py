"""The honest-quality suite (issue 47): lmtune's defaults against a tuned peer, the task's specialist library
and the one-epoch "usual script", over seeds, on the eight sets of bench/harness.py, with a paired
bootstrap interval for every claimed win and lmtune's ceiling.

Sides (each set, same packaged MiniLM backbone, same training and dev rows from harness.train_dev):
- lmtune: its defaults (default epochs included); only task, model and data (train + the set's dev) set,
  and train.seed. Its test predictions come from the trained run afterwards (the run never sees the test file).
- tuned: the Hugging Face example recipe for the task: run_glue / run_classification (sequence tasks:
  max_length 128, batch 32 as the text-classification README's command), run_ner (first sub-token labels,
  the model's own max length, Trainer's default batch 8), run_qa (max_length 384, stride 128, windows padded,
  batch 12, all windows of a question decoded together: n-best 20, answers of at most 30 tokens), each with
  3 epochs (2 for QA), warmup 0.1, weight decay 0.01, Trainer defaults otherwise; dynamic padding where
  run_glue allows it (--pad_to_max_length False: the faster choice on CPU, so the time comparison favours the
  peer). Its learning rate is chosen on dev from --grid (first seed), then --seeds run at that rate.
  The whole grid's train seconds are its tuning cost. SemEval: the sentence with its <e1>/<e2> markers as
  written in the data (what run_classification reads from the file).
- usual: the existing benches' one-epoch recipe (bench/classification.py, ner.py, pairs.py, multilabel.py,
  relation.py, qa.py): 1 epoch, batch 16, lr 2e-5 (NER 5e-5, QA 3e-5), no warmup or weight decay,
  truncation at 128 (QA 384 / 128); SemEval without markers, as bench/relation.py. QA decodes all windows.
- specialist: sentence-transformers CrossEncoder.fit on MRPC and STS-B, as the library's training examples
  (training_stsbenchmark.py / training_quora_duplicate_questions.py): num_labels 1, batch 16, 4 epochs, 10%
  warmup, fit's defaults otherwise (lr 2e-5, weight decay 0.01); STS-B scores divided by 5. SetFit (SST-2,
  banking77 at 64 per class) lives in the few-shot bench (issue 48), not here.
- untrained: the checkpoint's own cosine, no training (bench/pairs.py's untuned_cosine), on MRPC and STS-B.
- ceiling (--ceiling): one lmtune run with train.epochs CEILING_EPOCHS on the full train file where the
  suite samples it (harness.train_dev(full=True)), same dev.

Every unit of work (set x side x lr x seed) is cached as JSON under --work (fit.json after training, with
the model kept in model/ until its test predictions are in test.json): a stopped run resumes where it
stopped. The test split is read (harness.load_test) once per set, after every side has trained and the peer's
learning rate is chosen. Scores: one scorer per set (harness.METRICS) for every side. Statistics:
harness.summary (mean +- std over seeds) and harness.paired_bootstrap (lmtune minus the tuned peer).

Writes bench/results/suite.json (every figure, the command, commit, machine, seeds and settings) and renders
bench/RESULTS.md from it; `--render` renders RESULTS.md from the JSON alone. Prints figures per unit and a
last line of JSON (the per-set summary).
Usage: python bench/suite.py [--only sst2,mrpc] [--seeds 1,2,3] [--grid 1e-5,2e-5,5e-5,1e-4] [--work DIR]
       [--limit N] [--ceiling] [--render] [--out bench/results/suite.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from harness import METRICS, ORDER, SETS  # noqa: E402

from lmtune.io import write_json, write_text  # noqa: E402

RESULTS_JSON = ROOT / "bench" / "results" / "suite.json"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
GRID = (1e-5, 2e-5, 5e-5, 1e-4)  # the BERT grid, widened for small models (the issue's)
SEEDS = (1, 2, 3)
CEILING_EPOCHS = 10
SIDES = ("lmtune", "tuned", "usual", "specialist", "untrained", "ceiling")

# Published figures for the same backbone (all-MiniLM-L6-v2) and data, with their source. None was found
# for a fine-tuned all-MiniLM-L6-v2 on these sets; an entry is added only with its paper table or model card.
REFERENCES: dict[str, dict | None] = {name: None for name in ORDER}


# ---------------------------------------------------------------- the HF example recipes

@dataclass(frozen=True)
class Recipe:
    """One Trainer recipe: what differs between the tuned example recipe and the one-epoch usual script."""
    epochs: float
    batch: int
    warmup: float  # share of the steps
    weight_decay: float
    max_length: int | None  # None: the model's own limit (run_ner's default)
    lr: float | None = None  # fixed (usual); None: chosen on the grid (tuned)
    markers: bool = True  # SemEval: keep the <e1>/<e2> markers in the text


def tuned_recipe(kind: str) -> Recipe:
    if kind == "qa":  # run_qa README: batch 12, 2 epochs, max_seq_length 384, doc_stride 128
        return Recipe(epochs=2, batch=12, warmup=0.1, weight_decay=0.01, max_length=384)
    if kind == "ner":  # run_ner README sets no batch (Trainer's 8) and no max_seq_length (the model's own)
        return Recipe(epochs=3, batch=8, warmup=0.1, weight_decay=0.01, max_length=None)
    return Recipe(epochs=3, batch=32, warmup=0.1, weight_decay=0.01, max_length=128)  # run_glue README


def usual_recipe(kind: str) -> Recipe:
    lr = {"ner": 5e-5, "qa": 3e-5}.get(kind, 2e-5)
    return Recipe(epochs=1, batch=16, warmup=0.0, weight_decay=0.0, max_length=384 if kind == "qa" else 128, lr=lr,
                  markers=False)


def backbone() -> str:
    from lmtune.config import DEFAULT_MODEL
    from lmtune.models import resolve_model
    return resolve_model(DEFAULT_MODEL)


def training_args(out: str, recipe: Recipe, lr: float, seed: int):
    import torch
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=out, per_device_train_batch_size=recipe.batch, per_device_eval_batch_size=64,
                             learning_rate=lr, num_train_epochs=recipe.epochs, warmup_steps=recipe.warmup,  # a float < 1: a ratio
                             weight_decay=recipe.weight_decay, lr_scheduler_type="linear", save_strategy="no",
                             eval_strategy="no", report_to="none", seed=seed, logging_steps=10**6, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available())


_MARKER = re.compile(r"</?e[12]>")


def _text(row: dict, recipe: Recipe) -> str:
    return row["text"] if recipe.markers else _MARKER.sub("", row["text"])


def _labels(name: str, rows: list[dict]) -> list[str]:
    kind = SETS[name].kind
    if kind == "multilabel":
        return sorted({lab for r in rows for lab in r["labels"]})
    if kind == "ner":
        from lmtune.data.tagging import bio_labels, split_tag
        return bio_labels({split_tag(t)[1] for r in rows for t in r["tags"] if t != "O"})
    if kind in ("regression", "qa"):
        return []
    return sorted({r["label"] for r in rows})


def _row_labels(name: str, row: dict) -> set:
    kind = SETS[name].kind
    if kind == "multilabel":
        return set(row["labels"])
    if kind == "ner":
        return set(row["tags"])
    if kind in ("regression", "qa"):
        return set()
    return {row["label"]}


def seen_only(name: str, rows: list[dict], labels: list[str]) -> list[dict]:
    """Rows whose labels all occur in train (bench/relation.py's rule: a label never trained on cannot be
    predicted by either side, and lmtune refuses it in dev). With the full files nothing is dropped; the
    count is recorded."""
    known = set(labels)
    return [r for r in rows if _row_labels(name, r) <= known]


def _sequence_features(tok, rows: list[dict], name: str, labels: list[str], recipe: Recipe) -> list[dict]:
    kind = SETS[name].kind
    pair = kind in ("pairs", "regression")
    enc = tok([_text(r, recipe) for r in rows], [r["text_pair"] for r in rows] if pair else None, truncation=True,
              max_length=recipe.max_length)
    index = {lab: i for i, lab in enumerate(labels)}
    feats = []
    for i, r in enumerate(rows):
        if kind == "regression":
            y = float(r["label"])
        elif kind == "multilabel":
            y = [1.0 if lab in r["labels"] else 0.0 for lab in labels]
        else:
            y = index.get(r["label"], 0)  # a dev / test label unseen in train cannot be predicted: any index scores it wrong
        feats.append({**{k: enc[k][i] for k in enc}, "labels": y})
    return feats


def _ner_features(tok, rows: list[dict], labels: list[str], recipe: Recipe):
    index = {lab: i for i, lab in enumerate(labels)}
    enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
              max_length=recipe.max_length or _model_max(tok))
    feats = []
    for i, r in enumerate(rows):  # run_ner's tokenize_and_align_labels, label_all_tokens False
        prev, lab = None, []
        for w in enc.word_ids(i):
            lab.append(-100 if w is None or w == prev else index.get(r["tags"][w], 0))
            prev = w
        feats.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab})
    return feats, enc


def _model_max(tok) -> int:
    return min(int(tok.model_max_length), 512)


def _qa_train_features(tok, rows: list[dict], recipe: Recipe) -> list[dict]:
    """run_qa's prepare_train_features: windows of max_length with stride 128, padded, each labelled with the
    first answer's tokens or [CLS] when the window does not hold it."""
    enc = tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
              max_length=recipe.max_length, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding="max_length")
    feats = []
    for k in range(len(enc["input_ids"])):
        r, seq, offs = rows[enc["overflow_to_sample_mapping"][k]], enc.sequence_ids(k), enc["offset_mapping"][k]
        s = r["answers"]["answer_start"][0]
        sp, ep = harness.answer_span(seq, offs, s, s + len(r["answers"]["text"][0]))
        feats.append({**{n: enc[n][k] for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc},
                      "start_positions": sp, "end_positions": ep})
    return feats


def _qa_decode(trainer, tok, rows: list[dict], recipe: Recipe, n_best: int = 20, max_answer: int = 30) -> list[str]:
    """run_qa's postprocess_qa_predictions (utils_qa.py), SQuAD v1: every window of a question scored
    together, the best start + end logit sum over valid spans (inside the context, end >= start, at most
    max_answer tokens) of each window's n-best starts and ends."""
    enc = tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
              max_length=recipe.max_length, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding="max_length")
    feats = [{n: enc[n][k] for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc}
             for k in range(len(enc["input_ids"]))]
    start_logits, end_logits = trainer.predict(feats).predictions[:2]
    best: dict[int, tuple[float, str]] = {}
    for k, i in enumerate(enc["overflow_to_sample_mapping"]):
        seq, offs = enc.sequence_ids(k), enc["offset_mapping"][k]
        s, e = start_logits[k], end_logits[k]
        for a in np.argsort(-s)[:n_best]:
            for b in np.argsort(-e)[:n_best]:
                if seq[a] != 1 or seq[b] != 1 or b < a or b - a + 1 > max_answer:
                    continue
                value = float(s[a] + e[b])
                if value > best.get(i, (-np.inf, ""))[0]:
                    best[i] = (value, rows[i]["context"][offs[a][0]:offs[b][1]])
    return [best.get(i, (0.0, ""))[1] for i in range(len(rows))]


def peer_fit(name: str, train: list[dict], recipe: Recipe, lr: float, seed: int, model_dir: Path) -> float:
    """Train the recipe with the HF Trainer; the model and tokenizer saved in model_dir; returns train seconds
    (trainer.train() alone: no evaluation, no saving)."""
    import tempfile

    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer,
                              default_data_collator, set_seed)

    from lmtune.models import quiet_transformers
    kind, path = SETS[name].kind, backbone()
    labels = _labels(name, train)
    set_seed(seed)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
        if kind == "qa":
            model = AutoModelForQuestionAnswering.from_pretrained(path)
        elif kind == "ner":
            model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(labels))
        else:
            extra = ({"problem_type": "regression"} if kind == "regression" else
                     {"problem_type": "multi_label_classification"} if kind == "multilabel" else {})
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=max(1, len(labels)), **extra)
    if kind == "qa":
        feats, collator = _qa_train_features(tok, train, recipe), default_data_collator
    elif kind == "ner":
        feats, collator = _ner_features(tok, train, labels, recipe)[0], DataCollatorForTokenClassification(tok)
    else:
        feats, collator = _sequence_features(tok, train, name, labels, recipe), DataCollatorWithPadding(tok)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=training_args(out, recipe, lr, seed), train_dataset=feats, data_collator=collator)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    trainer.save_model(str(model_dir))
    tok.save_pretrained(str(model_dir))
    (model_dir / "suite_labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return seconds


def peer_predict(name: str, model_dir: Path, rows: list[dict], recipe: Recipe) -> list:
    """The saved peer's predictions of rows, decoded as its example script decodes them: argmax, the raw
    score (regression), sigmoid >= 0.5 (multi-label, run_classification), first sub-token argmax per word (run_ner;
    words cut by truncation count as O), all-window spans (run_qa)."""
    import tempfile

    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer)

    from lmtune.models import quiet_transformers
    kind = SETS[name].kind
    labels = json.loads((model_dir / "suite_labels.json").read_text(encoding="utf-8"))
    auto = {"qa": AutoModelForQuestionAnswering, "ner": AutoModelForTokenClassification}.get(kind, AutoModelForSequenceClassification)
    with quiet_transformers():
        tok, model = AutoTokenizer.from_pretrained(str(model_dir)), auto.from_pretrained(str(model_dir))
    with tempfile.TemporaryDirectory() as out:
        args = training_args(out, recipe, 1e-5, 0)
        if kind == "qa":
            return _qa_decode(Trainer(model=model, args=args), tok, rows, recipe)
        if kind == "ner":
            feats, enc = _ner_features(tok, rows, labels, recipe)
            logits = Trainer(model=model, args=args, data_collator=DataCollatorForTokenClassification(tok)).predict(feats).predictions
            out_tags = []
            for i, r in enumerate(rows):
                tags, prev = ["O"] * len(r["tokens"]), None
                for p, w in enumerate(enc.word_ids(i)):
                    if w is not None and w != prev:
                        tags[w] = labels[int(logits[i][p].argmax())]
                    prev = w
                out_tags.append(tags)
            return out_tags
        feats = _sequence_features(tok, rows, name, labels or ["_"], recipe)
        logits = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tok)).predict(feats).predictions
    if kind == "regression":
        return [float(x) for x in logits.reshape(-1)]
    if kind == "multilabel":
        probs = 1 / (1 + np.exp(-logits))
        return [[labels[j] for j in np.flatnonzero(p >= 0.5)] for p in probs]
    return [labels[int(i)] for i in logits.argmax(-1)]


# ---------------------------------------------------------------- the specialist: sentence-transformers CrossEncoder

def crossencoder_fit(name: str, train: list[dict], seed: int, model_dir: Path) -> float:
    """CrossEncoder.fit as the library's cross-encoder training examples call it; returns fit's seconds."""
    import math

    import torch
    from sentence_transformers import InputExample
    from sentence_transformers.cross_encoder import CrossEncoder
    from torch.utils.data import DataLoader
    from transformers import set_seed
    set_seed(seed)
    scale = 5.0 if SETS[name].kind == "regression" else 1.0  # training_stsbenchmark.py: score / 5 for a 0-1 target
    examples = [InputExample(texts=[r["text"], r["text_pair"]], label=float(r["label"]) / scale) for r in train]
    loader = DataLoader(examples, shuffle=True, batch_size=16, generator=torch.Generator().manual_seed(seed))
    model = CrossEncoder(backbone(), num_labels=1)
    epochs = 4
    t0 = time.perf_counter()
    model.fit(train_dataloader=loader, epochs=epochs, warmup_steps=math.ceil(len(loader) * epochs * 0.1), show_progress_bar=False)
    seconds = time.perf_counter() - t0
    model.save(str(model_dir))
    return seconds


def crossencoder_predict(name: str, model_dir: Path, rows: list[dict]) -> list:
    from sentence_transformers.cross_encoder import CrossEncoder
    scores = CrossEncoder(str(model_dir)).predict([(r["text"], r["text_pair"]) for r in rows], show_progress_bar=False)
    if SETS[name].kind == "regression":
        return [float(s) for s in scores]
    return ["1" if s >= 0.5 else "0" for s in scores]  # num_labels 1: a sigmoid score, 0.5 its decision


# ---------------------------------------------------------------- lmtune

def _lmtune_file(name: str, rows: list[dict], path: Path) -> Path:
    kind = SETS[name].kind
    if kind == "ner":
        path = path.with_suffix(".conll")
        write_text(path, "".join("".join(f"{t} {g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n" for r in rows))
        return path
    keep = {"classification": ("text", "label"), "relation": ("text", "label"), "pairs": ("text", "text_pair", "label"),
            "regression": ("text", "text_pair", "label"), "multilabel": ("text", "labels"),
            "qa": ("id", "question", "context", "answers")}[kind]
    write_text(path, "".join(json.dumps({k: r[k] for k in keep}, ensure_ascii=False) + "\n" for r in rows))
    return path


def lmtune_config(name: str, files: dict[str, Path], out: Path, seed: int, epochs: int | None = None) -> dict:
    """Only task, model and data (and the seed): lmtune's defaults do the rest."""
    kind = SETS[name].kind
    task = {"pairs": "classification"}.get(kind, kind)
    data = {k: str(v) for k, v in files.items()}
    if kind in ("pairs", "regression"):
        data["text_pair_column"] = "text_pair"
    if kind == "multilabel":
        data["label_column"] = "labels"
    train = {"seed": seed, "progress": "none", **({"epochs": epochs} if epochs else {})}
    return {"task": task, "output_dir": str(out), "run_name": "run", "model": {"name": backbone()}, "data": data, "train": train}


def lmtune_fit(name: str, train: list[dict], dev: list[dict], seed: int, unit: Path, epochs: int | None = None) -> dict:
    import lmtune
    files = {"train": _lmtune_file(name, train, unit / "train.jsonl"), "dev": _lmtune_file(name, dev, unit / "dev.jsonl")}
    run = lmtune.train(lmtune_config(name, files, unit / "runs", seed, epochs))
    t = run.metrics["train"]
    return {"train_s": t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], "loop_s": t["train_seconds"],
            "epochs_run": t.get("epochs"), "model": str(run.run_dir), "dev_metrics": run.metrics.get("dev", {})}


def lmtune_predict(name: str, run_dir: Path, rows: list[dict], unit: Path) -> list:
    import lmtune
    run = lmtune.load(run_dir)
    out = run.predict_file(_lmtune_file(name, rows, unit / "test.jsonl"))
    key = run.task.decision_key
    if SETS[name].kind == "qa":  # lmtune's reader may leave out a question it cannot read: align by id
        by_id = {r.get("id"): r[key] for r in out}
        return [by_id.get(r["id"], "") for r in rows]
    if len(out) != len(rows):
        raise RuntimeError(f"{name}: lmtune predicted {len(out)} rows for {len(rows)} test rows")
    return [r[key] for r in out]


# ---------------------------------------------------------------- units: cached, resumable

def unit_dir(work: Path, name: str, side: str, lr: float | None, seed: int) -> Path:
    return work / name / side / f"lr{lr:g}-seed{seed}" if lr is not None else work / name / side / f"seed{seed}"


def fit_unit(folder: Path, fit: Callable[[Path], dict]) -> dict:
    """Train one unit unless its fit.json is there (and its model too, while its test predictions are not):
    fit(folder) trains and returns the unit's figures (with "model": its saved folder)."""
    done = folder / "fit.json"
    if done.exists():
        cached = json.loads(done.read_text(encoding="utf-8"))
        if (folder / "test.json").exists() or cached.get("model") is None or Path(cached["model"]).exists():
            return cached
    folder.mkdir(parents=True, exist_ok=True)
    result = fit(folder)
    write_json(done, result)
    return result


def test_unit(folder: Path, predict: Callable[[Path], list], score: Callable[[list], float], keep_model: bool = False) -> dict:
    """The unit's test predictions and score, cached in test.json; its saved model is removed afterwards
    (unless keep_model) because nothing reads it again."""
    done = folder / "test.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    fitted = json.loads((folder / "fit.json").read_text(encoding="utf-8"))
    pred = predict(Path(fitted["model"]))
    result = {"score": score(pred), "pred": pred}
    write_json(done, result)
    if not keep_model:
        shutil.rmtree(fitted["model"], ignore_errors=True)
    return result


def choose_lr(grid: dict[float, dict]) -> float:
    """The learning rate with the best dev score; on a tie, the first of the grid."""
    return max(grid, key=lambda lr: (grid[lr]["dev"], -list(grid).index(lr)))


# ---------------------------------------------------------------- one set

def run_set(name: str, ns: argparse.Namespace, work: Path) -> dict:
    spec, metric = SETS[name], METRICS[SETS[name].metric]
    train, dev = harness.train_dev(name, ns.limit)
    ctx = {"labels": _labels(name, train)}
    all_dev = len(dev)
    dev = seen_only(name, dev, ctx["labels"])
    seeds, out = ns.seeds, {"title": spec.title, "metric": metric.name, "sizes": {"train": len(train), "dev": len(dev)}}
    finals: dict[str, list[tuple[Path, Callable[[Path], list]]]] = {side: [] for side in SIDES}

    def dev_score(pred: list) -> float:
        return harness.score(name, harness.gold(name, dev), pred, ctx)

    for seed in seeds:
        folder = unit_dir(work, name, "lmtune", None, seed)
        fitted = fit_unit(folder, lambda f, s=seed: lmtune_fit(name, train, dev, s, f))
        print(f"{name} lmtune seed {seed}: train {fitted['train_s']:.1f}s (loop {fitted['loop_s']:.1f}s)", flush=True)
        finals["lmtune"].append((folder, lambda m, f=folder: lmtune_predict(name, m, test, f)))

    def peer_unit(side: str, recipe: Recipe, lr: float, seed: int) -> dict:
        folder = unit_dir(work, name, side, lr, seed)

        def fit(f: Path) -> dict:
            seconds = peer_fit(name, train, recipe, lr, seed, f / "model")
            return {"train_s": seconds, "dev": dev_score(peer_predict(name, f / "model", dev, recipe)), "model": str(f / "model")}
        fitted = fit_unit(folder, fit)
        print(f"{name} {side} lr {lr:g} seed {seed}: dev {fitted['dev']:.4f}, train {fitted['train_s']:.1f}s", flush=True)
        return fitted

    tuned = tuned_recipe(spec.kind)
    grid = {lr: peer_unit("tuned", tuned, lr, seeds[0]) for lr in ns.grid}
    chosen = choose_lr(grid)
    if not ns.keep_models:  # the grid's other models are never evaluated on test
        for lr in grid:
            if lr != chosen:
                shutil.rmtree(unit_dir(work, name, "tuned", lr, seeds[0]) / "model", ignore_errors=True)
    for seed in seeds:
        if seed != seeds[0]:  # the first seed's run at the chosen rate is the grid's
            peer_unit("tuned", tuned, chosen, seed)
        folder = unit_dir(work, name, "tuned", chosen, seed)
        finals["tuned"].append((folder, lambda m: peer_predict(name, m, test, tuned)))
    out["tuned_grid"] = {f"{lr:g}": {"dev": g["dev"], "train_s": g["train_s"]} for lr, g in grid.items()}
    out["tuned_lr"] = chosen

    usual = usual_recipe(spec.kind)
    if not ns.skip_usual:
        for seed in seeds:
            peer_unit("usual", usual, usual.lr, seed)
            finals["usual"].append((unit_dir(work, name, "usual", usual.lr, seed), lambda m: peer_predict(name, m, test, usual)))

    if spec.kind in ("pairs", "regression"):
        for seed in seeds:
            folder = unit_dir(work, name, "specialist", None, seed)
            fitted = fit_unit(folder, lambda f, s=seed: {"train_s": crossencoder_fit(name, train, s, f / "model"),
                                                          "model": str(f / "model")})
            print(f"{name} CrossEncoder seed {seed}: train {fitted['train_s']:.1f}s", flush=True)
            finals["specialist"].append((folder, lambda m: crossencoder_predict(name, m, test)))

    if ns.ceiling:
        full_train, _ = harness.train_dev(name, ns.limit, full=True)
        folder = unit_dir(work, name, "ceiling", None, seeds[0])
        fitted = fit_unit(folder, lambda f: {**lmtune_fit(name, full_train, dev, seeds[0], f, CEILING_EPOCHS),
                                             "train_rows": len(full_train)})
        finals["ceiling"].append((folder, lambda m, f=folder: lmtune_predict(name, m, test, f)))

    # the final evaluation: the test split is read here, once, after every choice above was made on dev
    all_test = harness.load_test(name, ns.limit)
    test = seen_only(name, all_test, ctx["labels"])
    gold = harness.gold(name, test)
    out["sizes"].update(test=len(test), dropped_unseen_labels={"dev": all_dev - len(dev), "test": len(all_test) - len(test)})
    preds: dict[str, list[list]] = {}
    for side, units in finals.items():
        results = [test_unit(folder, predict, lambda p: harness.score(name, gold, p, ctx), ns.keep_models)
                   for folder, predict in units]
        if not results:
            continue
        preds[side] = [r["pred"] for r in results]
        fits = [json.loads((folder / "fit.json").read_text(encoding="utf-8")) for folder, _ in units]
        out[side] = {**harness.summary([r["score"] for r in results]), "scores": [r["score"] for r in results],
                     "train_s": [f["train_s"] for f in fits],
                     **({"loop_s": [f["loop_s"] for f in fits]} if "loop_s" in fits[0] else {}),
                     **({"train_rows": fits[0]["train_rows"], "epochs": CEILING_EPOCHS} if side == "ceiling" else {})}
        print(f"{name} {side}: test {metric.name} {out[side]['mean']:.4f} +- {out[side]['std']:.4f} over {len(results)}", flush=True)
    out["tuned"]["lr"] = chosen
    out["tuned"]["grid_cost_s"] = sum(g["train_s"] for g in grid.values())
    if spec.kind in ("pairs", "regression"):
        out["untrained"] = untrained_cosine(name, dev, test)
    out["bootstrap"] = harness.paired_bootstrap(metric, gold, preds["lmtune"], preds["tuned"], ctx, n_resamples=ns.resamples)
    b = out["bootstrap"]
    print(f"{name}: lmtune - tuned peer = {b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] "
          f"({'win' if b['win'] else 'loss' if b['loss'] else 'within noise'})", flush=True)
    return out


def untrained_cosine(name: str, dev: list[dict], test: list[dict]) -> dict:
    """The checkpoint's own cosine, untrained (bench/pairs.py's untuned_cosine: a threshold chosen on dev)."""
    from pairs import untuned_cosine
    as_tuples = [(r["text"], r["text_pair"], r["label"]) for r in dev], [(r["text"], r["text_pair"], r["label"]) for r in test]
    result = untuned_cosine(backbone(), *as_tuples, SETS[name].kind == "regression")
    key = "spearman" if SETS[name].kind == "regression" else "accuracy"
    return {"score": result[key], **result}


# ---------------------------------------------------------------- the results document and RESULTS.md

def _cell(side: dict | None, digits: int = 4) -> str:
    if not side:
        return "not run"
    return f"{side['mean']:.{digits}f} ± {side['std']:.{digits}f}" if side.get("n", 1) > 1 else f"{side['mean']:.{digits}f}"


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


COLUMNS = ("set", "metric", "lmtune (defaults)", "tuned peer (lr)", "peer grid cost s", "usual script", "specialist",
           "lmtune − peer [95% CI]", "win?", "train s: lmtune / chosen peer", "ceiling", "published reference")


def table_rows(doc: dict) -> list[list[str]]:
    rows = []
    for name in [n for n in ORDER if n in doc.get("sets", {})]:
        s = doc["sets"][name]
        b = s.get("bootstrap")
        lm, tuned = s.get("lmtune"), s.get("tuned")
        spec = s.get("specialist")
        spec_cell = f"CrossEncoder {_cell(spec)}" if spec else "SetFit: bench/fewshot.py" if name in ("sst2", "banking77") else "none"
        if s.get("untrained"):
            spec_cell += f"; untrained cosine {s['untrained']['score']:.4f}"
        ceiling = s.get("ceiling")
        ref = REFERENCES.get(name) or s.get("reference")
        rows.append([
            f"{s['title']} ({s['sizes']['train']:,} / {s['sizes']['dev']:,} / {s['sizes'].get('test', 0):,})",
            s["metric"], _cell(lm), f"{_cell(tuned)} ({tuned['lr']:g})" if tuned else "not run",
            f"{tuned['grid_cost_s']:.0f}" if tuned else "not run", _cell(s.get("usual")), spec_cell,
            f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]" if b else "not run",
            ("yes" if b["win"] else "no (peer better)" if b["loss"] else "no (within noise)") if b else "not run",
            f"{_mean(lm['train_s']):.0f} / {_mean(tuned['train_s']):.0f}" if lm and tuned else "not run",
            f"{ceiling['mean']:.4f} ({ceiling['epochs']} epochs, {ceiling['train_rows']:,} train)" if ceiling else "not run",
            f"{ref['value']} ({ref['source']})" if ref else "none known"])
    return rows


def banner(doc: dict) -> str:
    if doc["status"] == "full":
        return ""
    return ("**SMOKE RUN, NOT FIGURES.** These numbers come from a tiny `--limit` run that only checks the machinery; "
            "they say nothing about quality. A full run (`python bench/suite.py`, many CPU hours) replaces this file."
            if doc["status"] == "smoke" else
            "**NOT RUN YET.** No set has been measured; `python bench/suite.py` (many CPU hours) fills this table.")


def headline(doc: dict) -> dict:
    sets = doc.get("sets", {})
    wins = sum(bool(s.get("bootstrap", {}).get("win")) for s in sets.values())
    if doc["status"] != "full" or not sets:
        return {"what": "sets where lmtune's win over the tuned peer excludes 0", "lmtune": "not measured",
                "against": "tuned HF recipe", "against_value": "not measured", "decimals": None}
    return {"what": "sets where lmtune's win over the tuned peer excludes 0", "lmtune": f"{wins} of {len(sets)}",
            "against": "tuned HF recipe (3 seeds)", "against_value": f"{len(sets) - wins} of {len(sets)} not won",
            "decimals": None}


def explanation(doc: dict) -> str:
    st = doc["settings"]
    return (f"`{doc['command']}`: lmtune's defaults vs the HF example recipe with its learning rate chosen on dev from "
            f"{{{', '.join(f'{lr:g}' for lr in st['grid'])}}} (the grid's summed train seconds: its tuning cost), the "
            f"one-epoch usual script, and the specialist library, same MiniLM backbone, same train / dev rows, seeds "
            f"{', '.join(map(str, st['seeds']))}; mean ± std over seeds on test. The interval is a paired bootstrap "
            f"({st['resamples']} resamples) of lmtune's seed-mean minus the tuned peer's; a win only where it excludes 0. "
            "Sizes are train / dev / test. Train seconds: the peer's trainer.train(); lmtune's loop less its in-loop dev "
            "evaluations and checkpoint writes, as the other benches count it (suite.json's loop_s includes them). "
            "How each side is configured: bench/suite.py's docstring.")


def finish(doc: dict) -> dict:
    """The results document as the docs' benchmark hook reads it (docs/hooks/benchmarks.py): its sections
    derived from the figures, so suite.json stays their one source."""
    table = {"columns": [{"name": c} for c in COLUMNS], "rows": table_rows(doc)}
    text = "\n\n".join(x for x in (banner(doc), explanation(doc)) if x)
    return {**doc, "headline": headline(doc), "sections": [{"text": text}, {"table": table}]}


def render_markdown(doc: dict) -> str:
    """bench/RESULTS.md from the results document alone."""
    lines = ["# Honest quality: lmtune against a tuned peer, over seeds", "",
             "<!-- generated by `python bench/suite.py --render` from bench/results/suite.json; do not edit -->", ""]
    if banner(doc):
        lines += [banner(doc), ""]
    lines += [f"*commit `{doc['commit']}` · {doc['date']} · {doc['machine']} · `{doc['command']}`*", "", explanation(doc), ""]
    rows = table_rows(doc)
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines.append("| " + " | ".join(["not run"] * len(COLUMNS)) + " |")
    lines += ["", "Published references: none is known for a fine-tuned all-MiniLM-L6-v2 on these sets; a row gives one "
              "only with its source (paper table or model card)."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores, {platform.machine()} {platform.system()}{gpu}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def new_document(ns: argparse.Namespace, status: str) -> dict:
    return {"bench": "suite", "order": 90, "title": "Honest quality: lmtune vs a tuned peer over seeds (issue 47)",
            "script": "bench/suite.py", "command": "python bench/suite.py " + " ".join(sys.argv[1:]), "commit": commit(),
            "date": datetime.date.today().isoformat(), "machine": machine(), "status": status,
            "settings": {"seeds": list(ns.seeds), "grid": list(ns.grid), "limit": ns.limit, "resamples": ns.resamples,
                         "ceiling": ns.ceiling, "usual": not ns.skip_usual}, "sets": {}}


def check_work(work: Path, ns: argparse.Namespace) -> None:
    """A --work folder holds units of one data size: resuming with another --limit would mix them."""
    manifest = work / "suite_manifest.json"
    if manifest.exists():
        before = json.loads(manifest.read_text(encoding="utf-8"))
        if before.get("limit") != ns.limit:
            sys.exit(f"{work}: its units were trained with --limit {before.get('limit')}; use that, or another --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json(manifest, {"limit": ns.limit})


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ORDER), help=f"comma-separated sets of {', '.join(ORDER)}")
    ap.add_argument("--seeds", type=lambda t: tuple(int(x) for x in t.split(",")), default=SEEDS)
    ap.add_argument("--grid", type=_floats, default=GRID, help="the tuned peer's learning rates")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".suite_work", help="unit cache (resume by reusing it)")
    ap.add_argument("--limit", type=int, default=0, help="cap train, dev and test at N rows: a smoke run, not figures")
    ap.add_argument("--ceiling", action="store_true", help=f"also one lmtune run of {CEILING_EPOCHS} epochs on the full train")
    ap.add_argument("--skip-usual", action="store_true", help="leave out the one-epoch usual script")
    ap.add_argument("--keep-models", action="store_true", help="keep every unit's model after its test predictions")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--out", type=Path, default=RESULTS_JSON)
    ap.add_argument("--md", type=Path, default=RESULTS_MD)
    ap.add_argument("--render", action="store_true", help="only render --md from --out")
    ns = ap.parse_args()
    if ns.render:
        write_text(ns.md, render_markdown(json.loads(ns.out.read_text(encoding="utf-8"))))
        return
    if not harness.SHARED.is_dir():
        sys.exit(f"benchmark data not found at {harness.SHARED}")
    names = ns.only.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        sys.exit(f"--only: unknown set(s) {', '.join(unknown)}; sets: {', '.join(ORDER)}")
    check_work(ns.work, ns)
    smoke = bool(ns.limit) or len(ns.seeds) < len(SEEDS) or tuple(ns.grid) != GRID
    previous = json.loads(ns.out.read_text(encoding="utf-8")) if ns.out.exists() else {}
    doc = new_document(ns, "smoke" if smoke else "full")
    if previous.get("status") == doc["status"] and previous.get("settings") == doc["settings"]:
        doc["sets"] = previous.get("sets", {})  # a subset run adds its sets to the others' figures
    for name in names:
        doc["sets"][name] = run_set(name, ns, ns.work)
        write_json(ns.out, finish(doc))
        write_text(ns.md, render_markdown(finish(doc)))
    print(json.dumps({n: {side: doc["sets"][n].get(side, {}).get("mean") for side in ("lmtune", "tuned", "usual", "specialist")}
                      | {"win": doc["sets"][n]["bootstrap"]["win"]} for n in names}))


if __name__ == "__main__":
    main()
