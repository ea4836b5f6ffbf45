"""Where models run: the device, the launcher's processes and the Accelerator of a training run."""
from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def partial_state() -> PartialState:
    """The launcher's processes (torchrun / accelerate launch env), or one plain process. Without a
    GPU, accelerate only forms a (gloo) process group when told it runs on CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def accelerator_for(precision: str) -> Accelerator:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    try:
        return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    except ValueError:  # a second run in one process asked for another precision
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
