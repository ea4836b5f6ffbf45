"""The Python API: `train(config) -> Run`, `load(run_dir) -> Run`, `Run.predict`, `Run.evaluate`.

train() reads and validates all input before it creates anything on disk, then writes the run
directory: config.yaml, splits.json, checkpoints/, model/ (save_pretrained layout), metrics.json,
predictions/, report.md with its PNGs, and train.log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import shutil
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from transformers import set_seed

from lmtune.config import Config, build_config, load_config
from lmtune.artifacts import META, RunDir, read_meta, restore_task_state, save_task_arrays, update_task_state, write_meta
from lmtune import continual, results
from lmtune.audit import audit
from lmtune.diagnose import diagnose
from lmtune.errors import InputError
from lmtune.evaluate.abstain import DEFAULT_VALUE
from lmtune.io import atomic_dir, write_json, write_jsonl, write_text
from lmtune.data.splits import resample_indices
from lmtune.noise import find_label_issues, out_of_fold_probs
from lmtune.noise import finding as noise_finding
from lmtune.models import check_model, count_parameters, freeze, quiet_transformers, resolve_model
from lmtune.peft import finalize as finalize_peft
from lmtune.peft import (apply_peft, artifact_bytes, base_fingerprint, is_adapter_dir, is_peft, load_adapter, rank_pattern,
                         save_adapter, step_hooks, wrap_loss)
from lmtune.registry import adversaries, backends, trackers
from lmtune.rerank import rerank
from lmtune.robust.adversarial import AdversaryInputs
from lmtune.robust.augment import augment
from lmtune.robust.text import Synonyms
from lmtune.tasks import get_task
from lmtune.tasks.base import (ABSTAIN, CALIBRATE, DEV_RULES, EXAMPLE_LABELS, GENERATE, INDEX, INTERVALS, LABEL_NOISE, MAHALANOBIS, RERANK,
                               Encoded, encode_examples)
from lmtune.training import fsdp
from lmtune.training.checkpoint import Checkpoints
from lmtune.training.optim import resolve_learning_rates
from lmtune.training.loop import LoopTask, predict_outputs, total_steps, train_loop
from lmtune.training.memory import PeakMemory

log = logging.getLogger("lmtune")
def fit_output_controls(task, cfg: Config, outputs, encoded: dict, labels: list[str]) -> dict:
    """What the trained model's outputs are tuned with after training, in order: the temperature
    (on dev), the Mahalanobis scorer (on train), the abstention threshold (on dev). outputs(split)
    gives the model's outputs on encoded[split]. Export calls it again for a pruned model."""
    fitted = {}
    if cfg.train.calibrate and task.supports(CALIBRATE):
        c = fitted["calibration"] = task.calibrate(outputs("dev"), encoded["dev"], labels)
        log.info("calibration: temperature %.3f, dev ECE %.4f -> %.4f", c["temperature"], c["dev_ece_before"], c["dev_ece_after"])
    if task.supports(INTERVALS):
        i = fitted["intervals"] = task.fit_intervals(outputs("dev"), encoded["dev"], labels)
        log.info("prediction intervals: +-%.4g at the %.0f%% level (split conformal on %d dev examples)", i["interval_radius"],
                 100 * i["level"], i["dev_examples"])
    if task.supports(DEV_RULES):
        r = fitted["decision_rules"] = task.fit_decision_rules(outputs("dev"), encoded["dev"], labels)
        log.info("decision rules fitted on dev: %s", ", ".join(f"{k} {v}" for k, v in r.items()))
    if cfg.abstain.score == "mahalanobis":
        s = fitted["scorer"] = task.fit_scorer(outputs("train"), encoded["train"], labels)
        log.info("abstention score: Mahalanobis distance fitted on %d train examples (%d classes, %d-dim [CLS])",
                 s["examples"], s["classes"], s["dim"])
    if cfg.abstain.target != "none":
        a = fitted["abstention"] = task.fit_threshold(outputs("dev"), encoded["dev"], labels, cfg.abstain.target,
                                                      cfg.abstain.value, cfg.abstain.calibrated)
        log.log(logging.INFO if a["met"] else logging.WARNING,
                "abstention: threshold %.4f for %s %s on dev (answers %.1f%%, accuracy of answered %.4f)%s", a["threshold"],
                a["target"], a["value"], 100 * a["dev_coverage"], a["dev_precision"], "" if a["met"] else ": target not reachable")
    return fitted


