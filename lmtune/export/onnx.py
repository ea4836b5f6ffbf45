"""ONNX export of a finished run, optional pruning (export/prune.py) and int8 dynamic quantization, each
verified against the PyTorch model: max |logit difference| on a sample and the dev metric before
and after, written to export.json.

RUN_DIR/export/ then holds model.onnx (fp32), model.int8.onnx (with --quantize int8), the
tokenizer and lmtune.json, so `lmtune serve` (and `lmtune.load`) can run it on onnxruntime alone.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lmtune.artifacts import RunDir, model_meta, read_meta, save_task_arrays, write_meta
from lmtune.backends.onnx import FP32, INT8, OnnxModel
from lmtune.errors import InputError
from lmtune.fold import fold_temperature, text_probe
from lmtune.tasks.base import encode_examples
from lmtune.io import atomic_dir, write_json
from lmtune.export.prune import STRUCTURED, parse_prune, prune_and_recover, prune_magnitude
from lmtune.training.loop import inputs, predict_outputs

log = logging.getLogger("lmtune")


class _Logits(torch.nn.Module):
    """Positional inputs in, logits out (and the last layer's [CLS] when the model was built to
    return hidden states): the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module, names: list[str], outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs  # outputs: the task's output_names
        self.features = bool(getattr(model.config, "output_hidden_states", False))

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.names, args)))
        return (*(getattr(out, n) for n in self.outputs), *((out.hidden_states[-1][:, 0],) if self.features else ()))


def export_run(run_dir: str | Path, quantize: str | None = None, prune: str | None = None, sample: int = 256,
               recover_epochs: int = 1) -> dict:
    """Export RUN_DIR's model to RUN_DIR/export and verify it; returns what export.json holds.
    prune: 'magnitude:0.3' (zeros) or 'ffn:0.5,heads:0.25' (structured: smaller, faster matrices,
    then `recover_epochs` of distillation from the unpruned model on the run's train split)."""
    from lmtune.inference import load
    from lmtune.export import merged_model
    if quantize not in (None, "int8"):
        raise InputError(f"--quantize {quantize!r}: only int8 (dynamic quantization) is supported.")
    spec = parse_prune(prune) if prune else {}
    if recover_epochs < 0:
        raise InputError(f"--recover-epochs must be >= 0, got {recover_epochs}.")
    rd = RunDir(run_dir)
    run = load(rd.root)
    meta = read_meta(rd.model)
    if "ensemble" in meta:  # lmtune ensemble's run: its members are exported
        return _export_ensemble(run, meta, quantize, prune, sample)
    model = merged_model(run, "an ONNX graph")
    method = run.config.peft.method
    report: dict = {"run_dir": str(rd.root), "task": run.task.name, "merged_adapter": method if method != "none" else None}
    structured = any(k in spec for k in STRUCTURED)
    encoded = _encoded(run, ("dev", "train") if structured else ("dev",))
    dev = encoded["dev"]
    collate, outputs, metric = _checks(run, dev)
    report["pytorch"] = {"dev": metric(outputs(model, dev.features))}  # the run's model, before any pruning
    model = _prune(model, spec, run, encoded, collate, outputs, report, recover_epochs)
    if spec:
        report["pytorch_pruned"] = {"dev": metric(outputs(model, dev.features))}
    if report.get("prune", {}).get("refitted"):
        # a pruned model's refitted temperature goes into the graph, as training folds one into model/; an
        # unpruned export keeps model/'s weights as they are (an old run's, unfolded, stay so: an ensemble
        # made from it divides its members' logits by their temperatures itself)
        fold_temperature(model, run.task, text_probe(run.tokenizer, model))
    probe = dev.features[:sample]
    ref = outputs(model, probe)  # before export: torch.onnx.export may leave the module in another mode
    with atomic_dir(rd.export) as tmp:
        _write_onnx(model, run, collate, probe, tmp, report, quantize, ref, outputs, metric, dev)
        run.tokenizer.save_pretrained(tmp)
        # refitted for a pruned model, else as saved with the run
        write_meta(tmp, model_meta(run.task, saved=rd.model))
        save_task_arrays(run.task, tmp)
        write_json(tmp / rd.export_report.name, report)
    _track_export(rd.root)
    for name in ("onnx_fp32", "onnx_int8"):
        if name in report:
            r = report[name]
            log.info("%s: max |logit diff| %.2e on %d examples; dev %s", name, r["max_abs_logit_diff"], len(probe),
                     ", ".join(f"{k} {report['pytorch']['dev'][k]:.4f} -> {v:.4f}" for k, v in r["dev"].items()))
    return report


def _track_export(run_dir: Path) -> None:
    """A run trained with the mlflow tracker gets its ONNX files in its MLflow run too; the export
    itself is done and verified, so a tracking server that cannot be reached only warns."""
    from lmtune.tracking.mlflow import log_export
    try:
        if log_export(run_dir):
            log.info("export: ONNX files logged to the run's MLflow run (artifacts onnx/)")
    except Exception as e:
        log.warning("export: could not log the ONNX files to MLflow (%s)", e)


def _prune(model, spec: dict, run, encoded: dict, collate, outputs, report: dict, recover_epochs: int):
    """The pruning `spec` asks for (none, magnitude, or structured with distillation and the output
    controls refitted on the pruned model), recorded in report["prune"]."""
    from lmtune.inference import fit_output_controls
    from lmtune.runtime import accelerator_for
    if "magnitude" in spec:
        report["prune"] = prune_magnitude(model, spec["magnitude"])
    elif any(k in spec for k in STRUCTURED):
        model, report["prune"] = prune_and_recover(model, spec, run, encoded["train"].features, collate, recover_epochs,
                                                   accelerator_for("fp32"))
        # the temperature, Mahalanobis scorer and abstention threshold belong to the unpruned model's outputs
        report["prune"]["refitted"] = sorted(fit_output_controls(
            run.task, run.config, lambda split: outputs(model, encoded[split].features), encoded, run.labels))
    return model


