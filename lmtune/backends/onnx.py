"""onnxruntime as a prediction backend: the files an export writes and the session that runs them.

Apart from export/ so that loading an exported run (api.load) does not import the exporter, which
itself loads runs through the api: no import cycle.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

FP32, INT8 = "model.onnx", "model.int8.onnx"


class OnnxModel:
    """An onnxruntime session that stands in for the torch model wherever lmtune predicts
    (predict_outputs calls `model(**inputs)` and reads `.logits`)."""
    training = False

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        if not spin:  # a server shares the cores with its event loop: idle model threads must sleep, not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]  # the task's output_names (+ features)

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        feed = {n: batch[n].cpu().numpy().astype(np.int64) for n in self.input_names}
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        features = out.pop("features", None)  # the [CLS] features of a model that abstains on the Mahalanobis score
        extra = {"hidden_states": (torch.from_numpy(features)[:, None, :],)} if features is not None else {}
        return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in out.items()}, **extra)

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        return self