def _as_config(config: Config | dict | str | Path, overrides: dict | None = None) -> Config:
    if isinstance(config, Config):
        return build_config(config.to_dict(), overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _partial_state() -> PartialState:
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


def _comparable(cfg: Config) -> dict:
    d = cfg.redacted_dict()  # config.yaml holds the masked form; compare like with like
    d["train"].pop("progress", None)
    return d


def _new_run_dir(cfg: Config) -> Path:
    """output_dir/run_name, or a timestamp name made unique: two trainings started in the same
    second get -2, -3 ... (mkdir is the atomic claim, so they can never share a folder)."""
    if cfg.run_name:
        run_dir = Path(cfg.output_dir) / cfg.run_name
        if run_dir.exists():
            raise InputError(f"{run_dir}: run directory already exists. Pick another run_name, or add --resume "
                             "to continue it; lmtune never overwrites a run.")
        run_dir.mkdir(parents=True)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run_dir = Path(cfg.output_dir) / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise InputError(f"{cfg.output_dir}: cannot find a free run name for {stamp}; set run_name.")


def _run_dir(cfg: Config, resume: bool | str | Path) -> Path:
    """The run directory: a new one (created here), or the unfinished run that --resume continues."""
    if not resume:
        return _new_run_dir(cfg)
    if resume is not True:
        run_dir = Path(resume)
        if RunDir(run_dir).finished():
            raise InputError(f"--resume: {run_dir} is a finished run (it has model/{META}); lmtune never rewrites it. "
                             "Start a new run without --resume.")
    else:
        runs = [c.parent.parent for c in Path(cfg.output_dir).glob("*/checkpoints/pointer.json")]
        if cfg.run_name:
            runs = [r for r in runs if r.name == cfg.run_name]
        unfinished = sorted((r for r in runs if not RunDir(r).finished()), key=lambda r: (r / "checkpoints" / "pointer.json").stat().st_mtime)
        if not unfinished:
            done = f" ({len(runs)} run(s) there are finished)" if runs else ""
            raise InputError(f"--resume: no unfinished run with a checkpoint under {cfg.output_dir}/{done}. "
                             "Start without --resume, or give the run directory: --resume RUN_DIR.")
        run_dir = unfinished[-1]
        log.info("--resume: continuing %s (the newest unfinished run with a checkpoint)", run_dir)
    saved = RunDir(run_dir).config
    if not (RunDir(run_dir).checkpoints / "pointer.json").is_file() or not saved.is_file():
        raise InputError(f"{run_dir}: no checkpoint to resume from.")
    old = _comparable(build_config(yaml.safe_load(saved.read_text())))
    new = _comparable(cfg)
    diff = [f"{s}.{k}" for s in old for k in (old[s] if isinstance(old[s], dict) else [None])
            if (old[s].get(k) if k else old[s]) != (new[s].get(k) if k else new[s]) and s not in ("run_name", "output_dir")]
    if diff:
        raise InputError(f"--resume: the config differs from the one {run_dir} was started with "
                         f"({', '.join(diff)}). Resume with the same config.")
    return run_dir


def _shared_run_dir(cfg: Config, resume: bool | str | Path) -> Path:
    """The main process picks (and creates) the run directory and tells the others, so that N
    processes of one `accelerate launch` / `torchrun` job share one run; an error reaches every rank."""
    state = _partial_state()
    decided: list = [None]
    if state.is_main_process:
        try:
            run_dir = _run_dir(cfg, resume)
            decided[0] = ("ok", str(run_dir))
        except InputError as e:
            decided[0] = ("error", str(e))
    if state.num_processes > 1:
        broadcast_object_list(decided)
    kind, value = decided[0]
    if kind == "error":
        raise InputError(value)
    return Path(value)


@dataclass
class Run:
    """A trained model and its run directory."""
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    task: Any
    labels: list[str]
    config: Config
    metrics: dict = field(default_factory=dict)
    backend: str = "torch"  # what runs the model: torch, or an export (onnx, onnx-int8)

    def _encode(self, examples: list) -> Any:
        return encode_examples(self.task, examples, self.tokenizer, self.config, self.labels)

    def _outputs(self, enc) -> list:
        self.model.to(_device())
        return predict_outputs(self.model, enc.features, functools.partial(self.task.collate, tokenizer=self.tokenizer),
                               self.task.unbatch, _device(), progress=self.config.train.progress)

    def predict(self, texts: str | Sequence[str] | Sequence[tuple[str, str]]) -> list[dict]:
        """Label and class probabilities for each text (or (text, text_pair) tuple)."""
        return self.predict_examples(self._from_texts(texts))

    def _from_texts(self, texts: str | Sequence[str] | Sequence[tuple[str, str]]) -> list:
        if isinstance(texts, str):
            texts = [texts]
        pairs = self.task.reads_pairs(self.config)
        for i, t in enumerate(texts):
            parts = t if isinstance(t, tuple) else (t,)
            if any(not isinstance(x, str) or not x.strip() for x in parts):
                raise InputError(f"text {i + 1}: empty text.")
            if len(parts) != (2 if pairs else 1):
                what = ("sentence pairs: give each text with its pair (--pair, or pairs over HTTP)" if pairs
                        else "single texts: give no pair")
                raise InputError(f"text {i + 1}: this model reads {what}.")
        return self.task.from_texts(list(texts))

    def explain(self, texts: str | Sequence[str] | Sequence[tuple[str, str]], label: str | None = None,
                method: str = "auto", steps: int = 32) -> list[dict]:
        """Predictions with word attributions (lmtune.explain): Integrated Gradients on the torch backend,
        occlusion on the others; for the predicted label, or `label`."""
        return self.explain_examples(self._from_texts(texts), label, method, steps)

    def explain_examples(self, examples: list, label: str | None = None, method: str = "auto", steps: int = 32) -> list[dict]:
        from lmtune.explain import Explainer
        return Explainer(self, method, steps).explain(examples, label)

    def explain_report(self, data: str | Path | None = None, max_examples: int = 300, method: str = "auto",
                       steps: int = 32, share: float = 0.2) -> dict:
        """Explain a labeled file (default: the run's test split): per-class words, example explanations and
        their faithfulness; written to RUN_DIR/explain.json and the Explanations section of report.md."""
        return self.analyse("explain", data=data, max_examples=max_examples, method=method, steps=steps, share=share)

    def analyse(self, name: str, **params) -> dict:
        """Run the registered analysis NAME (lmtune.analysis: drift, fairness, explain, robustness, ...):
        written to RUN_DIR/NAME.json and into results.json and report.md."""
        from lmtune.analysis import analyse
        return analyse(self, name, **params)

    def predict_examples(self, examples: list) -> list[dict]:
        if self.task.supports(GENERATE):
            return self.task.generation_rows(examples, self.generate_examples(examples))
        enc = self._encode(examples)
        return self.task.predictions(self._outputs(enc), enc, self.labels)

    def generate_examples(self, examples: list, settings: dict | None = None, max_new_tokens: int | None = None,
                          streamer: Any = None) -> list[dict]:
        """A generating task's outputs, with the decoding chosen on dev (or `settings`)."""
        self.task.require(GENERATE, "generate")
        self.model.to(_device())
        return self.task.generate(self.model, self.tokenizer, examples, _device(), settings, self.config.train.progress,
                                  max_new_tokens, streamer)

    def embed(self, texts: Sequence[str], documents: bool = False) -> np.ndarray:
        """A retrieval run's unit-length embeddings [texts, hidden] of queries (or of documents)."""
        self.task.require(INDEX, "embed")
        return embed_texts(self.task, self.model, self.tokenizer, self.config, list(texts), documents, _device())

    def search(self, queries: str | Sequence[str], k: int = 10, exclude: list[set[int]] | None = None,
               reranker: Run | None = None, depth: int = 50, rerank_label: str | None = None) -> list[list[dict]]:
        """Each query's k best documents of the run's index: [{document, score, id?}], best first;
        `exclude` leaves out index rows per query. With `reranker` (a pair run: lmtune.rerank) the
        index's `depth` best are re-ordered by the pair run's relevance, which each row gets as
        rerank_score (score stays the bi-encoder's)."""
        self.task.require(INDEX, "search")
        if self.task.index is None:
            raise InputError(f"{self.run_dir}: the run has no index/; build one with `lmtune search {self.run_dir} --corpus FILE`.")
        queries = [queries] if isinstance(queries, str) else list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"query {i + 1}: empty text.")
        hits = self.task.index.search(self.embed(queries), max(k, depth) if reranker else k, exclude)
        rows = [self.task.index.rows(h) for h in hits]
        return rows if reranker is None else rerank(reranker, queries, rows, k, rerank_label)

    def relevance(self, pairs: Sequence[tuple[str, str]], label: str | None = None) -> list[float]:
        """A pair run's relevance of each (query, document): the relevant label's probability, or a
        regression run's value (capability rerank)."""
        self.task.require(RERANK, "rerank")
        if not self.task.reads_pairs(self.config):
            raise InputError(f"{self.run_dir}: not a pair run (data.text_pair_column was not set): it cannot score (query, document).")
        return self.task.relevance(self.predict(list(pairs)), self.labels, label) if pairs else []

    def build_index(self, corpus: str | Path) -> int:
        """Embed a corpus file (retrieval.corpus_column / corpus_id_column) into the run's index/ (replacing it)."""
        from lmtune.tasks.retrieval import read_corpus
        self.task.require(INDEX, "index")
        r = self.config.retrieval
        rows = read_corpus(str(corpus), r.corpus_column, r.corpus_id_column, self.config)
        index = build_index(self.task, self.model, self.tokenizer, self.config, rows, _device())
        index.save(self.run_dir)
        self.task.set_index(index)
        return len(rows)

    def tune_abstention(self, data: str | Path, target: str, value: float | None = None, calibrated: bool = True,
                        save: bool = False, score: str | None = None) -> dict:
        """Choose the abstention threshold on a labeled file (e.g. dev with out-of-scope rows) for a new
        target without retraining; save=True writes it into model/lmtune.json for predict and serve.
        score: probability, or mahalanobis for a model trained with abstain.score mahalanobis (default:
        the model's own)."""
        self.task.require(ABSTAIN, "abstention")
        if target not in DEFAULT_VALUE:
            raise InputError(f"abstention target must be one of {', '.join(DEFAULT_VALUE)}, got {target!r}.")
        examples = self.task.read_file(str(data), self.config, self.labels, require_label=True)
        enc = self._encode(examples)
        result = self.task.fit_threshold(self._outputs(enc), enc, self.labels, target, value, calibrated,
                                         **({"score": score} if score else {}))
        if save:
            update_task_state(RunDir(self.run_dir).model, self.task)
        return result

    def predict_file(self, path: str | Path) -> list[dict]:
        return [row for rows in self.predict_file_chunks(path) for row in rows]

    def predict_file_chunks(self, path: str | Path, chunk: int = 512) -> Iterator[list[dict]]:
        """Predictions of a file, `chunk` examples at a time: the file is read and checked whole first
        (a bad row is an error before anything is predicted), then outputs are produced and can be
        written chunk by chunk, so memory does not grow with the number of predictions."""
        examples = self.task.read_file(str(path), self.config, self.labels, require_label=False)
        for i in range(0, len(examples), chunk):
            yield self.predict_examples(examples[i:i + chunk])

    def predict_stream(self, lines: Iterable[str], chunk: int = 256, name: str = "<stdin>") -> Iterator[list[dict]]:
        """Predictions of a stream of lines (JSON objects with the run's columns, or plain texts), `chunk`
        lines at a time: memory stays flat however long the stream is. Each chunk goes through the task's
        own file reader (the same checks as --input FILE); errors name the stream's line."""
        import re
        import tempfile
        col = self.config.data.text_column
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "stream.jsonl"
            where = re.compile(re.escape(str(path)) + r": (?:line|row) (\d+)")
            offset = 0
            for batch in iter(lambda: list(itertools.islice(lines, chunk)), []):
                rows = [line if not line.strip() or line.lstrip().startswith("{") else json.dumps({col: line}, ensure_ascii=False)
                        for line in (x.rstrip("\r\n") for x in batch)]
                if not any(r.strip() for r in rows):
                    offset += len(batch)
                    continue
                path.write_text("\n".join(rows) + "\n", encoding="utf-8")
                try:
                    examples = self.task.read_file(str(path), self.config, self.labels, require_label=False)
                except InputError as e:
                    raise InputError(where.sub(lambda m, at=offset: f"{name}: line {int(m.group(1)) + at}", str(e))) from None
                for ex in examples:  # the stream's own line, not the chunk file's
                    file, _, line = ex.source.rpartition(":")
                    ex.source = f"{name}:{int(line) + offset}" if file == str(path) and line.isdigit() else name
                offset += len(batch)
                yield self.predict_examples(examples)

    def evaluate(self, data: str | Path) -> dict:
        """Metrics on a labeled file (columns as in the run's config)."""
        return self.evaluate_examples(self.task.read_file(str(data), self.config, self.labels, require_label=True))

    def evaluate_examples(self, examples: list) -> dict:
        enc = self._encode(examples)
        metrics = self.task.evaluate(self._outputs(enc), enc, self.labels)
        metrics["truncated"] = enc.stats["truncated"]
        if self.task.supports(GENERATE):
            metrics.update(self.task.score_generations(examples, self.generate_examples(examples)))
        return metrics

    def attack(self, data: str | Path | None = None, **overrides) -> dict:
        """Robustness report (robust/attack.py) on a labeled file, or on the run's dev split; written
        to RUN_DIR/robustness.json and summarised in report.md. overrides: attack.* keys."""
        return self.analyse("robustness", data=data, **overrides)

    def attack_examples(self, examples: list, source: str = "dev", **overrides) -> dict:
        return self.analyse("robustness", examples=examples, source=source, **overrides)

    def drift(self, data: str | Path, alpha: float = 0.05, max_examples: int = 1000, permutations: int = 500) -> dict:
        """Does a new file differ from the run's training data (lmtune.drift)? Written to RUN_DIR/drift.json
        and as the Drift section of report.md."""
        return self.analyse("drift", data=data, alpha=alpha, max_examples=max_examples, permutations=permutations)

    def fairness(self, data: str | Path | None = None, split: str = "test", swap: str | None = None,
                 slices: list[str] | None = None) -> dict:
        """Slice metrics (columns of the data; default data.slice_columns) and counterfactual term swaps
        (a built-in list, en or zh, or a file) on a labeled file or a split of the run (lmtune.fairness);
        written to RUN_DIR/fairness.json and report.md."""
        return self.analyse("fairness", data=data, split=split, swap=swap, slices=slices)

    def _dev_examples(self) -> list:
        return self._split_examples("dev")

    def _split_examples(self, split: str) -> list:
        """A split of the run (dev or test), re-read from its data files as recorded in splits.json."""
        examples = getattr(self.task.read(self.config), split)
        if not examples:
            raise InputError(f"{self.run_dir}: the run has no {split} split; give --data FILE.")
        return examples


