"""One joint intent + slot model (task joint) vs two single-task lmtune models and the usual Hugging Face
recipe for each, same backbone, same epochs, same process (issue 49).

Data: ../shared/data/snips and ../shared/data/atis in the JointBERT layout (seq.in, seq.out, label per
split folder; train / valid / test as shipped). Backbone: the packaged MiniLM (all-MiniLM-L6-v2,
uncased), CPU. Every side trains on train, and lmtune's sides choose their checkpoint and calibrate on
valid (less its rows with an intent or slot tag train lacks: 2 in ATIS); test is never used for anything
but the figures.

Sides (each trained --epochs passes, default 3: lmtune's default and TrainingArguments' num_train_epochs):
- joint: `task: joint`, lmtune's defaults (one encoder, intent head + slot head, sentence accuracy picks
  the checkpoint).
- single: `task: classification` on the utterance (intent) and `task: ner` on its words (slots), lmtune's
  defaults; their sentence accuracy joins the two models' outputs per utterance.
- peer: the usual HF recipe for each head: AutoModelForSequenceClassification and
  AutoModelForTokenClassification (first-sub-token labels, DataCollatorForTokenClassification) with
  Trainer's defaults (lr 5e-5, linear decay, batch 16 as lmtune's), argmax decoding.

Every side is scored here the same way, from its predictions on the test utterances: intent accuracy,
slot F1 (seqeval, strict IOB2, entity level), sentence accuracy (intent right and every slot tag right).
Intents and slot types test has and train has not (ATIS: 5 intents, a few slot rows) count as errors
for every side, as JointBERT's published figures count them. texts_per_s: test utterances per second
of prediction from seq.in's words (sub-word tokenisation, the forward pass and decoding; batch 64 for the
peer, the run's own batching for lmtune), the fastest of 3 passes over test for every side; single and peer: the two
models one after the other, as a service running both would. train_s: wall seconds of training (lmtune: without its per-epoch dev evaluation and
checkpoints). Means over --seeds seeds (default 3), with the standard deviation.

Published BERT-base figures for scale (JointBERT, Chen et al. 2019; intent acc / slot F1 / sentence acc):
SNIPS 98.6 / 97.0 / 92.8, ATIS 97.5 / 96.1 / 88.2. MiniLM-L6 has 22.7M parameters to BERT-base's 110M.

Last line JSON: {"snips": {"joint": {"intent_acc": A, "slot_f1": F, "sentence_acc": A, "texts_per_s": T,
"train_s": S}, "single": {...}, "peer": {...}}, "atis": {...}}, each figure a mean over the seeds (with
"<figure>_std" beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from harness import kept_unit  # noqa: E402  (bench/harness.py, the benches' shared helpers)
import lmtune  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402
from lmtune.tasks.joint import read_jointbert  # noqa: E402

BATCH, PEER_LR = 16, 5e-5
PUBLISHED = {"snips": {"intent_acc": 0.986, "slot_f1": 0.970, "sentence_acc": 0.928},
             "atis": {"intent_acc": 0.975, "slot_f1": 0.961, "sentence_acc": 0.882}}
FIGURES = ("intent_acc", "slot_f1", "sentence_acc", "texts_per_s", "train_s")


def splits(name: str, limit: int | None) -> dict[str, list[dict]]:
    folder = SHARED / name
    rows = {s: read_jointbert(folder / f) for s, f in (("train", "train"), ("dev", "valid"), ("test", "test"))}
    rows = {s: r[:limit] if limit else r for s, r in rows.items()}
    # dev only chooses checkpoints and calibrates: its rows with an intent or slot tag train lacks (ATIS: 2) are
    # left out for every side alike; test keeps them all, counted as errors
    intents, tags = {r["intent"] for r in rows["train"]}, {t for r in rows["train"] for t in r["tags"]}
    rows["dev"] = [r for r in rows["dev"] if r["intent"] in intents and set(r["tags"]) <= tags]
    return rows


def text_of(row: dict) -> str:
    return " ".join(row["tokens"])


def scores(rows: list[dict], intents: list[str], tags: list[list[str]]) -> dict:
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    gold_tags = [r["tags"] for r in rows]
    intent_right = [p == r["intent"] for p, r in zip(intents, rows)]
    tags_right = [p == g for p, g in zip(tags, gold_tags)]
    n = len(rows)
    return {"intent_acc": sum(intent_right) / n, "slot_f1": float(f1_score(gold_tags, tags, mode="strict", scheme=IOB2)),
            "sentence_acc": sum(a and b for a, b in zip(intent_right, tags_right)) / n}


# ---- lmtune -------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def lmtune_cfg(task: str, work: Path, name: str, files: dict, seed: int, epochs: int, extra: dict | None = None,
               sections: dict | None = None) -> dict:
    return {"task": task, "output_dir": str(work / "runs"), "run_name": name, "model": {"name": DEFAULT_MODEL},
            "data": {**files, **(extra or {})},
            "train": {"epochs": epochs, "batch_size": BATCH, "seed": seed, "progress": "none"}, **(sections or {})}


def train_seconds(run) -> float:
    t = run.metrics["train"]
    return t["train_seconds"] - t.get("eval_seconds", 0.0) - t.get("checkpoint_seconds", 0.0)


def best_of(predict, repeats: int = 3) -> tuple[list, float]:
    """predict()'s result and its fastest wall time of `repeats` calls: the usual timeit rule (the fastest run is the
    one least disturbed by the rest of the machine), applied to every side alike."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = predict()
        best = min(best, time.perf_counter() - t0)
    return out, best


