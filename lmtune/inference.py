"""The inference facade: `Run` (a trained model and its run directory: predict, evaluate, explain,
embed, search, attack ...) and its loaders, `load` (model/ on torch, or the ONNX export), plus
what other modules reuse of it: `fit_output_controls`, `embed_texts`, `build_index`."""
from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune import runtime
from lmtune.artifacts import RunDir, read_meta, restore_task_state, update_task_state
from lmtune.config import Config, build_config
from lmtune.errors import InputError
from lmtune.evaluate.abstain import DEFAULT_VALUE
from lmtune.models import quiet_transformers, resolve_model
from lmtune.peft import base_fingerprint, is_adapter_dir, load_adapter
from lmtune.registry import backends
from lmtune.rerank import rerank
from lmtune.tasks import get_task
from lmtune.tasks.base import ABSTAIN, CALIBRATE, DEV_RULES, GENERATE, INDEX, INTERVALS, RERANK, encode_examples
from lmtune.training.loop import predict_outputs

log = logging.getLogger("lmtune")

def fit_output_controls(task, cfg: Config, outputs, encoded: dict, labels: list[str]) -> dict:
    """What the trained model's outputs are tuned with after training, in order: the temperature
    (on dev), the Mahalanobis scorer (on train), the abstention threshold (on dev). outputs(split)
    gives the model's outputs on encoded[split]. Export calls it again for a pruned model."""
    fitted = {}
    if cfg.train.calibrate and task.supports(CALIBRATE):
        c = fitted["calibration"] = task.calibrate(outputs("dev"), encoded["dev"], labels)
        if "decision" in c:  # applied only where it lowers the held-out dev ECE (evaluate.calibration.choose_temperature)
            log.info("calibration: %s (%s); temperature %.3f", c["decision"], c["method"], float(np.mean(c["temperature"])))
        else:
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

    def encode(self, examples: list) -> Any:
        """Examples as the model reads them (features and their bookkeeping)."""
        return encode_examples(self.task, examples, self.tokenizer, self.config, self.labels)

    def outputs(self, enc) -> list:
        """The model's raw outputs for encoded examples, one per example, in order."""
        self.model.to(runtime.device())
        collate = functools.partial(self.task.collate, tokenizer=self.tokenizer)
        self.task.prepare_outputs(self.model, enc.features, collate, runtime.device())
        return predict_outputs(self.model, enc.features, collate, self.task.unbatch, runtime.device(),
                               progress=self.config.train.progress)

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
        enc = self.encode(examples)
        return self.task.predictions(self.outputs(enc), enc, self.labels)

    def generate_examples(self, examples: list, settings: dict | None = None, max_new_tokens: int | None = None,
                          streamer: Any = None, constraint: Any = "run") -> list[dict]:
        """A generating task's outputs, with the decoding chosen on dev (or `settings`), constrained as the
        run was trained to be (generate.schema / choices / regex), or by `constraint` (a
        lmtune.structured.Constraint, e.g. a request's JSON schema), or not at all (None)."""
        self.task.require(GENERATE, "generate")
        self.model.to(runtime.device())
        return self.task.generate(self.model, self.tokenizer, examples, runtime.device(), settings, self.config.train.progress,
                                  max_new_tokens, streamer, constraint)

    def embed(self, texts: Sequence[str], documents: bool = False) -> np.ndarray:
        """A retrieval run's unit-length embeddings [texts, hidden] of queries (or of documents)."""
        self.task.require(INDEX, "embed")
        return embed_texts(self.task, self.model, self.tokenizer, self.config, list(texts), documents, runtime.device())

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
        index = build_index(self.task, self.model, self.tokenizer, self.config, rows, runtime.device())
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
        enc = self.encode(examples)
        result = self.task.fit_threshold(self.outputs(enc), enc, self.labels, target, value, calibrated,
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
        enc = self.encode(examples)
        metrics = self.task.evaluate(self.outputs(enc), enc, self.labels)
        metrics["truncated"] = enc.stats["truncated"]
        if self.task.supports(GENERATE):
            generated = self.generate_examples(examples)
            metrics.update(self.task.score_generations(examples, generated))
            metrics.update(self.task.compare_unconstrained(self.model, self.tokenizer, examples, runtime.device(), generated,
                                                           self.config.train.progress))
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

    def split_examples(self, split: str) -> list:
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
    rd = RunDir(run_dir)
    if not rd.finished():
        raise InputError(f"{run_dir}: not a finished lmtune run (no {rd.model_meta.relative_to(run_dir)}). Train it first, "
                         "or resume it with `lmtune train CONFIG --resume`.")
    meta = read_meta(rd.model)
    task = get_task(meta["task"])
    restore_task_state(task, meta, rd.model)
    in_run = meta.get("base_model", {}).get("in_run")
    if in_run:  # the base model is inside the run: found wherever the run is now, from any working directory
        meta["config"]["model"]["name"] = str(run_dir.resolve() / in_run)
    cfg = build_config(meta["config"])
    model, tokenizer = _load_model(rd, meta, task, cfg)
    metrics = rd.read_metrics()
    if task.supports(INDEX):
        from lmtune.index import load_index
        task.set_index(load_index(run_dir))
    return Run(run_dir, model.to(runtime.device()).eval(), tokenizer, task, meta["labels"], cfg, metrics)


def _load_model(rd: RunDir, meta: dict, task: Any, cfg: Config) -> tuple[torch.nn.Module, Any]:
    """model/'s weights and tokenizer: an ensemble's members, an adapter over its base model, or a whole model."""
    if "ensemble" in meta:  # an ensemble run (lmtune ensemble): its members' models, averaged
        from transformers import AutoTokenizer

        from lmtune.search.members import EnsembleModel
        e = meta["ensemble"]
        gone = [m for m in e["members"] if not RunDir(m).finished()]
        if gone:
            raise InputError(f"{rd.root}: ensemble member {gone[0]} is gone; an ensemble reads its members where it was built.")
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(rd.model)
        return EnsembleModel([load(m).model for m in e["members"]], e["weights"], e["temperatures"]), tokenizer
    if is_adapter_dir(rd.model):
        base = meta.get("base_model", {})
        path = resolve_model(cfg.model.name)
        if base.get("sha256") and base_fingerprint(path) not in (None, base["sha256"]):
            raise InputError(f"{rd.root}: the base model at {path} is not the one this adapter was trained on "
                             "(weights hash differs). Install the same base model.")
        model, tokenizer = task.build_model(cfg, meta["labels"])
        return load_adapter(model, rd.model), tokenizer
    return task.load_model(rd.model)


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
    rd = RunDir(run_dir)
    export, file = rd.export, backends.meta(backend, "file")
    meta = read_meta(export) if rd.export_meta.is_file() else {}
    # an ensemble's export names its members, each exported in its own run directory
    paths = [RunDir(m).export / file for m in meta["ensemble"]["members"]] if "ensemble" in meta else [export / file]
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
    restore_task_state(task, meta, export)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(export)
    metrics = rd.read_metrics()
    return Run(run_dir, model, tokenizer, task, meta["labels"], build_config(meta["config"]), metrics, backend)