def load(run_dir: str | Path, backend: str = "torch") -> Run:
    """Open a finished run directory for prediction and evaluation: its model/ folder (backend
    torch), or the ONNX export made by `lmtune export` (backend onnx or onnx-int8)."""
    run_dir = Path(run_dir)
    if backend != "torch":
        return _load_onnx(run_dir, backend)
    if not RunDir(run_dir).finished():
        raise InputError(f"{run_dir}: not a finished lmtune run (no model/{META}). Train it first, "
                         "or resume it with `lmtune train CONFIG --resume`.")
    meta = read_meta(RunDir(run_dir).model)
    task = get_task(meta["task"])
    restore_task_state(task, meta, run_dir / "model")
    cfg = build_config(meta["config"])
    if "ensemble" in meta:  # an ensemble run (lmtune ensemble): its members' models, averaged
        from transformers import AutoTokenizer

        from lmtune.search.members import EnsembleModel
        e = meta["ensemble"]
        gone = [m for m in e["members"] if not RunDir(m).finished()]
        if gone:
            raise InputError(f"{run_dir}: ensemble member {gone[0]} is gone; an ensemble reads its members where it was built.")
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
        model = EnsembleModel([load(m).model for m in e["members"]], e["weights"], e["temperatures"])
    elif is_adapter_dir(run_dir / "model"):
        base = meta.get("base_model", {})
        path = resolve_model(cfg.model.name)
        if base.get("sha256") and base_fingerprint(path) not in (None, base["sha256"]):
            raise InputError(f"{run_dir}: the base model at {path} is not the one this adapter was trained on "
                             "(weights hash differs). Install the same base model.")
        model, tokenizer = task.build_model(cfg, meta["labels"])
        model = load_adapter(model, run_dir / "model")
    else:
        model, tokenizer = task.load_model(run_dir / "model")
    metrics = RunDir(run_dir).read_metrics()
    if task.supports(INDEX):
        from lmtune.index import load_index
        task.set_index(load_index(run_dir))
    return Run(run_dir, model.to(_device()).eval(), tokenizer, task, meta["labels"], cfg, metrics)


