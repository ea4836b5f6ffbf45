"""The training loop's fast path (train.compile, length_buckets, sync_free, prefetch): the same
optimisation as without it. Only its speed needs a GPU (bench/gpu_epoch.py); these run on CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForTokenClassification, AutoTokenizer

import lmtune
from lmtune.config import TrainConfig
from lmtune.tasks.base import input_pad_values
from lmtune.tasks.ner import NerTask
from lmtune.training.fast import FastPath, Prefetcher, bucket_widths, pad_to_bucket
from lmtune.training.loop import LoopTask, train_loop
from tests.test_ner import toy_ner, write_conll

ON = {"compile": "default", "length_buckets": "on", "sync_free": "on", "prefetch": "on", "step_graphs": "off"}
OFF = {"compile": "off", "length_buckets": "off", "sync_free": "off", "prefetch": "off", "step_graphs": "off"}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _long_ner(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Toy sentences of 5 to ~30 sub-tokens: batches fall in more than one length bucket."""
    short = toy_ner(3 * n, seed)
    return [(short[i][0] + short[i + 1][0] * (i // 3 % 3), short[i][1] + short[i + 1][1] * (i // 3 % 3)) for i in range(0, 3 * n, 3)]


def _config(task: str, tiny_config: dict, tmp_path) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["dropout"] = 0.0  # padding shifts a dropout mask's random draws; without dropout the runs must agree
    cfg["train"].update(max_steps=14, eval_every=7, lr=3e-4, head_lr=3e-4, calibrate=False)
    if task == "ner":
        cfg["task"] = "ner"
        cfg["data"] = {k: str(write_conll(tmp_path / f"{k}.conll", _long_ner(n, s)))
                       for k, n, s in (("train", 80, 1), ("dev", 24, 2), ("test", 24, 3))}
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "ner"])
def test_the_fast_path_trains_to_the_same_weights_with_few_compiles(task, tiny_config, tmp_path, caplog):
    import torch._dynamo
    cfg = _config(task, tiny_config, tmp_path)
    plain = lmtune.train({**cfg, "run_name": "plain", "train": {**cfg["train"], **OFF}})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = lmtune.train({**cfg, "run_name": "fast", "train": {**cfg["train"], **ON}})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    a, b = _weights(plain.model), _weights(fast.model)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    rows = [[json.loads(x) for x in (r.run_dir / "history.jsonl").read_text().splitlines()] for r in (plain, fast)]
    losses = [[h["train_loss"] for h in hist if "train_loss" in h] for hist in rows]
    assert len(losses[0]) == len(losses[1]) == 14 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    # one compile with dynamic shapes serves every bucket and batch size (the NER data's widths fall in
    # two or three buckets, the epoch's last batch is smaller): never a compile per batch
    assert 1 <= graphs <= 2, graphs


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_step_graphs_train_to_the_same_weights_and_fall_back_when_recording_fails(task, tiny_config, tmp_path, caplog,
                                                                                 monkeypatch):
    """The recorded step's plumbing (static inputs, the loss scale and learning rates as tensors the
    step reads, gradients written fresh): on CPU it runs without the CUDA graph itself, whose speed
    bench/gpu_epoch.py measures."""
    from lmtune.training import step_graphs
    cfg = _config(task, tiny_config, tmp_path)
    graphs_on = {**OFF, "length_buckets": "on", "sync_free": "on", "step_graphs": "on"}
    plain = lmtune.train({**cfg, "run_name": "plain", "train": {**cfg["train"], **OFF}})
    with caplog.at_level("INFO", logger="lmtune"):
        fast = lmtune.train({**cfg, "run_name": "graphs", "train": {**cfg["train"], **graphs_on}})
    recorded = caplog.text.count("steps through static buffers")
    assert recorded >= 1  # a shape seen more than WARMUP times went through the recorded step
    monkeypatch.setattr(step_graphs.StepGraphs, "_record", lambda self, batch: 1 / 0)
    with caplog.at_level("INFO", logger="lmtune"):
        fallback = lmtune.train({**cfg, "run_name": "fallback", "train": {**cfg["train"], **graphs_on}})
    assert "recording the training step as a CUDA graph failed (ZeroDivisionError" in caplog.text
    a = _weights(plain.model)
    for run in (fast, fallback):
        b = _weights(run.model)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    rows = [[json.loads(x) for x in (r.run_dir / "history.jsonl").read_text().splitlines()] for r in (plain, fast)]
    losses = [[(h["step"], h["train_loss"], h["lr"], h["grad_norm"]) for h in hist if "train_loss" in h] for hist in rows]
    assert len(losses[0]) == 14 and [r[0] for r in losses[0]] == [r[0] for r in losses[1]]
    assert [r[2] for r in losses[0]] == [r[2] for r in losses[1]]
    for col in (1, 3):  # the loss and the gradient norm (AdamW alone would hide a wrong loss scale)
        assert [r[col] for r in losses[0]] == pytest.approx([r[col] for r in losses[1]], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the CPU test above checks the plumbing)")
def test_on_a_gpu_recorded_steps_train_to_the_same_weights_as_eager_ones(tiny_model, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    features = _ner_features(200, 7, tok)
    pads = {**input_pad_values(tok), "labels": -100}
    task = NerTask()
    weights = []
    for graphs in ("off", "on"):
        torch.manual_seed(0)
        model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=2, hidden_dropout_prob=0.0,
                                                                attention_probs_dropout_prob=0.0)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, head_lr=1e-3, progress="none", precision="fp32",
                          **{**OFF, "length_buckets": "on", "sync_free": "on", "prefetch": "on", "step_graphs": graphs})
        loop_task = LoopTask(lambda items: task.collate(items, tok), task.loss, task.num_items, None, pad_values=pads)
        with caplog.at_level("INFO", logger="lmtune"):
            train_loop(model, features, loop_task, cfg, None, Accelerator())
        weights.append(_weights(model))
    assert "the training step recorded as a CUDA graph" in caplog.text and "failed" not in caplog.text
    a, b = weights  # fp32; the graphs replay the eager kernels, but cuBLAS may pick other algorithms per stream
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def _ner_features(n: int, seed: int, tok) -> list[dict]:
    """Tokenized toy NER sentences (first sub-token labelled), lengths 3..~25."""
    out = []
    for words, tags in toy_ner(n, seed):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=64)
        ids = enc["input_ids"]
        seen, labels = set(), []
        for w in enc.word_ids():
            labels.append(-100 if w is None or w in seen else (0 if tags[w] == "O" else 1))
            seen.add(w)
        out.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return out


