"""GGUF export of a generation run, for llama.cpp (and Ollama, LM Studio): `lmtune export RUN_DIR --format
gguf [--quantize f16|q8_0|q4_k_m]`.

The conversion is written here for the Llama architecture (LlamaForCausalLM: SmolLM2, Llama 3):
llama.cpp's own convert_hf_to_gguf.py is not installable as a module from a package registry (it only sits
inside llama-cpp-python's source distribution, outside its Python package), so this module follows its
LlamaModel with the `gguf` package, which is: GGUFWriter, the HF -> GGUF tensor names of
gguf.get_tensor_name_map, SpecialVocab for merges and special tokens, gguf.quants for q8_0. The LoRA is
merged first. q4_k_m goes through llama.cpp's own quantizer (llama_cpp.llama_model_quantize) from the
f16 file, since k-quants have no numpy implementation in `gguf`.

Verified like the ONNX export: greedy continuations of dev prompts (the run's own prompt format / chat
template, the same prompt token ids on both sides) by llama.cpp and by the PyTorch merged model, compared
token by token. Without llama-cpp-python, transformers loads the GGUF back (dequantizing it) and its
logits and greedy tokens are compared instead; the report says which verifier ran.

RUN_DIR/gguf/model.<quantize>.gguf is written temp + rename, and gguf/gguf.json records each
quantization's file, size and verification. GGUF has its own folder: an ONNX export rebuilds export/ whole.

Tokenizers: byte-level BPE ones (GPT-2's scheme: SmolLM2, Llama 3) are written as llama.cpp's "gpt2"
vocab with the pre-tokenizer llama.cpp knows them by; SentencePiece-style ones (byte_fallback, Metaspace:
Llama 2, TinyLlama) and BPE ones whose pre-tokenizer llama.cpp has no name for are refused, as llama.cpp's
converter refuses them, rather than written as a file that tokenizes text differently from the model.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.io import atomic_path, write_json
from lmtune.registry import exporters

log = logging.getLogger("lmtune")

QUANTS = ("f16", "q8_0", "q4_k_m")
ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA_CPP_MISSING = ("export: --quantize q4_k_m needs llama-cpp-python (pip install llama-cpp-python, lmtune's gguf "
                     "extra; python3 dev.py setup installs it)")

# llama.cpp picks the pre-tokenizer (tokenizer.ggml.pre: how text is split before BPE) by hashing the token
# ids of this text (convert_hf_to_gguf.py, get_vocab_base_pre). The hashes below are copied from there for
# the Llama-architecture tokenizers lmtune users fine-tune most.
_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 '
               '33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
               '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
               '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


# ---- the public functions ----------------------------------------------------------------------------

def export_gguf(run_dir: str | Path, *, quantize: str = "f16", sample: int = 20) -> dict:
    """Write RUN_DIR/gguf/model.<quantize>.gguf from the run's merged model, verify it on `sample` dev
    prompts, record it in gguf/gguf.json and return that record."""
    from lmtune.export import check_request
    rd = RunDir(run_dir)
    check_request("gguf", rd.root, quantize)
    if sample < 1:
        raise InputError(f"--sample must be >= 1, got {sample}.")
    if quantize == "q4_k_m":
        _import_llama_cpp()  # before any work: the error names the missing package
    from lmtune.inference import load
    run = load(rd.root)
    pre = llama_cpp_pre_tokenizer(run.tokenizer)  # refuses what llama.cpp would tokenize wrongly, before any work
    model = _merged_llama(run)
    prompts, references = _dev_prompts(run, sample)
    out = rd.gguf / f"model.{quantize}.gguf"
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        if quantize == "q4_k_m":
            _write_q4_k_m(model, run.tokenizer, tmp, _general_name(run, rd))
        else:
            write_llama_gguf(model, run.tokenizer, tmp, quantize, _general_name(run, rd))
        # verified before the rename: a file that cannot be read back is never left in gguf/
        export_s = time.perf_counter() - t0
        verify = _verify(tmp, model, run.tokenizer, prompts, references, _max_new_tokens(run), _stop_ids(run.tokenizer, model))
    report = {"path": str(out), "bytes": out.stat().st_size, "quantize": quantize, "run_dir": str(rd.root), "pre_tokenizer": pre,
              "merged_adapter": run.config.peft.method if run.config.peft.method != "none" else None,
              "export_s": round(export_s, 3), "verify": verify}
    _record(rd, report)
    log.info("gguf %s: %s (%.1f MB); %s verifier: token agreement %.3f, identical outputs %.3f, same top token %s on %d "
             "dev prompts", quantize, out, report["bytes"] / 1e6, verify["verifier"], verify["token_agreement"],
             verify["identical_share"], f"{verify['same_top_share']:.4f}" if "same_top_share" in verify else "n/a",
             verify["prompts"])
    return report


def llama_cpp_greedy(gguf_path: str | Path, prompt_ids: list[list[int]], max_new_tokens: int,
                     stop_ids: set[int] | None = None, forced: list[list[int]] | None = None) -> list:
    """Greedy continuations by llama.cpp (llama-cpp-python, CPU) of each prompt, given as token ids (no BOS
    is added: the ids are the prompt as the run's tokenizer made it). Stops at the model's end-of-text or
    any of `stop_ids` (not included) or after max_new_tokens.

    Through llama-cpp-python's low-level API rather than llama_cpp.Llama, for one setting Llama does not
    expose: use_extra_bufts=False. llama.cpp's extra CPU buffer types (AMX / repacked weight layouts)
    crashed the process (segfault in llama_decode) for every quantized tensor on an AMX Xeon with
    llama-cpp-python 0.3.36, the packaged SmolLM2 Q4_1 GGUF included; the plain CPU kernels compute the
    same quantized dot products. Greedy here is the argmax of the last position's logits.

    With `forced` (one continuation per prompt, e.g. PyTorch's greedy one), llama.cpp reads that
    continuation instead of its own and returns, per prompt, a list of booleans: whether its top token at
    each step equals the forced one (after a continuation that stopped early: whether it would stop too).
    This is llama.cpp's own yardstick of a quantization ("same top p" of llama-perplexity
    --kl-divergence): one step's agreement, free of the cascade after a first difference."""
    lc = _import_llama_cpp()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers, mp.use_extra_bufts = 0, False
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    try:
        vocab = lc.llama_model_get_vocab(model)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        stops = set(stop_ids or ()) | {lc.llama_vocab_eos(vocab)}
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max((len(p) for p in prompt_ids), default=0) + max_new_tokens + 8
        cp.n_threads = cp.n_threads_batch = max(1, min(4, os.cpu_count() or 1))
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {gguf_path}")
        try:
            if forced is not None:
                return [_forced_top(lc, ctx, list(ids), list(f), n_vocab, max_new_tokens, stops)
                        for ids, f in zip(prompt_ids, forced)]
            return [_greedy_one(lc, ctx, list(ids), n_vocab, max_new_tokens, stops) for ids in prompt_ids]
        finally:
            lc.llama_free(ctx)
    finally:
        lc.llama_model_free(model)


def _greedy_one(lc, ctx, ids: list[int], n_vocab: int, max_new_tokens: int, stops: set[int]) -> list[int]:
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)  # each prompt starts from an empty KV cache
    out: list[int] = []
    feed = ids
    while len(out) < max_new_tokens and feed:
        tokens = (lc.llama_token * len(feed))(*feed)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(feed))) != 0:
            raise RuntimeError("llama.cpp failed to decode a batch")
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        tok = int(logits.argmax())
        if tok in stops:
            break
        out.append(tok)
        feed = [tok]
    return out