def embed_texts(task, model, tokenizer, cfg: Config, texts: list[str], documents: bool, device: torch.device) -> np.ndarray:
    """Unit-length embeddings of an INDEX task's queries (or documents), in order."""
    examples = task.documents(texts) if documents else task.from_texts(texts)
    enc = encode_examples(task, examples, tokenizer, cfg, None)
    model.to(device)
    out = predict_outputs(model, enc.features, functools.partial(task.collate, tokenizer=tokenizer), task.unbatch, device,
                          "embed", cfg.train.progress)
    return np.stack([o[1 if documents else 0] for o in out]) if out else np.zeros((0, 0), np.float32)


def build_index(task, model, tokenizer, cfg: Config, rows: list[dict], device: torch.device):
    from lmtune.index import Index
    ids = [str(r["id"]) for r in rows] if rows and "id" in rows[0] else None
    return Index([r["text"] for r in rows], ids, embed_texts(task, model, tokenizer, cfg, [r["text"] for r in rows], True, device))


def _load_onnx(run_dir: Path, backend: str) -> Run:
    from transformers import AutoTokenizer

    from lmtune.backends.onnx import OnnxModel
    backends.check(backend, "backend")
    export, file = RunDir(run_dir).export, backends.meta(backend, "file")
    meta = read_meta(export) if (export / META).is_file() else {}
    # an ensemble's export names its members, each exported in its own run directory
    paths = [Path(m) / "export" / file for m in meta["ensemble"]["members"]] if "ensemble" in meta else [export / file]
    missing = [p for p in paths if not p.is_file()]
    if missing or not meta:
        raise InputError(f"{missing[0] if missing else export / file}: no such export; run `lmtune export {run_dir}"
                         f"{' --quantize int8' if backend == 'onnx-int8' else ''}` first.")
    if "ensemble" in meta:
        from lmtune.search.members import EnsembleModel
        e = meta["ensemble"]
        model = EnsembleModel([OnnxModel(p) for p in paths], e["weights"], e["temperatures"])
    else:
        model = OnnxModel(paths[0])
    task = get_task(meta["task"])
    restore_task_state(task, meta, run_dir / "export")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    metrics = RunDir(run_dir).read_metrics()
    return Run(run_dir, model, tokenizer, task, meta["labels"], build_config(meta["config"]), metrics, backend)


def dataset_overrides(data: Any) -> dict[str, str]:
    """`datasets` objects handed to train(): a Dataset (train only), a DatasetDict or a dict with
    train / dev (or validation) / test. They become data.train / dev / test sources of this process."""
    import datasets
    from lmtune.data.hf_datasets import hold
    if isinstance(data, datasets.Dataset):
        data = {"train": data}
    if not isinstance(data, (dict, datasets.DatasetDict)):
        raise InputError(f"train(data=...): expected a datasets.Dataset, a DatasetDict or a dict of them, got {type(data).__name__}.")
    names = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
    unknown = set(data) - set(names)
    if unknown:
        raise InputError(f"train(data=...): unknown split(s) {', '.join(sorted(unknown))}; use train, dev (or validation), test.")
    return {f"data.{names[k]}": hold(ds, names[k]) for k, ds in data.items()}


def train(config: Config | dict | str | Path, overrides: dict | None = None, resume: bool | str | Path = False,
          callbacks: tuple = (), data: Any = None) -> Run:
    """Read data, fine-tune, restore the best checkpoint, evaluate, write the run directory.
    `data`: datasets.Dataset / DatasetDict objects instead of data.train / dev / test files."""
    if data is not None:
        overrides = {**(overrides or {}), **dataset_overrides(data)}
    cfg = _as_config(config, overrides)
    task = get_task(cfg.task)
    if cfg.train.metric is not None and cfg.train.metric not in task.headline:
        raise InputError(f"train.metric: '{cfg.train.metric}' is not a metric of the {task.name} task "
                         f"(choose from {', '.join(task.headline)}).")
    for name in tracker_names(cfg):
        trackers.get(name).require()
    for key, on, capability in (("abstain.target", cfg.abstain.target != "none", ABSTAIN),
                                ("abstain.score", cfg.abstain.score != "probability", MAHALANOBIS),
                                ("data.label_noise_folds", cfg.data.label_noise_folds > 0, LABEL_NOISE),
                                ("data.resample", cfg.data.resample != "none", EXAMPLE_LABELS)):
        if on:
            task.require(capability, key)
    splits = task.read(cfg)  # every input error surfaces here, before anything is written
    previous = None
    if cfg.continual.from_run:
        splits, previous = continual.prepare(cfg, task, splits)
    return train_splits(cfg, task, splits, resume, callbacks, previous)


