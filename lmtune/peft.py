"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, IA3, prefix and prompt tuning through `peft`,
and a bottleneck adapter of our own.

The task head is always trainable and saved with the adapter (peft's `modules_to_save`).
AdaLoRA's rank allocator is stepped after every optimizer step (a step hook of the loop) with the
run's real total step count, and its orthogonality regulariser is added to our summed loss
(peft adds it only to `outputs.loss`, which lmtune does not use).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from lmtune.config import PeftConfig
from lmtune.errors import InputError
from lmtune.models import is_bare_backbone
from lmtune.registry import peft_methods

ADAPTER_FILE = "lmtune_adapter.safetensors"
ADAPTER_CONFIG = "lmtune_adapter.json"
# Which methods can be merged into the weights, and each one's default learning rate, are the
# registry's metadata (lmtune/registrations.py).


def mergeable() -> tuple[str, ...]:
    return peft_methods.names(mergeable=True)


def can_disable(method: str) -> bool:
    """Whether a run of this method can switch its adapter off (peft's disable_adapter) and so run as the
    model it started from: the registry's declared `disables` (lmtune/registrations.py)."""
    return method in peft_methods and bool(peft_methods.meta(method, "disables", False))


def default_lr(method: str) -> float:
    """PEFT methods train few weights and need larger steps than full fine-tuning."""
    return peft_methods.meta(method, "default_lr")


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level modules with weights outside the base model: the task head (e.g. 'classifier')."""
    if is_bare_backbone(model):  # a bare encoder (AutoModel): no head at all
        return []
    prefix = getattr(model, "base_model_prefix", "")
    # a language model's output layer is pretrained (often tied to the input embeddings): not a new head
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, mod in model.named_children()
            if name != prefix and mod is not lm_head and any(True for _ in mod.parameters())]


def apply_peft(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    """Wrap the model with the registered builder of cfg.method ("none": full fine-tuning)."""
    if cfg.method == "none":
        return model
    return peft_methods.get(cfg.method)(model, cfg, task_type, total_steps)


def _common(model: torch.nn.Module, cfg: PeftConfig, task_type: str) -> dict:
    return {"task_type": task_type, "modules_to_save": head_modules(model)}


def _wrap(model: torch.nn.Module, pc, method: str) -> torch.nn.Module:
    import peft as hf_peft
    try:
        return hf_peft.get_peft_model(model, pc)
    except ValueError as e:
        raise InputError(f"peft: cannot apply {method} to this model: {e}. Set peft.target_modules.") from None


# Builders, one per registered method (lmtune/registrations.py): (model, cfg, task_type, total_steps) -> model.
def build_lora(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    import peft as hf_peft
    # every linear layer of the encoder (not the head): more accurate than peft's query/value
    # default at the same rank, and still ~1.5% of MiniLM's weights at r=8
    pc = hf_peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=cfg.target_modules or "all-linear", **_common(model, cfg, task_type))
    return _wrap(model, pc, "lora")


def build_adalora(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    import peft as hf_peft
    tinit, tfinal = int(cfg.tinit * total_steps), int(cfg.tfinal * total_steps)
    if tinit >= total_steps - tfinal:
        raise InputError(f"peft: AdaLoRA needs a budgeting phase; tinit ({tinit}) + tfinal ({tfinal}) steps "
                         f"leave none of the {total_steps} steps. Lower peft.tinit / peft.tfinal or train longer.")
    pc = hf_peft.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               tinit=tinit, tfinal=tfinal, deltaT=cfg.delta_t, total_step=total_steps,
                               target_modules=cfg.target_modules or "all-linear", **_common(model, cfg, task_type))
    return _wrap(model, pc, "adalora")


def build_ia3(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    import peft as hf_peft
    return _wrap(model, hf_peft.IA3Config(target_modules=cfg.target_modules or None, **_common(model, cfg, task_type)), "ia3")


def build_prefix(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    import peft as hf_peft
    expose_past_key_values(model)
    pc = hf_peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **_common(model, cfg, task_type))
    return _wrap(model, pc, "prefix")


def build_prompt(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    import peft as hf_peft
    pc = hf_peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **_common(model, cfg, task_type))
    return _wrap(model, pc, "prompt")


def build_adapter(model: torch.nn.Module, cfg: PeftConfig, task_type: str, total_steps: int) -> torch.nn.Module:
    return add_bottleneck_adapters(model, cfg.adapter_size)


def expose_past_key_values(model: torch.nn.Module) -> None:
    """Let peft's prefix tuning find the backbone's key/value-cache argument under its old name.

    transformers 5.24 renamed the encoders' `past_key_values` argument to `cache` (the old name is
    still accepted through a deprecation shim until 5.40). peft (0.21.2, the newest release) checks
    the backbone's forward signature for `past_key_values` before it injects the prefix and raises
    "Model does not support past key values" otherwise, although the model would take it. So give
    the backbone a forward that names `past_key_values` and hands the prefix on as `cache`: it works
    before 5.24 (nothing to do), on 5.24 and after 5.40 drops the old name.
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, torch.nn.Module):
        return
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return
    inner = backbone.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return inner(*args, **kwargs)
    backbone.forward = forward