def _forced_top(lc, ctx, ids: list[int], forced: list[int], n_vocab: int, max_new_tokens: int,
                stops: set[int]) -> list[bool]:
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    same: list[bool] = []
    feed = ids
    expected = forced + ([None] if len(forced) < max_new_tokens else [])  # None: the reference stopped there
    for want in expected:
        tokens = (lc.llama_token * len(feed))(*feed)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(feed))) != 0:
            raise RuntimeError("llama.cpp failed to decode a batch")
        top = int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())
        same.append(top in stops if want is None else top == want)
        if want is None:
            break
        feed = [want]
    return same


def torch_greedy(model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int,
                 stop_ids: set[int] | None = None) -> list[list[int]]:
    """The same greedy continuations by a PyTorch causal LM (one prompt at a time: no padding)."""
    stops = set(stop_ids or ())
    outputs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids], dtype=torch.long)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=sorted(stops) or None, pad_token_id=min(stops) if stops else 0,
                               use_cache=True, num_beams=1, repetition_penalty=1.0)[0, len(ids):].tolist()
            out = []
            for tok in y:
                if tok in stops:
                    break
                out.append(int(tok))
            outputs.append(out)
    return outputs


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How closely two lists of continuations agree: the share of generated positions (up to the longer of
    each pair) where the tokens are equal, counting every position after a pair's first divergence as
    disagreeing, and the share of identical continuations. A position one side did not generate (it
    stopped earlier) disagrees: a verifier that stops at once must not score as full agreement."""
    agree = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        first_diff = next((i for i in range(n) if x[i] != y[i]), n)
        agree, total = agree + first_diff, total + max(len(x), len(y))
    identical = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
    return {"token_agreement": agree / total if total else float(identical == 1.0), "identical_share": identical}


# ---- conversion ----------------------------------------------------------------------------------------

def write_llama_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, quantize: str = "f16",
                     name: str = "lmtune model") -> None:
    """A LlamaForCausalLM (no adapter) and its tokenizer as a GGUF file llama.cpp loads: f16 or q8_0 weights,
    1-D tensors (norms) in f32 as llama.cpp keeps them."""
    import gguf
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, cfg, quantize, name)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    for gguf_name, array, qtype in _tensors(model, quantize):
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hparams(writer, cfg, quantize: str, name: str) -> None:
    import gguf
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize])
    scaling = _rope_scaling(cfg)
    if scaling:  # linear position interpolation: llama.cpp reads the factor from the metadata
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling))


def _rope_parameters(cfg) -> dict:
    # transformers 5 keeps rope_theta and the scaling in config.rope_parameters; older ones in rope_theta / rope_scaling
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def _rope_theta(cfg) -> float:
    return _rope_parameters(cfg).get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def _rope_scaling(cfg) -> float | None:
    """The linear RoPE scaling factor, None for plain RoPE; other scalings (llama3, yarn ...) are refused
    rather than exported as a model that would compute something else in llama.cpp."""
    params = _rope_parameters(cfg)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return params["factor"]
    raise InputError(f"export: --format gguf writes plain or linear RoPE; this model uses {kind!r} RoPE scaling, which "
                     "lmtune's Llama conversion does not write.")


def _tensors(model: torch.nn.Module, quantize: str):
    """(GGUF name, array, raw dtype or None) for each weight: q/k rows permuted to llama.cpp's RoPE layout,
    the output layer left out when it is tied to the embeddings (llama.cpp then reads token_embd)."""
    import gguf
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"export: the model has a tensor {hf_name!r} that the GGUF Llama layout has no name for; "
                             f"--format gguf supports {_supports()}.")
        w = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            w = permute_for_llama_cpp(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_for_llama_cpp(w, n_kv)
        yield (gguf_name, *_encode(w.numpy(), quantize))


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF Llama's q/k projection rows hold each head's RoPE pairs as (first half, second half); llama.cpp
    rotates adjacent pairs, so each head's rows are interleaved (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, quantize: str) -> tuple[np.ndarray, Any]:
    """1-D tensors in f32 (as llama.cpp keeps norms); 2-D in f16, or q8_0 where a row is whole blocks of 32."""
    import gguf
    if w.ndim < 2:
        return w.astype(np.float32), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    if quantize == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
        return gguf.quants.quantize(w, q8), q8
    return w.astype(np.float16), None


def _add_tokenizer(writer, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens and their types, merges, special
    ids, whether a BOS is added, and the chat template."""
    import gguf
    pre = llama_cpp_pre_tokenizer(tokenizer)
    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:  # SpecialVocab reads the merges and special tokens from the files
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise InputError("export: the run's tokenizer has no BPE merges to write; llama.cpp could not tokenize with it.")
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    # what the tokenizer does, not what its config says: llama.cpp adds a BOS exactly when this is true
    special.add_special_token["bos"] = _adds_bos(tokenizer)
    special.chat_template = getattr(tokenizer, "chat_template", None) or None
    special.add_to_gguf(writer, quiet=True)


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below the model's vocab size: its token and type (llama.cpp's get_vocab_base): ids the
    tokenizer lacks are [PADi] (unused), special added tokens are control tokens."""
    import gguf
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


TOKENIZERS_SUPPORTED = ("--format gguf writes byte-level BPE tokenizers (GPT-2's scheme, as SmolLM2 and Llama 3 have) "
                        "whose pre-tokenizer llama.cpp knows")


def llama_cpp_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre), or InputError for a tokenizer
    that a "gpt2" vocab would not reproduce. Known hashes of the check text's ids first (as llama.cpp's
    converter finds it); else a tokenizer built exactly as GPT-2's (byte-level split with GPT-2's regex, no
    normalizer, merges applied to every word) is "gpt-2", the split llama.cpp implements for that name,
    whatever its vocabulary. Anything else is refused, as llama.cpp's converter refuses an unknown hash:
    llama.cpp's "default" split differs (digits, punctuation), so text would be tokenized differently."""
    spec = _backend_spec(tokenizer)
    if _sentencepiece_style(spec):
        raise InputError(f"export: this run's tokenizer is SentencePiece-style (byte_fallback / Metaspace '▁', as Llama 2 "
                         f"and TinyLlama have), which lmtune does not write as llama.cpp's 'llama' vocab; {TOKENIZERS_SUPPORTED}.")
    if spec.get("model", {}).get("type") != "BPE":
        raise InputError(f"export: this run's tokenizer is not a BPE tokenizer (a tokenizer.json with a BPE model); "
                         f"{TOKENIZERS_SUPPORTED}.")
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest in _KNOWN_PRE:
        return _KNOWN_PRE[digest]
    if _is_gpt2_byte_level(spec):
        return "gpt-2"
    raise InputError(f"export: llama.cpp has no name for this tokenizer's pre-tokenizer (check-text hash {digest[:16]}..., "
                     f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}), so it would split text differently "
                     f"from the model's own tokenizer; {TOKENIZERS_SUPPORTED} (SmolLM2, Llama 3, GPT-2's).")