def train_splits(cfg: Config, task, splits, resume: bool | str | Path = False, callbacks: tuple = (), previous=None) -> Run:
    """Fine-tune on splits already read (train() reads them from the config; `lmtune cv` makes its folds):
    the run directory, its train.log, and the clean-up of a run that fails before its first checkpoint."""
    check_model(cfg.model.name, cfg.data.max_length, cfg.model.gguf_file)  # a model that cannot load, or too short for max_length
    run_dir = _shared_run_dir(cfg, resume)
    handler = logging.FileHandler(RunDir(run_dir).log, encoding="utf-8") if _partial_state().is_main_process else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = log.level
    log.setLevel(logging.INFO)  # train.log always gets the full story; the console keeps its own level
    log.addHandler(handler)
    marker = RunDir(run_dir).mark_running() if _partial_state().is_main_process else contextlib.nullcontext()
    try:
        with marker:  # `lmtune runs` and the dashboard tell a run in progress from an interrupted one
            run = _train(cfg, task, splits, run_dir, resume, callbacks, previous)
        if cfg.peft.compare_full and cfg.peft.method != "none":
            _compare_with_full(run, cfg, splits)
        return run
    except BaseException:
        # a new run that failed before its first checkpoint has nothing to resume: remove what it
        # wrote instead of leaving a half-written run directory behind
        if not resume and _partial_state().is_main_process and not (RunDir(run_dir).checkpoints / "pointer.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


@dataclass
class _Context:
    """What the stages of a training run hand each other."""
    cfg: Config
    task: Any
    splits: Any
    rd: RunDir
    resume: Any
    callbacks: tuple
    accelerator: Accelerator
    noise: dict | None = None
    model: Any = None
    tokenizer: Any = None
    synonyms: Any = None
    extra: Any = field(default_factory=list)  # augmented train rows (examples, then their encoding)
    resampled: list | None = None
    trainable: int = 0
    total: int = 0
    lrs: Any = None
    encoded: dict = field(default_factory=dict)
    audit_findings: list = field(default_factory=list)
    train_features: list = field(default_factory=list)
    collate: Any = None
    adversary: Any = None
    ckpt: Any = None
    resumed_from: int | None = None
    state: Any = None
    peak_mem: Any = None
    train_seconds: float = 0.0
    outputs_final: Any = None  # the restored model's outputs per split, computed once
    split_metrics: dict = field(default_factory=dict)
    preds: dict = field(default_factory=dict)
    run: Any = None
    trackers: list = field(default_factory=list)
    previous: Any = None  # continual.Previous: the run this one continues
    head: list = field(default_factory=list)  # its per-label head tensors (no L2-SP on them)
    continual: dict | None = None  # forgetting figures
    drift_reference: dict | None = None  # what the serve drift monitor compares traffic with
    slice_values: tuple | None = None  # data.slice_columns: (split, {column: value per example})
    slices: dict | None = None  # per-slice metrics of that split

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def outputs(self, model, split: str) -> list:
        return predict_outputs(model, self.encoded[split].features, self.collate, self.task.unbatch, self.accelerator.device,
                               f"eval {split}", self.cfg.train.progress)


def _train(cfg: Config, task, splits, run_dir: Path, resume, callbacks, previous=None) -> Run:
    """The recipe: each stage reads and extends the context; each is short and named for what it does."""
    ctx = _Context(cfg, task, splits, RunDir(run_dir), resume, callbacks, accelerator_for(cfg.train.precision),
                   previous=previous)
    try:
        for stage in (_record_inputs, _search_label_noise, _build_model, _encode_data, _audit_data, _start_trackers, _fit,
                      _restore_best, _choose_decoding, _evaluate, _build_index, _measure_slices, _measure_forgetting, _drift_reference,
                      _save_model, _write_results, _attack, _finish_trackers):
            stage(ctx)
    except BaseException:
        for tracker in ctx.trackers:
            try:
                tracker.close(failed=True)
            except Exception as e:  # the training error is the one to report, not a tracker's
                log.warning("tracker %s could not close its run: %s", type(tracker).__name__, e)
        raise
    return ctx.run


def tracker_names(cfg: Config) -> list[str]:
    """train.trackers, plus tensorboard when the older train.tensorboard switch is on."""
    return list(dict.fromkeys([*cfg.train.trackers, *(["tensorboard"] if cfg.train.tensorboard else [])]))


def _record_inputs(ctx: _Context) -> None:
    if ctx.cfg.data.slice_columns:  # read before training, so a missing column fails fast
        from lmtune.fairness import slices_of
        ctx.task.require(EXAMPLE_LABELS, "data.slice_columns")
        split = "test" if ctx.splits.test else "dev"
        ctx.slice_values = (split, slices_of(ctx.cfg, getattr(ctx.splits, split), ctx.cfg.data.slice_columns))
    if ctx.main and not ctx.resume:
        write_text(ctx.rd.config, ctx.cfg.to_yaml())
        write_json(ctx.rd.splits, ctx.splits.info)


def _search_label_noise(ctx: _Context) -> None:
    cfg, splits = ctx.cfg, ctx.splits
    ctx.noise = _label_noise(cfg, ctx.task, splits, ctx.rd.root, ctx.accelerator) if cfg.data.label_noise_folds else None
    if ctx.noise and cfg.data.drop_label_noise:
        drop = {r["index"] for r in ctx.noise["flagged"]}
        ctx.splits = dataclasses.replace(splits, train=[ex for i, ex in enumerate(splits.train) if i not in drop],
                                         info={**splits.info, "dropped_label_noise": len(drop)})
        log.info("label noise: dropped %d flagged rows from train (%d left)", len(drop), len(ctx.splits.train))
    log.info("run dir %s: %s", ctx.rd.root, ", ".join(f"{k} {v}" for k, v in ctx.splits.info["sizes"].items()))


def _build_model(ctx: _Context) -> None:
    """Backbone + head, frozen parts, augmentation and synonyms (from the pretrained embeddings, before
    PEFT wraps the model), then PEFT and the learning rates."""
    cfg, task, splits = ctx.cfg, ctx.task, ctx.splits
    set_seed(cfg.train.seed)
    model, ctx.tokenizer = task.build_model(cfg, splits.labels)
    if ctx.previous:  # the old run's weights, its head rows kept (before freezing, augmentation and PEFT)
        continual.load_previous(ctx.previous, load)
        ctx.head = continual.warm_start(model, ctx.previous, splits.labels)
        log.info("continual: started from %s (%d labels kept, %d new)", ctx.previous.run_dir,
                 len(set(ctx.previous.labels) & set(splits.labels)), len(set(splits.labels) - set(ctx.previous.labels)))
    freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_layers)
    ctx.resampled = (resample_indices([ex.label for ex in splits.train], cfg.data.resample, cfg.train.seed)
                     if cfg.data.resample != "none" else None)
    # augmented rows come from train only, after the split: dev and test never see them
    ctx.extra = augment(splits.train, cfg.augment, model, ctx.tokenizer) if cfg.augment.methods else []
    ctx.synonyms = (Synonyms(cfg.adversarial.synonyms, model, ctx.tokenizer)
                    if adversaries.meta(cfg.adversarial.method, "needs_synonyms") else None)
    steps = total_steps(cfg.train, len(ctx.resampled if ctx.resampled is not None else splits.train) + len(ctx.extra))
    ctx.model = apply_peft(model, cfg.peft, task.peft_task_type, steps)
    ctx.trainable, ctx.total = count_parameters(ctx.model)
    ctx.lrs = dataclasses.replace(resolve_learning_rates(cfg.train, ctx.model, cfg.peft.method),
                                  metric=cfg.train.metric or task.headline[0])
    log.info("learning rates: encoder %.2g, head %.2g%s; trainable parameters %d of %d (%.2f%%)", ctx.lrs.lr, ctx.lrs.head_lr,
             " (defaults)" if cfg.train.lr is None else "", ctx.trainable, ctx.total, 100 * ctx.trainable / ctx.total)