def test_length_buckets_keep_each_batchs_sentences_and_pad_to_a_bucket(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    features = _ner_features(60, 5, tok)
    pads = {**input_pad_values(tok), "labels": -100}
    for switches, expect_buckets in ((OFF, False), ({**OFF, "length_buckets": "on", "prefetch": "on"}, True)):
        seen: list[tuple] = []

        def collate(items, seen=seen):
            seen.append(tuple(tuple(f["input_ids"]) for f in items))
            return NerTask().collate(items, tok)

        widths: list[int] = []
        torch.manual_seed(0)
        model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=2)

        def loss(outputs, batch, widths=widths):
            widths.append(batch["labels"].shape[1])
            return torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1), batch["labels"].flatten(),
                                                     reduction="sum")

        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, head_lr=1e-3, progress="none", **switches)
        task = LoopTask(collate, loss, lambda fs: sum(x != -100 for f in fs for x in f["labels"]), None, pad_values=pads)
        train_loop(model, features, task, cfg, None, Accelerator(cpu=True))
        if not expect_buckets:
            plain_batches, plain_widths = list(seen), list(widths)
        else:
            assert seen == plain_batches  # the same sentences, in the same order, form each batch
            buckets = bucket_widths(max(f["length"] for f in features))
            assert all(w in buckets for w in widths) and widths != plain_widths
            assert all(w >= p for w, p in zip(widths, plain_widths))