def _write_onnx(model, run, collate, probe: list, tmp: Path, report: dict, quantize: str | None, ref: list, outputs,
                metric, dev) -> None:
    """model.onnx (and model.int8.onnx) in tmp, each verified against the PyTorch outputs `ref`."""
    names = [k for k in inputs(collate(probe[:2])) if k in ("input_ids", "attention_mask", "token_type_ids")]
    t0 = time.perf_counter()
    example = collate(probe[:2])
    if hasattr(model, "set_attn_implementation"):
        try:  # the explicit attention graph (not SDPA's) runs faster in onnxruntime: 284 vs 208 sentences/s (MiniLM, 2 cores)
            model.set_attn_implementation("eager")
        except (ValueError, ImportError):
            pass
    graph = _Logits(model, names, run.task.output_names)
    outs = [*run.task.output_names, *(["features"] if graph.features else [])]
    torch.onnx.export(graph, tuple(example[n] for n in names), str(tmp / FP32), input_names=names,
                      output_names=outs, opset_version=17, dynamo=False,
                      dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, **{o: {0: "batch"} for o in outs}})
    model.eval()
    report["onnx_fp32"] = _verify(OnnxModel(tmp / FP32), ref, probe, outputs, metric, dev)
    report["onnx_fp32"]["export_s"] = time.perf_counter() - t0
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor to the root logger
        try:
            quantize_dynamic(str(tmp / FP32), str(tmp / INT8), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        report["onnx_int8"] = _verify(OnnxModel(tmp / INT8), ref, probe, outputs, metric, dev)


def _export_ensemble(run, meta: dict, quantize: str | None, prune: str | None, sample: int) -> dict:
    """An ensemble's export: every member exported into its own run directory (export_run, as for any
    run), and RUN_DIR/export holding the ensemble's metadata that names them, so `load(RUN_DIR,
    backend="onnx")` and `lmtune serve --backend onnx` average the members on onnxruntime. Verified
    like a single model: the ONNX ensemble against the PyTorch one on a dev sample."""
    from lmtune.backends.onnx import OnnxModel
    from lmtune.search.members import EnsembleModel
    if prune:
        raise InputError("export: an ensemble is not pruned; prune its members (`lmtune export MEMBER --prune ...`) "
                         "and build the ensemble from them.")
    e = meta["ensemble"]
    report: dict = {"run_dir": str(run.run_dir), "task": run.task.name, "ensemble": True,
                    "members": {m: export_run(m, quantize=quantize, sample=sample) for m in e["members"]}}
    dev = _encoded(run, ("dev",))["dev"]
    _, outputs, metric = _checks(run, dev)

    probe = dev.features[:sample]
    on_dev = outputs(run.model.cpu().eval(), dev.features)  # nothing is pruned: the probe's outputs are its first rows
    ref = on_dev[:len(probe)]
    report["pytorch"] = {"dev": metric(on_dev)}
    with atomic_dir(RunDir(run.run_dir).export) as tmp:
        for name, file in (("onnx_fp32", FP32), ("onnx_int8", INT8)):
            if name == "onnx_int8" and not quantize:
                continue
            files = [RunDir(m).export / file for m in e["members"]]
            onnx = EnsembleModel([OnnxModel(f) for f in files], e["weights"], e["temperatures"])
            report[name] = {"files": [str(f) for f in files], **_agreement(onnx, ref, probe, outputs, metric, dev)}
        run.tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
        save_task_arrays(run.task, tmp)
        write_json(tmp / RunDir(run.run_dir).export_report.name, report)
    return report


def _checks(run, dev):
    """The run's collate, outputs(model, features) on CPU, and metric(outputs) on its dev split: what
    every before/after comparison of an export uses."""
    collate = functools.partial(run.task.collate, tokenizer=run.tokenizer)

    def outputs(m, features):
        return predict_outputs(m, features, collate, run.task.unbatch, torch.device("cpu"), progress="none")

    def metric(outs) -> dict:
        m = run.task.evaluate(outs, dev, run.labels)
        return {k: m[k] for k in run.task.headline if k in m}
    return collate, outputs, metric


def _verify(onnx_model: OnnxModel, ref: list, probe: list, outputs, metric, dev) -> dict:
    return {"file": onnx_model.path.name, "bytes": onnx_model.path.stat().st_size,
            **_agreement(onnx_model, ref, probe, outputs, metric, dev)}


def _agreement(model, ref: list, probe: list, outputs, metric, dev) -> dict:
    """How closely an exported model reproduces the PyTorch outputs `ref` on `probe` (the first rows of
    dev), and its dev metric: one pass over dev serves both."""
    on_dev = outputs(model, dev.features)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(on_dev[:len(probe)], ref))
    return {"max_abs_logit_diff": diff, "sample": len(probe), "dev": metric(on_dev)}


def _encoded(run, names: tuple[str, ...]) -> dict:
    """The run's splits (re-read from its data files with its config: the split is seeded), encoded."""
    try:
        splits = run.task.read(run.config)
    except InputError as e:
        raise InputError(f"export verifies on the run's dev data (and prunes with its train data), which could not be read: {e}") from None
    return {name: encode_examples(run.task, getattr(splits, name), run.tokenizer, run.config, run.labels) for name in names}