def _encode_data(ctx: _Context) -> None:
    cfg, task, splits = ctx.cfg, ctx.task, ctx.splits
    ctx.encoded = {name: encode_examples(task, exs, ctx.tokenizer, cfg, splits.labels)
                   for name, exs in (("train", splits.train), ("dev", splits.dev), ("test", splits.test)) if exs}
    for name, enc in ctx.encoded.items():
        if enc.stats["truncated"]:
            log.warning("%s: %d of %d examples are longer than max_length %d and were truncated",
                        name, enc.stats["truncated"], enc.stats["examples"], cfg.data.max_length)
    train = ctx.encoded["train"]
    features = train.features
    if ctx.resampled is not None:  # an example's features (a long text's windows) travel together
        groups = train.windows()
        features = [f for i in ctx.resampled for f in groups[i]]
        log.info("re-sampled train (%s): %d -> %d examples", cfg.data.resample, len(train.examples), len(ctx.resampled))
    ctx.train_features = task.train_features(Encoded(features, train.examples))
    if ctx.extra:
        ctx.extra = encode_examples(task, ctx.extra, ctx.tokenizer, cfg, splits.labels)
        ctx.train_features = ctx.train_features + task.train_features(ctx.extra)
    ctx.collate = functools.partial(task.collate, tokenizer=ctx.tokenizer)


def _audit_data(ctx: _Context) -> None:
    splits = ctx.splits
    ctx.audit_findings = audit(splits, {k: v.stats for k, v in ctx.encoded.items()}, ctx.cfg.data.max_length)
    ctx.audit_findings += ctx.task.audit_findings(splits)
    if ctx.noise:
        ctx.audit_findings.append(noise_finding(ctx.noise, len(splits.train) + splits.info.get("dropped_label_noise", 0)))
    if ctx.main:
        write_json(ctx.rd.audit, ctx.audit_findings)
    for f in ctx.audit_findings:
        if f["severity"] != "info":
            log.warning("data audit: %s (%s): %s. %s", f["check"], f["severity"], f["detail"], f["suggestion"])


def _start_trackers(ctx: _Context) -> None:
    """The main process's trackers open their runs and log the config; they see every step from _fit on."""
    ctx.trackers = [trackers.get(name)(ctx.rd.root, ctx.cfg) for name in tracker_names(ctx.cfg)] if ctx.main else []


def _finish_trackers(ctx: _Context) -> None:
    """Final metrics and the rendered files (report, plots, model card), then the runs are closed."""
    if not ctx.trackers:
        return
    files = [ctx.rd.report, *sorted(ctx.rd.root.glob("*.png")), *([ctx.rd.card] if ctx.rd.card.is_file() else [])]
    document = results.read(ctx.rd.root)
    for tracker in ctx.trackers:
        tracker.finish(document, files)
    for tracker in ctx.trackers:
        tracker.close()
    ctx.trackers = []


def _fit(ctx: _Context) -> None:
    cfg, task = ctx.cfg, ctx.task

    def evaluate_dev(m) -> dict:
        return task.evaluate(ctx.outputs(m, "dev"), ctx.encoded["dev"], ctx.splits.labels)

    ctx.ckpt = Checkpoints(ctx.rd.checkpoints)
    last = ctx.ckpt.path("last") if ctx.resume else None
    ctx.resumed_from = json.loads((last / "state.json").read_text())["step"] if last else None
    t0 = time.perf_counter()
    if cfg.adversarial.method != "none":
        ctx.adversary = adversaries.get(cfg.adversarial.method).build(AdversaryInputs(
            cfg, task, ctx.tokenizer, ctx.splits.labels, ctx.encoded["train"], ctx.extra, ctx.train_features, ctx.collate,
            ctx.synonyms))
    loss = wrap_loss(task.loss, ctx.model, cfg.peft)
    if ctx.previous:
        loss = continual.l2sp_loss(loss, ctx.model, ctx.previous, cfg.continual.l2sp, ctx.head)
    loop_task = LoopTask(ctx.collate, loss, task.num_items, evaluate_dev, ctx.adversary, task.pad_values(ctx.tokenizer))
    with PeakMemory() as ctx.peak_mem:
        ctx.state = train_loop(ctx.model, ctx.train_features, loop_task, ctx.lrs, ctx.ckpt, ctx.accelerator,
                               resume=bool(ctx.resume), callbacks=(*ctx.callbacks, *ctx.trackers),
                               step_hooks=tuple(step_hooks(ctx.model, cfg.peft)))
    ctx.train_seconds = time.perf_counter() - t0  # this process only; a resumed run counts its own part


def _restore_best(ctx: _Context) -> None:
    """The best checkpoint's weights, then the output controls fitted on them (temperature, scorer,
    threshold): dev is predicted once for those and for the metrics."""
    if fsdp.wanted(ctx.cfg.train, ctx.accelerator.num_processes):  # the rest of the recipe runs on a plain model
        ctx.model = ctx.task.build_model(ctx.cfg, ctx.splits.labels)[0].to(ctx.accelerator.device)
    ctx.model = ctx.accelerator.unwrap_model(ctx.model)
    ctx.ckpt.load_weights(ctx.model, "best")
    finalize_peft(ctx.model)
    ctx.model.eval()
    outputs = functools.cache(lambda split: ctx.outputs(ctx.model, split))
    ctx.outputs_final = outputs
    fit_output_controls(ctx.task, ctx.cfg, outputs, ctx.encoded, ctx.splits.labels)


def _choose_decoding(ctx: _Context) -> None:
    """A generating task's decoding settings, searched on a seeded sample of dev (main process)."""
    g = ctx.cfg.generate
    if not (ctx.task.supports(GENERATE) and ctx.main and g.search_trials and ctx.splits.dev):
        return
    dev = _sample(ctx.splits.dev, g.search_examples, ctx.cfg.train.seed)
    found = ctx.task.fit_decoding(ctx.model, ctx.tokenizer, dev, ctx.accelerator.device, ctx.cfg.train.seed, g.search_trials,
                                  ctx.cfg.train.progress)
    log.info("decoding chosen on %d dev examples: %s", len(dev), ", ".join(f"{k} {v}" for k, v in found["chosen"].items()) or "greedy")


