"""The model of an ensemble run: its members' calibrated probabilities, averaged with weights.

Kept apart from lmtune.search.combine (which builds ensembles and imports the api) because the api's
load() builds this model when it opens an ensemble run directory.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput


class EnsembleModel(torch.nn.Module):
    """forward(**inputs) runs every member on the same token ids and returns the log of the weighted
    mean of their temperature-scaled softmax probabilities as `logits`: softmax of it (with the
    ensemble's own temperature, fitted on dev, or 1) is the averaged distribution."""

    def __init__(self, members: list[torch.nn.Module], weights: list[float], temperatures: list[float]):
        super().__init__()
        # torch modules are registered (to(), eval() reach them); an exported ensemble's members are
        # onnxruntime sessions (lmtune.backends.onnx.OnnxModel), which hold no parameters
        self.members = torch.nn.ModuleList(members) if all(isinstance(m, torch.nn.Module) for m in members) else list(members)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float) / sum(weights))
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float))

    def forward(self, **inputs) -> SequenceClassifierOutput:
        probs = None
        for member, w, t in zip(self.members, self.weights, self.temperatures):
            p = torch.softmax(member(**inputs).logits.float() / t, -1) * w
            probs = p if probs is None else probs + p
        return SequenceClassifierOutput(logits=torch.log(probs.clamp_min(1e-12)))