def test_pad_to_bucket_pads_declared_keys_with_their_values_only():
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.zeros(2, 5, dtype=torch.long), "other": torch.zeros(2, 3)}
    out = pad_to_bucket(batch, (4, 8, 16), {"input_ids": 7, "attention_mask": 0, "labels": -100})
    assert out["input_ids"].shape == (2, 8) and out["input_ids"][:, 5:].eq(7).all() and out["input_ids"][:, :5].eq(1).all()
    assert out["attention_mask"][:, 5:].eq(0).all() and out["labels"][:, 5:].eq(-100).all()
    assert out["other"] is batch["other"]
    assert pad_to_bucket(batch, (4,), {"input_ids": 0})["input_ids"].shape == (2, 5)  # wider than every bucket: as is
    assert bucket_widths(100) == (16, 32, 64, 104) and bucket_widths(10) == (16,)


def test_the_prefetcher_keeps_order_and_raises_the_threads_error():
    steps = [[[i], [i + 100]] for i in range(30)]
    got = list(Prefetcher(steps, lambda idx: idx[0], depth=2))
    assert got == [[i, i + 100] for i in range(30)]

    def broken(idx):
        if idx[0] == 5:
            raise ValueError("bad batch")
        return idx[0]
    feed = Prefetcher(steps, broken)
    with pytest.raises(ValueError, match="bad batch"):
        list(feed)


def test_auto_turns_the_fast_path_on_with_cuda_only_and_says_why_a_piece_is_off(caplog):
    from lmtune.training.fast import resolve
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve(TrainConfig(), cpu, 40, {}) == FastPath(None, (), False, False, False)
    # on a GPU the whole step is recorded per bucket, uncompiled unless asked
    assert resolve(TrainConfig(), cuda, 40, {}) == FastPath(None, (16, 32, 40), True, True, True)
    assert resolve(TrainConfig(compile="default"), cuda, 40, {}) == FastPath("default", (16, 32, 40), True, True, True)
    with caplog.at_level("INFO", logger="lmtune"):
        assert resolve(TrainConfig(), cuda, 40, None, "hooks change the forward pass") == FastPath(None, (), True, True, False)
        assert resolve(TrainConfig(compile="reduce-overhead"), cpu, 40, None).compile_mode == "default"
        # several processes: forward and backward graphs only, as before
        assert resolve(TrainConfig(), cuda, 40, {}, None, "several processes") == FastPath(
            "reduce-overhead", (16, 32, 40), True, True, False)
        assert not resolve(TrainConfig(sync_free="off"), cuda, 40, {}).step_graphs
    assert "train.compile off: hooks" in caplog.text and "CUDA graphs need a GPU" in caplog.text
    assert "length buckets off" in caplog.text and "train.step_graphs off: several processes" in caplog.text
    assert "checks each loss on the host" in caplog.text
    # a task whose batches keep their own widths gets no CUDA graphs: one would be recorded per width
    assert resolve(TrainConfig(), cuda, 40, None) == FastPath("default", (), True, True, False)
    with caplog.at_level("INFO", logger="lmtune"):  # the step graphs' own reasons also say why compile falls back
        assert resolve(TrainConfig(compile="reduce-overhead", step_graphs="on"), cuda, 40, {}).compile_mode == "default"
    assert "the step graphs record the whole step" in caplog.text
    assert resolve(TrainConfig(length_buckets="off"), cuda, 40, {}).compile_mode == "default"
    assert resolve(TrainConfig(compile="reduce-overhead"), cuda, 40, {}).step_graphs is False
    assert resolve(TrainConfig(compile="off"), cuda, 40, {}) == FastPath(None, (16, 32, 40), True, True, True)


def test_the_gpu_bench_says_it_needs_a_gpu_and_exits_0_without_one():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_epoch.py")], capture_output=True, text=True,
                          timeout=300, cwd=root, check=False, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs a CUDA GPU" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ner": None, "classification": None, "skipped": "no CUDA GPU"}