def _sample(examples: list, n: int, seed: int) -> list:
    if not n or n >= len(examples):
        return examples
    import random
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def _evaluate(ctx: _Context) -> None:
    for split in ("dev", "test"):
        if split in ctx.encoded:
            out = ctx.outputs_final(split)
            ctx.split_metrics[split] = ctx.task.evaluate(out, ctx.encoded[split], ctx.splits.labels)
            ctx.preds[split] = ctx.task.predictions(out, ctx.encoded[split], ctx.splits.labels)
    if ctx.task.supports(GENERATE) and ctx.main:
        _generate_split(ctx, "test" if ctx.splits.test else "dev")


def _generate_split(ctx: _Context, split: str) -> None:
    """A generating task's outputs on the test split (dev without one), scored against the references;
    the outputs are saved beside them as that split's predictions."""
    examples = _sample(getattr(ctx.splits, split), ctx.cfg.generate.eval_examples, ctx.cfg.train.seed)
    generated = ctx.task.generate(ctx.model, ctx.tokenizer, examples, ctx.accelerator.device, progress=ctx.cfg.train.progress)
    scored = ctx.task.score_generations(examples, generated)
    ctx.split_metrics[split].update(scored)
    ctx.preds[split] = ctx.task.generation_rows(examples, generated)
    log.info("%s: generated %d outputs: ROUGE-L %.4f, repetition loops %.1f%%, hit max_new_tokens %.1f%%", split, len(examples),
             scored.get("rougeL", float("nan")), 100 * scored["repeat_share"], 100 * scored["truncated_share"])


def _build_index(ctx: _Context) -> None:
    """A retrieval run's documents embedded with the final model, saved in RUN/index/ (main process)."""
    if not (ctx.task.supports(INDEX) and ctx.main):
        return
    rows = ctx.task.corpus(ctx.cfg, ctx.splits)
    index = build_index(ctx.task, ctx.model, ctx.tokenizer, ctx.cfg, rows, ctx.accelerator.device)
    index.save(ctx.rd.root)
    ctx.task.set_index(index)
    log.info("index: %d documents embedded into %s", len(rows), ctx.rd.root / "index")


def _measure_slices(ctx: _Context) -> None:
    if ctx.slice_values and ctx.main:
        from lmtune.fairness import slice_metrics
        split, values = ctx.slice_values
        ctx.slices = {"split": split, **slice_metrics(ctx.preds[split], values, seed=ctx.cfg.train.seed)}


def _measure_forgetting(ctx: _Context) -> None:
    """A continued run: its metric on the old run's test split, next to the old model's."""
    prev = ctx.previous
    if not prev or not prev.old_test:
        return
    enc = encode_examples(ctx.task, prev.old_test, ctx.tokenizer, ctx.cfg, ctx.splits.labels)
    out = predict_outputs(ctx.model, enc.features, ctx.collate, ctx.task.unbatch, ctx.accelerator.device, "eval old test",
                          ctx.cfg.train.progress)
    metric = ctx.lrs.metric
    ctx.continual = continual.forgetting(prev, ctx.task.evaluate(out, enc, ctx.splits.labels), metric)
    if "forgetting" in ctx.continual:
        log.info("continual: old test %s %.4f -> %.4f (forgetting %.4f)", metric, ctx.continual["before"],
                 ctx.continual["after"], ctx.continual["forgetting"])


def _drift_reference(ctx: _Context) -> None:
    """What `lmtune serve` compares live traffic with; a model that cannot be embedded serves without it."""
    if ctx.main and ctx.splits.dev and "dev" in ctx.preds:
        from lmtune.drift import reference_arrays
        try:
            ctx.drift_reference = reference_arrays(ctx.model, ctx.task, ctx.tokenizer, ctx.cfg, ctx.splits.labels,
                                                   ctx.splits.dev, ctx.preds["dev"])
        except InputError as e:
            log.info("no drift reference saved (%s)", e)


def _save_model(ctx: _Context) -> None:
    if not ctx.main:
        return
    if ctx.previous and is_peft(ctx.model):  # an adapter over the old run's weights: only the merged model stands alone
        from lmtune.peft import merge
        ctx.model = merge(ctx.model, ctx.cfg.peft.method)
    cfg, task, model = ctx.cfg, ctx.task, ctx.model
    meta = {"task": task.name, "labels": ctx.splits.labels, "config": cfg.to_dict(), "lmtune_version": _version(),
            "task_state": task.state()}
    if is_peft(model):
        base_path = resolve_model(cfg.model.name)
        meta["base_model"] = {"name": cfg.model.name, "path": base_path, "sha256": base_fingerprint(base_path)}
    with atomic_dir(ctx.rd.model) as tmp, quiet_transformers():
        save_adapter(model, tmp) if is_peft(model) else model.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        save_task_arrays(task, tmp)
        write_meta(tmp, meta)
    if ctx.drift_reference:  # beside the model, not in it: it is monitoring data, not part of the artifact
        from safetensors.numpy import save

        from lmtune.drift import REFERENCE
        from lmtune.io import atomic_path
        with atomic_path(ctx.rd.root / REFERENCE) as tmp_ref:  # bytes into the temp: it keeps the run's file mode
            tmp_ref.write_bytes(save(ctx.drift_reference))
    for split, rows in ctx.preds.items():
        write_jsonl(ctx.rd.predictions(split), rows)


def _train_summary(ctx: _Context) -> dict:
    cfg, state = ctx.cfg, ctx.state
    summary = {"run_name": ctx.rd.root.name, "task": ctx.task.name, "model": cfg.model.name,
               "data": json.dumps({k: v for k, v in ctx.splits.info.items() if not k.endswith("_rows")}),
               "sizes": ctx.splits.info["sizes"], "labels": ctx.splits.labels, "max_length": cfg.data.max_length,
               "truncation": {k: v.stats for k, v in ctx.encoded.items()},
               "trainable_params": ctx.trainable, "total_params": ctx.total, "steps": state.step,
               "lr": ctx.lrs.lr, "head_lr": ctx.lrs.head_lr, "peft_method": cfg.peft.method,
               "trainable_pct": 100 * ctx.trainable / ctx.total, "peak_mem_mb": ctx.peak_mem.peak_mb,
               "peak_mem_increase_mb": ctx.peak_mem.peak_mb - ctx.peak_mem.start_mb,
               # from the per-step times in the history, which a resumed run carries over from its first
               # part: the whole run's speed, not only the resumed part's
               "seconds_per_epoch": _seconds_per_epoch(state.history, math.ceil(len(ctx.train_features) / cfg.train.batch_size)),
               "resumed": ({"from_step": ctx.resumed_from, "steps_this_part": state.step - ctx.resumed_from,
                            "seconds_this_part": ctx.train_seconds} if ctx.resumed_from is not None else None),
               "rank_pattern": rank_pattern(ctx.model),
               "train_seconds": ctx.train_seconds, "eval_seconds": state.eval_seconds,
               "checkpoint_seconds": state.checkpoint_seconds, "stop_reason": state.stop_reason,
               "best_step": state.best_step, "best_metric": state.best_metric}
    summary["artifact_mb"] = artifact_bytes(ctx.rd.model) / 2**20
    step_rows = [r["seconds"] for r in state.history if "seconds" in r]
    summary["seconds_per_step"] = sum(step_rows) / max(len(step_rows), 1)
    if ctx.adversary:
        summary["adversarial"] = ctx.adversary.describe()
    return summary