def predict_timed(run, texts: list[str]) -> tuple[list[dict], float]:
    return best_of(lambda: run.predict(texts))


def predict_words_timed(run, rows: list[dict], work: Path) -> tuple[list[dict], float]:
    """Predictions on the test utterances as the set tokenises them (seq.in's words, as the peer reads them with
    is_split_into_words): a word file without tags, read by the run's own task, so the slot tags line up word for
    word with the gold ones ("st. louis" stays two words, where a text would be split at the full stop)."""
    path = write_jsonl(work / "test_words.jsonl", [{"tokens": r["tokens"]} for r in rows])
    examples = run.task.read_file(path, run.config, None, require_label=False)
    return best_of(lambda: run.predict_examples(examples))


def run_joint(data: dict, work: Path, seed: int, epochs: int, slot_loss: str = "utterance") -> dict:
    """The joint model; side joint_word trains it with joint.slot_loss word. Each unit also keeps the dev figures
    (dev_*): a choice between the two loss rules is made on dev, over seeds and both sets, never on test."""
    files = {s: write_jsonl(work / f"joint_{s}.jsonl", rows) for s, rows in data.items() if s != "test"}
    # test scored below from predictions; the run's own test split is dev again (never used to choose anything)
    cfg = lmtune_cfg("joint", work, f"joint-{seed}", {**files, "test": files["dev"]}, seed, epochs,
                     sections={"joint": {"slot_loss": slot_loss}})
    run = lmtune.train(cfg)
    preds, seconds = predict_words_timed(run, data["test"], work)
    got = scores(data["test"], [p["intent"] for p in preds], [p["tags"] for p in preds])
    dev = run.metrics["dev"]
    return {**got, "texts_per_s": len(data["test"]) / seconds, "train_s": train_seconds(run),
            "dev_intent_acc": dev["intent_accuracy"], "dev_slot_f1": dev["slot_f1"], "dev_sentence_acc": dev["sentence_accuracy"]}


