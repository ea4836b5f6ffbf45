"""The calibration temperature folded into the classifier's last linear layer, so that a saved model
gives the same probabilities in `transformers.pipeline`, in ONNX Runtime and in lmtune.

softmax((W h + b) / T) = softmax((W / T) h + b / T): dividing the output layer's weights and bias by
T (one per row for a per-label temperature) makes the model's own logits the calibrated ones, and a
reader that knows nothing of lmtune.json (the pipeline, an ONNX graph, the Hub's widget) gets the
calibrated probabilities. The task records what is folded in (`folded_temperature` in lmtune.json)
and multiplies the logits back, so its own arithmetic stays on raw logits; a run saved before folding
records nothing and its temperature is applied as before.

A task opts in with temperature_to_fold() (its whole temperature), a folded_temperature attribute
(what the weights carry now) and set_folded(t). The layer is found by its shape and checked by a forward pass: only a fold that scales
the model's logits exactly is kept, so an unusual head is left as it was (with a warning) rather
than changed wrongly.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.tasks.base import FOLD

log = logging.getLogger("lmtune")


def foldable(model: torch.nn.Module, task: Any) -> bool:
    """A transformers model (or a PEFT wrapper of one) whose task keeps its temperature apart."""
    from transformers import PreTrainedModel
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return task.supports(FOLD) and (isinstance(model, PreTrainedModel) or isinstance(inner, PreTrainedModel))


def _candidates(model: torch.nn.Module, n_out: int) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers with one output per label, last first: the head's output layer (BERT's
    `classifier`, RoBERTa's `classifier.out_proj`, GPT's `score`, PEFT's trained copy of either)."""
    found = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear and m.out_features == n_out]
    return found[::-1]


@torch.no_grad()
def _logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**probe).logits.float()


@torch.no_grad()
def _scale_output_layer(model: torch.nn.Module, probe: dict[str, torch.Tensor], divisor: np.ndarray,
                        undo: list) -> str | None:
    """Divide the output layer's weights and bias by `divisor` (scalar or per label), checked on the
    probe batch; the layer and its old tensors go to `undo`. The layer's name, or None if none fits."""
    was_training = model.training
    model.eval()
    try:
        before = _logits(model, probe)
        d = torch.as_tensor(divisor, dtype=torch.float32, device=before.device)
        for name, layer in _candidates(model, before.shape[-1]):
            old = (layer, layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
            scale = (1 / d).to(layer.weight.dtype)
            layer.weight.mul_(scale[:, None] if scale.ndim else scale)
            if layer.bias is not None:
                layer.bias.mul_(scale)
            if torch.allclose(_logits(model, probe), before / d, rtol=1e-4, atol=1e-5):
                undo.append(old)
                return name
            _restore([old])
    finally:
        model.train(was_training)
    return None


@torch.no_grad()
def _restore(undo: list) -> None:
    for layer, weight, bias in undo:
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


def rescale_outputs(model: torch.nn.Module, task: Any, probe: dict[str, torch.Tensor], folded: Any,
                    undo: list | None = None) -> str | None:
    """Scale the output layer so that the model's logits become raw / `folded` (a scalar, or one value
    per label), and record that in the task. probe: a batch of model inputs the change is checked on.
    Returns the layer's name, or None when nothing needed changing or no layer scaled the logits exactly
    (the task then keeps applying its temperature itself)."""
    if not foldable(model, task):
        return None
    divisor = np.asarray(folded, dtype=np.float64) / np.asarray(task.folded_temperature, dtype=np.float64)
    if np.allclose(divisor, 1.0, rtol=0, atol=1e-12):
        return None
    name = _scale_output_layer(model, probe, divisor, [] if undo is None else undo)
    if name is None:
        log.warning("calibration: could not fold the temperature into %s's output layer; lmtune applies it, but other "
                    "readers of the saved model (transformers.pipeline, ONNX) see uncalibrated probabilities",
                    type(model).__name__)
        return None
    task.set_folded(folded)
    return name


def fold_temperature(model: torch.nn.Module, task: Any, probe: dict[str, torch.Tensor]) -> str | None:
    """Fold the task's whole temperature into the model: its logits become the calibrated ones."""
    return rescale_outputs(model, task, probe, task.temperature_to_fold()) if foldable(model, task) else None


def unfold_temperature(model: torch.nn.Module, task: Any, probe: dict[str, torch.Tensor]) -> str | None:
    """The reverse: raw logits again (a model soup averages raw weights)."""
    if not foldable(model, task):
        return None
    return rescale_outputs(model, task, probe, np.ones_like(np.asarray(task.temperature_to_fold(), dtype=np.float64)))


def text_probe(tokenizer: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model inputs to check a fold on, where no encoded examples are at hand: one short text."""
    device = next(model.parameters()).device
    batch = tokenizer(["lmtune checks that the temperature is folded in"], return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def folded(model: torch.nn.Module, task: Any, probe: dict[str, torch.Tensor]) -> Iterator[str | None]:
    """The temperature folded in while the model is saved, then the model and the task exactly as they
    were (the rest of the recipe reads raw outputs it has already computed)."""
    undo: list = []
    before = task.folded_temperature if task.supports(FOLD) else None
    try:
        yield (rescale_outputs(model, task, probe, task.temperature_to_fold(), undo) if foldable(model, task) else None)
    finally:
        _restore(undo)
        if undo:
            task.set_folded(before)


def pipeline_reproduces_lmtune(model_dir: Path) -> bool:
    """Whether `transformers.pipeline("text-classification")` on model/ alone gives exactly lmtune's
    probabilities: a single cross-encoding classifier answering with its softmax, whose whole temperature
    is folded into its weights (a fold that failed leaves T in lmtune.json only), with no adapter,
    ensemble, windows, symmetric pair averaging, abstention threshold or out-of-scope score, all of which
    only lmtune.json knows. The model card's usage note and the MLflow model flavor both ask this."""
    from lmtune.artifacts import read_meta
    from lmtune.peft import is_adapter_dir
    meta = read_meta(model_dir)
    state = meta.get("task_state") or {}
    data = (meta.get("config") or {}).get("data", {})
    folded = abs(float(state.get("temperature", 1.0)) / float(state.get("folded_temperature", 1.0)) - 1.0) < 1e-9
    return (meta.get("task") == "classification" and "ensemble" not in meta and not is_adapter_dir(model_dir)
            and (model_dir / "config.json").is_file() and folded and not state.get("symmetric")
            and state.get("pair_encoding") in (None, "cross") and state.get("threshold") is None
            and state.get("oos_label") is None and state.get("score", "probability") == "probability"
            and data.get("long_text", "truncate") == "truncate")