TRAIN_KEYS = ("steps", "lr", "head_lr", "peft_method", "trainable_pct", "artifact_mb", "peak_mem_mb", "peak_mem_increase_mb",
              "seconds_per_epoch", "resumed", "seconds_per_step", "rank_pattern", "train_seconds", "eval_seconds",
              "checkpoint_seconds", "stop_reason", "best_step", "best_metric", "trainable_params", "total_params", "truncation")


def _write_results(ctx: _Context) -> None:
    """metrics.json, history.jsonl and report.md (main process), then the Run every process returns."""
    if ctx.main:
        summary, lrs, state = _train_summary(ctx), ctx.lrs, ctx.state
        keys = (*(("adversarial",) if ctx.adversary else ()), *TRAIN_KEYS)
        metrics = {**ctx.split_metrics, "train": {k: summary[k] for k in keys}, "metric": lrs.metric,
                   "headline": list(ctx.task.headline), **({"continual": ctx.continual} if ctx.continual else {})}
        baseline = (_majority_baseline(ctx.splits.dev) if lrs.metric == "accuracy" and ctx.task.supports(EXAMPLE_LABELS)
                    else None)
        findings = diagnose(state.history, lrs.metric, baseline)
        metrics["diagnosis"] = findings
        write_json(ctx.rd.metrics, metrics)
        write_jsonl(ctx.rd.history, state.history)
        for f in findings:
            log.warning("fit diagnosis: %s (%s): %s. %s", f["kind"], f["severity"], f["evidence"], f["advice"])
        results.write(ctx.rd.root, {"summary": summary, "metrics": ctx.split_metrics, "metric": lrs.metric,
                                    "headline": list(ctx.task.headline), "diagnosis": findings, "audit": ctx.audit_findings,
                                    "task_report": ctx.task.report_state(),
                                    **({"continual": ctx.continual} if ctx.continual else {}),
                                    **({"slices": ctx.slices} if ctx.slices else {})})
        results.render(ctx.rd.root)
        if ctx.task.supports(GENERATE):  # the outputs' control checks and the decoding chosen, as data
            write_json(ctx.rd.root / "generation.json", {"decoding": ctx.task.decoding, "search": ctx.task.search,
                                                         "splits": {k: m for k, m in ctx.split_metrics.items() if "rougeL" in m}})
    ctx.accelerator.wait_for_everyone()
    ctx.run = Run(ctx.rd.root, ctx.model, ctx.tokenizer, ctx.task, ctx.splits.labels, ctx.cfg, ctx.rd.read_metrics())


def _attack(ctx: _Context) -> None:
    cfg, run = ctx.cfg, ctx.run
    if not (cfg.attack.methods and ctx.main):
        return
    result = run.attack(cfg.attack.data) if cfg.attack.data else run.attack_examples(ctx.splits.dev)
    for name, a in result["attacks"].items():
        if "skipped" not in a:
            log.info("attack %s: %s %.4f (clean %.4f)%s", name, result["metric"], a[result["metric"]],
                     result["clean"][result["metric"]], f", success rate {a['success_rate']:.1%}" if "success_rate" in a else "")


def _seconds_per_epoch(history: list[dict], steps_per_epoch: int) -> float:
    steps = [r["seconds"] for r in history if "seconds" in r]
    return sum(steps) / max(len(steps), 1) * steps_per_epoch


def _label_noise(cfg: Config, task, splits, run_dir: Path, accelerator) -> dict:
    """Confident-learning search over train; cached in the run dir so a resumed run does not redo it."""
    cache = run_dir / "label_noise.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    probs = out_of_fold_probs(cfg, task, splits.train, splits.labels, cfg.data.label_noise_folds, accelerator)
    result = find_label_issues(splits.train, splits.labels, probs)
    if accelerator.is_main_process:
        write_jsonl(run_dir / "label_noise.jsonl", result["flagged"])
        write_json(cache, result)
    log.info("label noise: %d of %d training rows flagged (label_noise.jsonl)", len(result["flagged"]), len(splits.train))
    return result


def _majority_baseline(examples: list) -> float | None:
    """Accuracy of always answering the most frequent dev label (examples of a task with EXAMPLE_LABELS)."""
    labels = [ex.label for ex in examples]
    if not labels or None in labels:
        return None
    return max(labels.count(x) for x in set(labels)) / len(labels)


COMPARED = ("trainable_pct", "artifact_mb", "peak_mem_mb", "seconds_per_epoch")


def _compare_with_full(run: Run, cfg: Config, splits) -> None:
    """peft.compare_full: full fine-tuning on the same splits, its figures next to the PEFT run's."""
    sub = run.run_dir / "full_finetune_comparison"
    if RunDir(sub).metrics.is_file():  # finished by an earlier (resumed) call
        full_metrics = RunDir(sub).read_metrics()
    else:
        shutil.rmtree(sub, ignore_errors=True)  # our own unfinished output, never user data
        sub.mkdir(parents=True)
        d = cfg.to_dict()
        d.update(output_dir=str(run.run_dir), run_name=sub.name)
        d["peft"] = {**d["peft"], "method": "none", "compare_full": False}
        d["train"] = {**d["train"], "lr": None, "head_lr": None}  # full fine-tuning's own defaults
        full_metrics = _train(build_config(d), get_task(cfg.task), splits, sub, False, ()).metrics
    metric = run.metrics["metric"]
    rows = {cfg.peft.method: run.metrics, "full": full_metrics}
    table = {name: {metric: m["dev"][metric], **{k: m["train"][k] for k in COMPARED}} for name, m in rows.items()}
    run.metrics["comparison"] = table
    write_json(RunDir(run.run_dir).metrics, run.metrics)
    results.update(run.run_dir, comparison=table)


def _version() -> str:
    from lmtune import __version__
    return __version__
