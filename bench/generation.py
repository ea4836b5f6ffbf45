"""Dialogue summarization with the packaged decoder: zero-shot vs lmtune LoRA SFT vs TRL's SFTTrainer,
and SmolLM2 as a sequence classifier beside MiniLM. One process, CPU.

Data (read from ../shared/data, never copied): DialogSum. Train: a seeded 600-dialogue sample of
train_sample_5000.jsonl. Dev (lmtune's early-stopping loss and decoding search): a seeded 60 of the
official dev set. Test: a seeded 150 of the official test set among the dialogues of at most 400
SmolLM2 tokens (26 of 500 are longer; dropped, as ../shared/data/dialogsum/README.md allows), each
scored against all three references (rouge-score, best reference, stemmed).

Every model reads the same prompt: the tokenizer's chat template over "Summarize the dialogue.\n\n"
+ the dialogue; greedy decoding with max_new_tokens 64 for zero-shot and TRL (the usual recipe), and
lmtune's decoding chosen on dev by its own search (its defaults).
- zero_shot: the packaged SmolLM2-135M-Instruct (its 4-bit GGUF, dequantized), untrained.
- lmtune: `task: generation` with its defaults (LoRA r 8 on every linear layer, LoRA's lr 1e-3, batch 8,
  1 epoch, loss on the summary tokens only).
- trl: SFTTrainer, prompt-completion conversational data (completion-only loss), LoRA with the same
  rank / alpha / dropout / target modules, lr 2e-4, batch 8, 1 epoch, no packing, fp32 on CPU.
train_s: lmtune's training loop (its one dev evaluation included); TRL's trainer.train().
repeat_share: outputs with a repetition loop (lmtune.generate_control.has_loop), the same check for all.
sst2_decoder: bench/decoder_classification.py's SmolLM2 LoRA classifier, run here (--skip-sst2 skips it).

Last line JSON: {"dialogsum": {"zero_shot": {"rougeL": R, "repeat_share": P}, "lmtune": {"rougeL": R,
"repeat_share": P, "train_s": S}, "trl": {...}}, "sst2_decoder": {"accuracy": A, "train_s": S}}
Usage: python bench/generation.py [--train N] [--test N] [--skip-sst2] [--skip-trl]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lmtune import train  # noqa: E402
from lmtune.config import build_config  # noqa: E402
from lmtune.generate_control import score  # noqa: E402
from lmtune.tasks import get_task  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED, MAX_NEW = 42, 64
INSTRUCTION = "Summarize the dialogue."
DIALOGSUM = SHARED / "dialogsum"


def rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DIALOGSUM / name).read_text(encoding="utf-8").splitlines() if x.strip()]


def sample(items: list, n: int, seed: int) -> list:
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))]


def write(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def data(work: Path, n_train: int, n_test: int, tokenizer) -> dict:
    train_rows = sample(rows("train_sample_5000.jsonl"), n_train, SEED)
    dev_rows = sample(rows("dialogsum.dev.jsonl"), 60, SEED)
    short = [r for r in rows("dialogsum.test.jsonl") if len(tokenizer(r["dialogue"])["input_ids"]) <= 400]
    test_rows = sample(short, n_test, SEED)
    return {"train": write(work / "train.jsonl", train_rows), "dev": write(work / "dev.jsonl", dev_rows),
            "test": write(work / "test.jsonl", test_rows), "train_rows": train_rows}


def config(work: Path, files: dict) -> dict:
    return {"task": "generation", "output_dir": str(work / "runs"), "run_name": "lmtune", "model": {"name": MODEL},
            "data": {"train": files["train"], "dev": files["dev"], "test": files["test"], "text_column": "dialogue",
                     "label_column": "summary"},
            "generate": {"instruction": INSTRUCTION, "max_new_tokens": MAX_NEW,
                         "reference_columns": ["summary1", "summary2", "summary3"]},
            "train": {"seed": SEED, "progress": "bar"}}


def evaluate(task, model, tokenizer, examples, settings: dict) -> dict:
    out = task.generate(model, tokenizer, examples, torch.device("cpu"), settings, progress="bar")  # the config's 64 tokens, or the cap chosen on dev
    m = score(examples, out)
    return {"rougeL": round(100 * m["rougeL"], 2), "rouge1": round(100 * m["rouge1"], 2), "rouge2": round(100 * m["rouge2"], 2),
            "repeat_share": round(m["repeat_share"], 4), "truncated_share": round(m["truncated_share"], 4),
            "invented_share": round(m["invented_share"], 4), "length_ratio": round(m["length_ratio"], 3)}


def run_trl(task, cfg, train_rows: list[dict], work: Path) -> tuple:
    """TRL's SFTTrainer with LoRA on the same dequantized weights, same prompts, completion-only loss."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    model, tokenizer = task.build_model(cfg, ["output"])
    model.config.use_cache = True
    p = cfg.peft
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n\n{r['dialogue']}"}],
                             "completion": [{"role": "assistant", "content": r["summary"]}]} for r in train_rows])
    args = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=8, learning_rate=2e-4, num_train_epochs=1,
                     lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01, max_length=cfg.data.max_length,
                     completion_only_loss=True, packing=False, use_cpu=True, bf16=False, fp16=False, report_to="none",
                     save_strategy="no", logging_steps=10, seed=SEED, dataloader_num_workers=0)
    lora = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return trainer.model.eval(), tokenizer, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--skip-sst2", action="store_true")
    ap.add_argument("--skip-trl", action="store_true", help="zero-shot vs lmtune only (the issue's size without TRL fits ~40 min)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task = get_task("generation")
        raw = config(work, {"train": "", "dev": "", "test": ""})
        cfg0 = build_config(raw)
        task.configure(cfg0)
        base, tokenizer = task.build_model(cfg0, ["output"])
        files = data(work, args.train, args.test, tokenizer)
        cfg = build_config(config(work, files))
        test = task.read_file(files["test"], cfg)
        print(f"dialogsum: train {args.train}, dev 60, test {len(test)} (<= 400 tokens)", file=sys.stderr)

        result = {"dialogsum": {"zero_shot": evaluate(task, base, tokenizer, test, {})}}
        print("zero-shot", result["dialogsum"]["zero_shot"], file=sys.stderr)
        del base

        run = train(cfg)
        t = run.metrics["train"]
        lm = evaluate(run.task, run.model, run.tokenizer, test, run.task.decoding)
        lm["train_s"] = round(t["train_seconds"], 1)
        lm["decoding"] = run.task.decoding
        result["dialogsum"]["lmtune"] = lm
        print("lmtune", lm, file=sys.stderr)
        del run

        d = result["dialogsum"]
        print(f"ROUGE-L: lmtune {lm['rougeL']} vs zero-shot {d['zero_shot']['rougeL']} "
              f"({lm['rougeL'] - d['zero_shot']['rougeL']:+.2f} points)")
        if not args.skip_trl:
            trl_task = get_task("generation")
            trl_task.configure(cfg)
            model, tok, seconds = run_trl(trl_task, cfg, files["train_rows"], work)
            tr = evaluate(trl_task, model, tok, test, {})
            tr["train_s"] = round(seconds, 1)
            d["trl"] = tr
            print("trl", tr, file=sys.stderr)
            del model
            print(f"ROUGE-L: lmtune {lm['rougeL']} vs TRL {tr['rougeL']} ({lm['rougeL'] - tr['rougeL']:+.2f} points)")
            print(f"train time: lmtune {lm['train_s']} s vs TRL {tr['train_s']} s (ratio {lm['train_s'] / tr['train_s']:.2f}); "
                  f"repetition loops: lmtune {lm['repeat_share']:.1%} vs TRL {tr['repeat_share']:.1%}")
        if not args.skip_sst2:
            sys.path.insert(0, str(ROOT / "bench"))
            from decoder_classification import results
            dec, enc = results(work / "sst2" if (work / "sst2").mkdir() is None else work)
            result["sst2_decoder"] = {**dec, "encoder_minilm": enc}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