def _backend_spec(tokenizer: Any) -> dict:
    """The fast tokenizer's tokenizer.json as a dict ({} for a slow tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        return {}
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _sentencepiece_style(spec: dict) -> bool:
    """Llama 2 / TinyLlama's fast tokenizers: BPE over '▁'-joined words (Metaspace pre-tokenizer, or a
    normalizer replacing spaces by '▁') with byte_fallback to <0xNN> tokens, which llama.cpp reads only as
    its SentencePiece ("llama") vocab with scores and byte tokens."""
    steps = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)
    return bool(spec.get("model", {}).get("byte_fallback")) or "Metaspace" in steps or "ByteFallback" in steps or "▁" in steps


def _is_gpt2_byte_level(spec: dict) -> bool:
    pre, dec = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space") and dec.get("type") == "ByteLevel"
            and not spec["model"].get("ignore_merges"))


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _write_q4_k_m(model: torch.nn.Module, tokenizer: Any, out: Path, name: str) -> None:
    """q4_k_m by llama.cpp's own quantizer, from an f16 file written beside the output (removed after)."""
    llama_cpp = _import_llama_cpp()
    fd, f16 = tempfile.mkstemp(prefix=".model.f16.", suffix=".gguf.tmp", dir=out.parent)
    os.close(fd)
    try:
        write_llama_gguf(model, tokenizer, f16, "f16", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = max(1, min(4, os.cpu_count() or 1))
        rc = llama_cpp.llama_model_quantize(f16.encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed (return code {rc}) on {f16}")
    finally:
        Path(f16).unlink(missing_ok=True)


def _supports() -> str:
    return exporters.meta("gguf", "supports")


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise InputError(LLAMA_CPP_MISSING) from None
    # llama-cpp-python's log callback prints llama.cpp's loader and quantizer lines (one per tensor) unless its
    # logger is at ERROR (what Llama(verbose=False) sets)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the run ---------------------------------------------------------------------------------------------

def _merged_llama(run) -> torch.nn.Module:
    """The run's model with its adapter folded in, on CPU in float32; a non-Llama model is refused."""
    from lmtune.export import merged_model
    model = merged_model(run, "a GGUF file")
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise InputError(f"export: --format gguf supports {_supports()}; this run's model is {arch}.")
    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise InputError("export: --format gguf writes Llama models without attention/MLP biases; this one has them.")
    _rope_scaling(cfg)  # refuses what the conversion would get wrong, before anything is written
    model.config.use_cache = True  # the run keeps the forward cache off for training; greedy decoding wants it
    return model.to(torch.float32)


def _dev_prompts(run, sample: int) -> tuple[list[list[int]], list[list[str]]]:
    """The first `sample` dev prompts as token ids, in the run's own prompt format (its chat template),
    and their references."""
    try:
        dev = run.task.read(run.config).dev[:sample]
    except InputError as e:
        raise InputError(f"export verifies on the run's dev data, which could not be read: {e}") from None
    if not dev:
        raise InputError("export: the run has no dev examples to verify the GGUF file on.")
    return [run.task.prompt_ids(ex, run.tokenizer) for ex in dev], [ex.references for ex in dev]


def _max_new_tokens(run) -> int:
    return int(run.task.decoding.get("max_new_tokens") or run.task.max_new_tokens)


def _stop_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _general_name(run, rd: RunDir) -> str:
    return f"{Path(str(run.config.model.name)).name} (lmtune run {rd.root.name})"


def _verify(path: Path, model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], references: list[list[str]],
            max_new_tokens: int, stops: set[int]) -> dict:
    """Greedy continuations by the GGUF file (llama.cpp, else transformers' dequantized load) against the
    PyTorch model's, from the same prompt ids; transformers also gives the max |logit difference|."""
    ref = torch_greedy(model, prompts, max_new_tokens, stops)
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens}
    if llama_cpp_available():
        out["verifier"] = "llama.cpp"
        got = llama_cpp_greedy(path, prompts, max_new_tokens, stops)
        steps = [x for row in llama_cpp_greedy(path, prompts, max_new_tokens, stops, forced=ref) for x in row]
        # a quantized file's greedy output parts from PyTorch's at the first near-tie and differs after it;
        # the same top token at each step of PyTorch's own continuation is the stated tolerance for those
        out["same_top_share"] = sum(steps) / len(steps) if steps else 1.0
    else:
        out["verifier"] = "transformers"
        loaded = load_gguf_with_transformers(path)
        out["max_abs_logit_diff"] = max_logit_diff(model, loaded, prompts)
        got = torch_greedy(loaded, prompts, max_new_tokens, stops)
    out.update(token_agreement(got, ref))
    if all(references):
        from lmtune.generate_control import rouge
        out["rougeL_torch"] = rouge(references, tokenizer.batch_decode(ref, skip_special_tokens=True))["rougeL"]
        out["rougeL_gguf"] = rouge(references, tokenizer.batch_decode(got, skip_special_tokens=True))["rougeL"]
    return out


def load_gguf_with_transformers(path: str | Path) -> torch.nn.Module:
    """The GGUF file loaded back by transformers (its tensors dequantized to float32, q/k un-permuted)."""
    from transformers import AutoModelForCausalLM
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config.use_cache = True
    return model.eval()


def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, prompts: list[list[int]]) -> float:
    """max |logit difference| of two causal LMs over every position of the prompts."""
    diff = 0.0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long)
            diff = max(diff, float((a(input_ids=x).logits - b(input_ids=x).logits).abs().max()))
    return diff


def _record(rd: RunDir, report: dict) -> None:
    """gguf/gguf.json: one entry per quantization exported (each export replaces its own entry)."""
    manifest = json.loads(rd.gguf_report.read_text()) if rd.gguf_report.is_file() else {}
    manifest[report["quantize"]] = report
    write_json(rd.gguf_report, manifest)