def run_single(data: dict, work: Path, seed: int, epochs: int) -> dict:
    intent_files = {s: write_jsonl(work / f"intent_{s}.jsonl", [{"text": text_of(r), "label": r["intent"]} for r in rows])
                    for s, rows in data.items() if s != "test"}
    slot_files = {s: write_jsonl(work / f"slots_{s}.jsonl", [{"tokens": r["tokens"], "tags": r["tags"]} for r in rows])
                  for s, rows in data.items() if s != "test"}
    intent = lmtune.train(lmtune_cfg("classification", work, f"intent-{seed}", {**intent_files, "test": intent_files["dev"]},
                                     seed, epochs))
    slots = lmtune.train(lmtune_cfg("ner", work, f"slots-{seed}", {**slot_files, "test": slot_files["dev"]}, seed, epochs))
    texts = [text_of(r) for r in data["test"]]
    ip, i_s = predict_timed(intent, texts)
    sp, s_s = predict_words_timed(slots, data["test"], work)
    got = scores(data["test"], [p["label"] for p in ip], [p["tags"] for p in sp])
    return {**got, "texts_per_s": len(texts) / (i_s + s_s), "train_s": train_seconds(intent) + train_seconds(slots)}


# ---- the usual Hugging Face recipe --------------------------------------------------------------------
def _trainer(model, tok, train_ds, seed: int, epochs: int, collator, out: str):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, learning_rate=PEER_LR,
                             num_train_epochs=epochs, lr_scheduler_type="linear", save_strategy="no", eval_strategy="no",
                             report_to="none", seed=seed, disable_tqdm=True, use_cpu=True)
    return Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)


