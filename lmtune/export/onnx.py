"""ONNX export of a finished run, optional magnitude pruning and int8 dynamic quantization, each
verified against the PyTorch model: max |logit difference| on a sample and the dev metric before
and after, written to export.json.

RUN_DIR/export/ then holds model.onnx (fp32), model.int8.onnx (with --quantize int8), the
tokenizer and lmtune.json, so `lmtune serve` (and `lmtune.load`) can run it on onnxruntime alone.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lmtune.errors import InputError
from lmtune.io import atomic_dir, write_json
from lmtune.train.loop import inputs, predict_outputs

log = logging.getLogger("lmtune")
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

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        feed = {n: batch[n].cpu().numpy().astype(np.int64) for n in self.input_names}
        out = self.session.run(None, feed)
        if len(out) > 1:  # the [CLS] features of a model that abstains on the Mahalanobis score
            return SimpleNamespace(logits=torch.from_numpy(out[0]), hidden_states=(torch.from_numpy(out[1])[:, None, :],))
        return SimpleNamespace(logits=torch.from_numpy(out[0]))

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        return self


class _Logits(torch.nn.Module):
    """Positional inputs in, logits out (and the last layer's [CLS] when the model was built to
    return hidden states): the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.features = bool(getattr(model.config, "output_hidden_states", False))

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.names, args)))
        return (out.logits, out.hidden_states[-1][:, 0]) if self.features else out.logits


def prune_magnitude(model: torch.nn.Module, amount: float) -> dict:
    """Zero the smallest-magnitude `amount` of each encoder linear weight (the head is kept whole)."""
    from torch.nn.utils import prune
    if not 0 < amount < 1:
        raise InputError(f"--prune magnitude:AMOUNT needs 0 < AMOUNT < 1, got {amount}.")
    total = zeroed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "classifier" not in name and "score" not in name:
            prune.l1_unstructured(module, "weight", amount)
            prune.remove(module, "weight")
            total += module.weight.numel()
            zeroed += int((module.weight == 0).sum())
    return {"method": "magnitude", "amount": amount, "sparsity": zeroed / max(total, 1)}


def export_run(run_dir: str | Path, quantize: str | None = None, prune: str | None = None, sample: int = 256) -> dict:
    """Export RUN_DIR's model to RUN_DIR/export and verify it; returns what export.json holds."""
    from lmtune.api import META, TASK_ARRAYS, load
    from lmtune.peft import MERGEABLE, is_peft, merge
    run_dir = Path(run_dir)
    run = load(run_dir)
    model = run.model.cpu().eval()
    method = run.config.peft.method
    if is_peft(model):
        if method not in MERGEABLE:
            raise InputError(f"export: a {method} run adds virtual tokens that ONNX export cannot fold in; "
                             f"export works for full fine-tuning and {', '.join(MERGEABLE)} runs.")
        model = merge(model, method).eval()
    report: dict = {"run_dir": str(run_dir), "task": run.task.name, "merged_adapter": method if method != "none" else None}
    if prune:
        kind, _, amount = prune.partition(":")
        if kind != "magnitude" or not amount:
            raise InputError(f"--prune {prune!r}: use magnitude:AMOUNT, e.g. magnitude:0.3.")
        report["prune"] = prune_magnitude(model, float(amount))
    dev = _dev_encoded(run)
    collate = functools.partial(run.task.collate, tokenizer=run.tokenizer)
    probe = dev.features[:sample]
    names = [k for k in inputs(collate(probe[:2])) if k in ("input_ids", "attention_mask", "token_type_ids")]

    def outputs(m, features):
        return predict_outputs(m, features, collate, run.task.unbatch, torch.device("cpu"), progress="none")

    def metric(outs) -> dict:
        m = run.task.evaluate(outs, dev, run.labels)
        return {k: m[k] for k in run.task.headline if k in m}

    ref = outputs(model, probe)  # before export: torch.onnx.export may leave the module in another mode
    ref_metric = metric(outputs(model, dev.features))
    report["pytorch"] = {"dev": ref_metric}
    with atomic_dir(run_dir / "export") as tmp:
        t0 = time.perf_counter()
        example = collate(probe[:2])
        if hasattr(model, "set_attn_implementation"):
            try:  # the explicit attention graph (not SDPA's) runs faster in onnxruntime: 284 vs 208 sentences/s (MiniLM, 2 cores)
                model.set_attn_implementation("eager")
            except (ValueError, ImportError):
                pass
        graph = _Logits(model, names)
        outs = ["logits", "features"] if graph.features else ["logits"]
        torch.onnx.export(graph, tuple(example[n] for n in names), str(tmp / FP32), input_names=names,
                          output_names=outs, opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, **{o: {0: "batch"} for o in outs}})
        model.eval()
        report["onnx_fp32"] = _verify(OnnxModel(tmp / FP32), ref, probe, outputs, metric, dev)
        report["onnx_fp32"]["export_s"] = time.perf_counter() - t0
        if quantize:
            if quantize != "int8":
                raise InputError(f"--quantize {quantize!r}: only int8 (dynamic quantization) is supported.")
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(tmp / FP32), str(tmp / INT8), weight_type=QuantType.QInt8)
            report["onnx_int8"] = _verify(OnnxModel(tmp / INT8), ref, probe, outputs, metric, dev)
        run.tokenizer.save_pretrained(tmp)
        meta = json.loads((run_dir / "model" / META).read_text())
        write_json(tmp / META, meta)
        if (run_dir / "model" / TASK_ARRAYS).is_file():
            shutil.copy2(run_dir / "model" / TASK_ARRAYS, tmp / TASK_ARRAYS)
        write_json(tmp / "export.json", report)
    for name in ("onnx_fp32", "onnx_int8"):
        if name in report:
            r = report[name]
            log.info("%s: max |logit diff| %.2e on %d examples; dev %s", name, r["max_abs_logit_diff"], len(probe),
                     ", ".join(f"{k} {ref_metric[k]:.4f} -> {v:.4f}" for k, v in r["dev"].items()))
    return report


def _verify(onnx_model: OnnxModel, ref: list, probe: list, outputs, metric, dev) -> dict:
    got = outputs(onnx_model, probe)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(got, ref))
    return {"file": onnx_model.path.name, "bytes": onnx_model.path.stat().st_size, "max_abs_logit_diff": diff,
            "sample": len(probe), "dev": metric(outputs(onnx_model, dev.features))}


def _dev_encoded(run):
    """The run's dev split (re-read from its data files with its config: the split is seeded)."""
    from lmtune.api import task_options
    try:
        splits = run.task.read(run.config)
    except InputError as e:
        raise InputError(f"export verifies on the run's dev data, which could not be read: {e}") from None
    return run.task.encode(splits.dev, run.tokenizer, run.config.data.max_length, run.labels, **task_options(run.task, run.config))
