"""Fully sharded data parallel training (train.fsdp), through torch's FSDP2 (`fully_shard`).

lmtune shards the model itself rather than through accelerate, because accelerate forms FSDP only on
GPUs (on CPU processes it falls back to plain data parallel), while `fully_shard` runs on CPU (gloo)
as on GPUs (NCCL): the same code is tested here and runs there. Each transformer layer is one
shard unit, the rest of the model another. Checkpoints hold full (consolidated) state dicts, which
every process gathers together and the main process writes: they load without FSDP, and the run's
model/ folder loads with `from_pretrained`. After training the recipe continues on a plain model
holding the best checkpoint's weights.
"""
from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lmtune.config import TrainConfig
from lmtune.models import transformer_layers

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def wanted(cfg: TrainConfig, world: int) -> bool:
    """on, or auto when the launcher asks for FSDP (`accelerate launch` with an FSDP config sets
    ACCELERATE_USE_FSDP); only with more than one process."""
    asked = cfg.fsdp == "on" or (cfg.fsdp == "auto" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
    return asked and world > 1


def shard(model: torch.nn.Module) -> None:
    """In place: each transformer layer, then the rest. Before the optimizer is built: it holds the shards."""
    for layer in transformer_layers(model) or []:
        fully_shard(layer)
    fully_shard(model)


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state on CPU (every process must call it: it gathers)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every process loads the full states and keeps its shards."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


def plain(value: torch.Tensor | None) -> torch.Tensor | None:
    """A (replicated) DTensor result, such as the clipped gradient norm, as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value