def run_peer(data: dict, seed: int, epochs: int) -> dict:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, set_seed)
    path = resolve_model(DEFAULT_MODEL)
    intents = sorted({r["intent"] for r in data["train"]})
    tags = sorted({t for r in data["train"] for t in r["tags"]})
    i_index, t_index = {x: i for i, x in enumerate(intents)}, {x: i for i, x in enumerate(tags)}
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
    set_seed(seed)
    with quiet_transformers():
        clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(intents))
    enc = tok([text_of(r) for r in data["train"]], truncation=True, max_length=128)
    clf_ds = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i_index[r["intent"]]}
              for i, r in enumerate(data["train"])]
    set_seed(seed)
    with quiet_transformers():
        tagger = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(tags))
    wenc = tok([r["tokens"] for r in data["train"]], is_split_into_words=True, truncation=True, max_length=128)
    tag_ds = []
    for i, r in enumerate(data["train"]):
        prev, lab = None, []
        for w in wenc.word_ids(i):
            lab.append(-100 if w is None or w == prev else t_index[r["tags"][w]])
            prev = w
        tag_ds.append({"input_ids": wenc["input_ids"][i], "attention_mask": wenc["attention_mask"][i], "labels": lab})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        _trainer(clf, tok, clf_ds, seed, epochs, DataCollatorWithPadding(tok), out).train()
        _trainer(tagger, tok, tag_ds, seed, epochs, DataCollatorForTokenClassification(tok), out).train()
        train_s = time.perf_counter() - t0
    clf.eval(), tagger.eval()
    test = data["test"]

    def predict() -> tuple[list[str], list[list[str]]]:
        pred_intents, pred_tags = [], []
        with torch.inference_mode():
            for b in range(0, len(test), 64):
                rows = test[b:b + 64]
                x = tok([text_of(r) for r in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")
                pred_intents += [intents[i] for i in clf(**x).logits.argmax(-1).tolist()]
            for b in range(0, len(test), 64):
                rows = test[b:b + 64]
                x = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=128, padding=True,
                        return_tensors="pt")
                best = tagger(**x).logits.argmax(-1).tolist()
                for i, r in enumerate(rows):
                    out, prev = ["O"] * len(r["tokens"]), None
                    for p, w in enumerate(x.word_ids(i)):
                        if w is not None and w != prev:
                            out[w] = tags[best[i][p]]
                        prev = w
                    pred_tags.append(out)
        return pred_intents, pred_tags
    (pred_intents, pred_tags), seconds = best_of(predict)
    return {**scores(test, pred_intents, pred_tags), "texts_per_s": len(test) / seconds, "train_s": train_s}


# ---- the run ------------------------------------------------------------------------------------------
def mean_std(rows: list[dict]) -> dict:
    out = {}
    dev = ("dev_intent_acc", "dev_slot_f1", "dev_sentence_acc")  # joint units made since joint_word: what a loss choice reads
    for k in (*FIGURES, *(k for k in dev if all(k in r for r in rows))):
        values = [r[k] for r in rows]
        out[k] = round(statistics.fmean(values), 4 if k not in ("texts_per_s", "train_s") else 1)
        out[f"{k}_std"] = round(statistics.pstdev(values), 4 if k not in ("texts_per_s", "train_s") else 1)
    return out


def distill_figures(folder: Path) -> dict:
    """The means over the kept seeds of bench/distill.py's main case (teacher_acc, student_acc, hard_only_acc,
    cost_ratio), with the seeds they cover: the "distill" part of issue 49's last line."""
    units = sorted(folder.glob("distill-lall-s*.json"))
    if not units:
        return {"seeds": []}
    rows = [json.loads(u.read_text(encoding="utf-8"))["distill"] for u in units]
    return {**{k: round(statistics.fmean(r[k] for r in rows), 4) for k in rows[0]},
            "seeds": [int(u.stem.rsplit("-s", 1)[1]) for u in units]}


def unit(ns: argparse.Namespace, name: str, seed: int, side: str, run) -> dict:
    """One side's figures for one seed (harness.kept_unit: read back from --work when an earlier run finished
    this unit with the same settings, else run in a temporary folder and kept there)."""
    key = f"{name}-e{ns.epochs}-l{ns.limit or 'all'}-s{seed}-{side}.json"

    def fresh() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return run(Path(tmp))
    return kept_unit(ns.work / key if ns.work else None, key, fresh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["snips", "atis"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, help="first N rows of each split (a quick check, not the bench)")
    ap.add_argument("--sides", default="joint,single,peer", help="of joint, single, peer and joint_word (the joint model "
                                                                  "with joint.slot_loss word, for a choice on dev)")
    ap.add_argument("--work", type=Path, help="keep each (set, seed, side)'s figures here as JSON: a stopped run resumes "
                                                "where it stopped (without it, nothing is kept)")
    ap.add_argument("--distill-units", type=Path, help="bench/distill.py's kept units (its --work folder): their seeds' "
                                                       "means join the last line as \"distill\", the issue's one-line summary "
                                                       "(nothing is trained for them here)")
    ap.add_argument("--results", type=Path, help="also write this bench's results file (bench/results/multitask.json: "
                                                   "the benchmarks page renders it) from the figures")
    ns = ap.parse_args()
    sides = [s for s in ns.sides.split(",") if s]
    runners = {"joint": lambda d, w, s: run_joint(d, w, s, ns.epochs), "single": lambda d, w, s: run_single(d, w, s, ns.epochs),
               "peer": lambda d, w, s: run_peer(d, s, ns.epochs),
               "joint_word": lambda d, w, s: run_joint(d, w, s, ns.epochs, "word")}
    result: dict = {}
    seeds: dict[str, dict[str, list[dict]]] = {}
    for name in [ns.only] if ns.only else ["snips", "atis"]:
        data = splits(name, ns.limit)
        per_side: dict[str, list[dict]] = {s: [] for s in sides}
        for seed in range(42, 42 + ns.seeds):
            for side in sides:
                got = unit(ns, name, seed, side, lambda tmp, f=runners[side], d=data, s=seed: f(d, tmp, s))
                per_side[side].append(got)
                print(f"{name} seed {seed} {side}: " + ", ".join(f"{k} {got[k]:.4f}" for k in FIGURES), file=sys.stderr,
                      flush=True)
        seeds[name] = per_side
        result[name] = {side: mean_std(rows) for side, rows in per_side.items()}
        result[name]["published_bert_base"] = PUBLISHED[name]
        print(f"{name}: " + json.dumps(result[name]), file=sys.stderr, flush=True)
    if ns.distill_units:
        result["distill"] = distill_figures(ns.distill_units)
    if ns.results:
        from lmtune.io import write_json
        write_json(ns.results, results_doc(result, seeds, ns))
    print(json.dumps(result))


# ---- the results file (docs/hooks/benchmarks.py renders it) ---------------------------------------------
SIDE_NAMES = {"joint": "lmtune joint (one model)", "single": "lmtune single (intent model + slot model)",
              "peer": "HF recipe (two models)"}


def acceptance(figures: dict, per_seed: dict[str, list[dict]]) -> str:
    """Issue 49's four checks on one set, as sentences computed from the figures."""
    j, s = figures.get("joint"), figures.get("single")
    if not j or not s:
        return "The acceptance compares joint with single; this run has not both."
    ratio = j["texts_per_s"] / s["texts_per_s"]
    each = [a["texts_per_s"] / b["texts_per_s"] for a, b in zip(per_seed["joint"], per_seed["single"])]

    def point(k: str) -> str:
        d = 100 * (j[k] - s[k])
        return f"{d:+.2f} point ({'met' if d >= -0.5 else 'not met'}: within 0.5 of single or above)"
    sentence = 100 * (j["sentence_acc"] - s["sentence_acc"])
    return (f"Joint minus single: intent accuracy {point('intent_acc')}; slot F1 {point('slot_f1')}; sentence accuracy "
            f"{sentence:+.2f} point ({'met' if sentence >= 0 else 'not met'}: at or above single; single's seed std "
            f"{100 * s['sentence_acc_std']:.2f}). Throughput {ratio:.2f}x the two models' ({'met' if ratio >= 1.7 else 'not met'}: "
            f">= 1.7x; per seed " + ", ".join(f"{r:.2f}x" for r in each) + ").")


def results_doc(result: dict, seeds: dict, ns: argparse.Namespace) -> dict:
    from harness import code_version
    made = code_version()
    sections: list[dict] = [{"text": f"`python bench/multitask.py --seeds {ns.seeds} --epochs {ns.epochs}` (issue 49; one process, "
                                     "CPU, the packaged all-MiniLM-L6-v2): see the script's docstring for the sides, the data "
                                     "and how texts/s is measured. Means ± std over the seeds; test chooses nothing."}]
    for name, figures in result.items():
        rows = [[f"{SIDE_NAMES[side]}, {len(seeds[name][side])} seeds"]
                + [f"{figures[side][k]:.4f} ± {figures[side][k + '_std']:.4f}" for k in ("intent_acc", "slot_f1", "sentence_acc")]
                + [f"{figures[side][k]:.1f} ± {figures[side][k + '_std']:.1f}" for k in ("texts_per_s", "train_s")]
                for side in SIDE_NAMES if side in figures]
        pub = PUBLISHED[name]
        rows.append(["JointBERT, BERT-base (published)", f"{pub['intent_acc']:.3f}", f"{pub['slot_f1']:.3f}",
                     f"{pub['sentence_acc']:.3f}", "", ""])
        columns = [{"name": f"{name.upper()} (test)"}] + [{"name": c} for c in
                                                           ("intent acc", "slot F1", "sentence acc", "texts/s", "train s")]
        sections += [{"table": {"columns": columns, "rows": rows}}, {"text": acceptance(figures, seeds[name])}]
    first = next(iter(result))
    head = result[first]
    return {"bench": "multitask", "order": 22, "title": "Multi-task: one joint intent + slot model vs two models (issue 49)",
            "script": "bench/multitask.py", "command": f"python bench/multitask.py --seeds {ns.seeds} --work DIR --results FILE",
            "commit": made["commit"], "date": made["date"][:10], "machine": f"{os.cpu_count()} CPU cores",
            "headline": {"what": f"{first.upper()} intent + slots, texts/s of prediction", "lmtune": round(head["joint"]["texts_per_s"], 1)
                         if "joint" in head else "not measured", "against": "two single-task lmtune models",
                         "against_value": round(head["single"]["texts_per_s"], 1) if "single" in head else "not measured",
                         "decimals": 1},
            "sections": sections}


if __name__ == "__main__":
    main()