def step_hooks(model: torch.nn.Module, cfg: PeftConfig) -> list[Callable]:
    """AdaLoRA: budget allocation after every optimizer step, before gradients are cleared."""
    if cfg.method != "adalora":
        return []
    return [lambda m, step: m.base_model.update_and_allocate(step)]


def wrap_loss(loss_fn: Callable, model: torch.nn.Module, cfg: PeftConfig) -> Callable:
    """Add AdaLoRA's orthogonal regulariser, weighted per labeled item like the task loss."""
    if cfg.method != "adalora":
        return loss_fn
    weight = model.peft_config["default"].orth_reg_weight

    def loss(outputs, batch):
        reg, n = 0.0, 0
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                reg = reg + torch.norm(cov - torch.eye(*cov.shape, device=cov.device), p="fro")
                n += 1
        items = (batch["labels"] != -100).sum()
        return loss_fn(outputs, batch) + weight * (reg / max(n, 1)) * items
    return loss


def finalize(model: torch.nn.Module) -> None:
    """AdaLoRA saves its adapter resized to the final rank pattern; apply that pattern to the restored
    (best) weights too, so the model evaluated here is exactly the one written to disk."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is not None and str(getattr(cfg.peft_type, "value", "")) == "ADALORA" and cfg.rank_pattern:
        model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, cfg.rank_pattern)


def rank_pattern(model: torch.nn.Module) -> dict[str, int] | None:
    """AdaLoRA: the rank each adapted matrix kept (None for other methods)."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None or getattr(cfg, "peft_type", None) is None or str(cfg.peft_type.value) != "ADALORA":
        return None
    pattern = cfg.rank_pattern or {}
    return {k: int(sum(bool(x) for x in v)) for k, v in pattern.items()}


# ---- our bottleneck adapter ---------------------------------------------------------------------
# Hand-written: the maintained implementation (AdapterHub's `adapters`) pins transformers 4.x and does
# not load beside our transformers 5; peft has no bottleneck adapter. Pfeiffer placement: after the
# feed-forward output projection of every layer, before its dropout + residual + LayerNorm.

class Bottleneck(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear, size: int):
        super().__init__()
        self.inner = inner
        d = inner.out_features
        self.down = torch.nn.Linear(d, size)
        self.up = torch.nn.Linear(size, d)
        torch.nn.init.zeros_(self.up.weight)  # starts as the identity: training begins from the pretrained model
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return h + self.up(torch.nn.functional.gelu(self.down(h)))


def _ffn_outputs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    from lmtune.models import transformer_layers
    layers = transformer_layers(model)
    if layers is None:
        raise InputError("peft.method adapter: cannot find the transformer layers of this model.")
    found = []
    for layer in layers:
        out = getattr(layer, "output", None)
        if out is not None and isinstance(getattr(out, "dense", None), torch.nn.Linear):
            found.append((out, "dense"))
    if not found:
        raise InputError("peft.method adapter: this architecture has no layer.output.dense to adapt; use lora.")
    return found


def add_bottleneck_adapters(model: torch.nn.Module, size: int) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr in _ffn_outputs(model):
        setattr(parent, attr, Bottleneck(getattr(parent, attr), size))
    for name in head_modules(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    model.lmtune_adapter_size = size
    return model


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    heads = tuple(f"{h}." for h in head_modules(model))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if ".down." in k or ".up." in k or k.startswith(heads)}


# ---- artifacts ------------------------------------------------------------------------------------

def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") or hasattr(model, "lmtune_adapter_size")


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    if hasattr(model, "lmtune_adapter_size"):
        save_file(_adapter_state(model), str(out / ADAPTER_FILE))
        (out / ADAPTER_CONFIG).write_text(json.dumps({"method": "adapter", "adapter_size": model.lmtune_adapter_size}))
    else:
        model.save_pretrained(out)


def load_adapter(base: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
    if (model_dir / ADAPTER_CONFIG).is_file():
        size = json.loads((model_dir / ADAPTER_CONFIG).read_text())["adapter_size"]
        model = add_bottleneck_adapters(base, size)
        missing = model.load_state_dict(load_file(str(model_dir / ADAPTER_FILE)), strict=False)
        if missing.unexpected_keys:
            raise InputError(f"{model_dir}: adapter weights do not fit the base model ({missing.unexpected_keys[:3]}).")
        return model
    import peft as hf_peft
    expose_past_key_values(base)  # harmless for the other methods: the backbone's forward is unchanged
    return hf_peft.PeftModel.from_pretrained(base, str(model_dir))


def is_adapter_dir(model_dir: Path) -> bool:
    return (model_dir / "adapter_config.json").is_file() or (model_dir / ADAPTER_CONFIG).is_file()


def merge(model: torch.nn.Module, method: str) -> torch.nn.Module:
    if method not in mergeable():
        raise InputError(f"merge: {method} adds inputs or modules that cannot be folded into the weights; "
                         f"only {', '.join(mergeable())} runs can be merged. Serve the run directory as it is.")
    return model.merge_and_unload()


def base_fingerprint(path: str) -> str | None:
    """sha256 of the base model's weights file (when it is local), to catch a changed base at load."""
    p = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).is_file():
            h = hashlib.sha256()
            with open(p / name, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
    return None


def artifact_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file() and "token" not in f.name
               and f.name not in ("vocab.txt", "special_tokens_map.json"))

