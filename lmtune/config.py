"""One typed config object that flows from YAML and CLI flags to every part of lmtune.

Each field carries its default, a one-line help text, its allowed values or numeric bounds; `lmtune
config` prints them, `lmtune config --schema` writes them as a JSON Schema (what editors complete and
check a config file against), and the README's field list is generated from the same metadata.

The sections stay plain dataclasses, validated by pydantic rather than rewritten as pydantic models:
about a hundred places read cfg.train.lr, build TrainConfig(...) directly, pickle and deepcopy
configs, and tasks compose their own fields into a section (section_class); dataclasses keep all of
that unchanged. From the dataclass fields and their option() metadata one pydantic model per set of
sections is generated (config_model): it checks every value (strictly: "3" is no int, True is no 1)
and its JSON Schema carries each key's description, bounds (minimum, exclusiveMaximum ...) and enum,
with unknown keys refused (additionalProperties: false).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import operator
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from lmtune import registry
from lmtune.errors import InputError
from lmtune.registry import Registry, adversaries, attacks, augmenters, config_sections, peft_methods, tasks, trackers

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
log = logging.getLogger(__name__)
BOUNDS = ("ge", "gt", "le", "lt")  # pydantic's Field names for >=, >, <=, <: the schema's minimum, exclusiveMinimum ...


def option(default: Any, help: str, choices: tuple | Registry | None = None, *, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, range: str | None = None,
           path: bool = False, configs: bool = False) -> Any:
    """A config field: its default, help text (the schema's description), allowed values (a tuple, or a
    registry whose names are read when the config is checked; on a list field they bound its items) and
    numeric bounds ge / gt / le / lt, checked by pydantic and written into the schema. A task or feature
    declares the fields it owns with this helper in its own module (lmtune/registrations.py lists them).
    `range` is the older spelling of the bounds ("> 0", ">= 1", "[0, 1)"), still read for sections declared
    elsewhere; it becomes the same bounds. `path`: the value is a file or folder (a list of them on a list
    field): a YAML file's relative value resolves against the file's folder (build_config), and the dashboard
    confines it (lmtune.ui.confine). `configs`: the files are lmtune config files themselves (task multitask's
    sub-tasks), whose own path-valued keys the dashboard confines too (config_file_keys)."""
    bounds = {k: v for k, v in zip(BOUNDS, (ge, gt, le, lt)) if v is not None}
    if range is not None:
        bounds.update(_bounds_of(range))
    meta = {"help": help, "choices": choices, "range": _range_text(bounds), "path": path or configs, "configs": configs,
            **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


_f = option  # the short name this module's long field lists use


def _bounds_of(spec: str) -> dict[str, float]:
    """The older range text as bounds: "> 0" -> {gt: 0}; "[0, 1)" -> {ge: 0, lt: 1}."""
    if spec.startswith((">", "<")):
        op, bound = spec.split()
        return {{">": "gt", ">=": "ge", "<": "lt", "<=": "le"}[op]: float(bound)}
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return {"ge" if spec[0] == "[" else "gt": lo, "le" if spec[-1] == "]" else "lt": hi}


def _range_text(bounds: dict[str, float]) -> str | None:
    """{ge: 0, lt: 1} -> "[0, 1)"; {gt: 0} -> "> 0": how `lmtune config` and errors show the bounds."""
    lo = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    hi = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    num = "{:g}".format
    if lo and hi:
        return f"{'[' if lo[0] == 'ge' else '('}{num(lo[1])}, {num(hi[1])}{']' if hi[0] == 'le' else ')'}"
    if lo or hi:
        op, value = lo or hi
        return f"{dict(ge='>=', gt='>', le='<=', lt='<')[op]} {num(value)}"
    return None


@dataclass
class DataConfig:
    """What to read: the files, their columns, lengths and splits."""

    train: str | None = _f(None, path=True, help="Training file (CSV, TSV, JSONL; parquet, arrow or a datasets save_to_disk folder). Required "
                                 "unless data.hub is set.")
    dev: str | None = _f(None, "Dev file; if absent (and test absent) train is split.", path=True)
    test: str | None = _f(None, "Test file; if absent (and dev absent) train is split.", path=True)
    hub: str | None = _f(None, "A dataset on the Hugging Face Hub, loaded with datasets.load_dataset; its splits fill data.train / "
                               "dev / test left unset (see data.hub_split_map).")
    hub_config: str | None = _f(None, "data.hub: the dataset's configuration (subset) name.")
    hub_split_map: dict[str, str | None] | None = _f(None, "data.hub: which Hub split is lmtune's train / dev / test; default "
                                                     "{train: train, dev: validation, test: test}; a null split is not used.")
    format: str = _f("auto", "File format; auto picks by extension (NER: .jsonl -> jsonl, else conll).",
                     ("auto", "csv", "tsv", "jsonl", "conll"))
    text_column: str = _f("text", "Column (or JSON key) holding the text.")
    text_pair_column: str | None = _f(None, "Second text column for sentence-pair tasks.")
    label_column: str = _f("label", "Column (or JSON key) holding the label.")
    encoding: str = _f("utf-8", "Text encoding of the data files.")
    split: list[float] = _f([0.7, 0.18, 0.12], "train/dev/test fractions used when only train is given.")
    max_length: int = _f(128, "Max tokens per example; classification truncates (and counts), NER cuts windows.", ge=8)
    window_overlap: int | None = _f(None, "NER, and classification with long_text windows: sub-tokens shared by consecutive "
                                          "windows of a long text; default 1/4 of a window.", ge=0)
    long_text: str = _f("truncate", "Classification / multi-label texts longer than max_length: truncate (and count), or "
                                    "windows (every token in some window; each window is trained on with the text's label, and "
                                    "the windows' logits are averaged at prediction).", ("truncate", "windows"))
    max_windows: int = _f(8, "long_text windows: at most this many windows of one text are trained on (evenly spread, "
                             "first and last kept); prediction uses every window.", ge=1)
    window_pooling: str = _f("mean", "long_text windows: how the windows' logits become the text's: mean, or max per class.",
                             ("mean", "max"))
    group_column: str | None = _f(None, "`lmtune cv`: column whose rows must stay in one fold (a user, a document, a "
                                        "conversation): grouped stratified folds.")
    slice_columns: list[str] = _f([], "Columns of the data (product, region, channel, language) whose values are slices: "
                                  "per-slice test metrics, the gap to the overall metric with a bootstrap interval, and "
                                  "the slices significantly worse, in results and report.md.")
    label_noise_folds: int = _f(0, "Classification: before training, find label-noise candidates by confident learning on "
                                   "k-fold out-of-fold probabilities (k extra fine-tunings); 0 = off.", ge=0)
    drop_label_noise: bool = _f(False, "Drop the rows the label-noise search flags from train before training.")
    resample: str = _f("none", "Classification: re-sample train per epoch so classes are balanced (oversample the rare "
                               "ones, or undersample the frequent ones).", ("none", "oversample", "undersample"))

    def validate(self, cfg: Config, where: str) -> None:
        s = self.split
        if len(s) != 3 or any(x < 0 for x in s) or abs(sum(s) - 1) > 1e-6 or s[0] <= 0:
            raise InputError(f"{where}: data.split must be three non-negative fractions summing to 1, got {s}.")
        if self.label_noise_folds == 1:
            raise InputError(f"{where}: data.label_noise_folds must be 0 (off) or at least 2, got {self.label_noise_folds}.")
        if self.drop_label_noise and not self.label_noise_folds:
            raise InputError(f"{where}: data.drop_label_noise needs data.label_noise_folds >= 2 (the search that flags rows).")


@dataclass
class ModelConfig:
    """The pretrained backbone, and which of its parts stay frozen."""

    name: str = _f(DEFAULT_MODEL, "Hugging Face model id or local path (the packaged MiniLM by default).")
    dropout: float | None = _f(None, "Override the model's dropout probabilities (hidden and attention).", ge=0, lt=1)
    gguf_file: str | None = _f(None, "GGUF weights file in model.name's folder or hub repo (dequantized on load; "
                                     "found automatically when a folder without config.json holds one).")
    freeze_embeddings: bool = _f(False, "Freeze the embedding layer.")
    freeze_layers: int = _f(0, "Freeze the first N transformer layers.", ge=0)


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, learning rates, schedule, precision, early stopping, trackers."""

    epochs: int = _f(3, "Passes over the training data (ignored when max_steps > 0).", ge=0)
    max_steps: int = _f(0, "Stop after this many optimizer steps; 0 = use epochs.", ge=0)
    batch_size: int = _f(16, "Examples per optimizer step (before accumulation is split out).", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step; batch_size is split into this many.", ge=1)
    lr: float | None = _f(None, "Peak encoder learning rate; default by model width (1e-4 below 768, 5e-5 at 768, 2e-5 "
                               "above), or per PEFT method (lora 1e-3, adalora 2e-3, ia3 5e-3, prefix 1e-2, prompt 3e-2, adapter 1e-3).", gt=0)
    head_lr: float | None = _f(None, "Learning rate of the newly initialised task head; default 10 x lr (full) or lr (PEFT).", gt=0)
    weight_decay: float = _f(0.01, "AdamW weight decay (never applied to biases and norm weights).", ge=0)
    layer_lr_decay: float = _f(1.0, "Layer-wise lr decay: layer i of N gets lr * decay**(N - i).", gt=0, le=1)
    schedule: str = _f("linear", "Learning-rate schedule after warmup.", ("linear", "cosine", "constant"))
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming up linearly from 0.", ge=0, lt=1)
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm; 0 disables clipping.", ge=0)
    precision: str = _f("auto", "auto = bf16 on a GPU that has it, else fp32.", ("auto", "fp32", "bf16", "fp16"))
    group_by_length: bool = _f(True, "Batch examples of similar length together (less padding, faster).")
    seed: int = _f(42, "Seed for splits, data order, dropout and head initialisation.", ge=0)
    eval_every: int = _f(0, "Evaluate on dev every N optimizer steps; 0 = once per epoch.", ge=0)
    metric: str | None = _f(None, "Dev metric for early stopping and the best checkpoint, one of the task's headline metrics; "
                                  "default: the first (accuracy for classification, f1 for NER, macro_f1 for multi-label, "
                                  "spearman for regression).")
    patience: int = _f(0, "Stop after this many evaluations without improvement; 0 = never.", ge=0)
    class_weights: str = _f("none", "Loss weights: auto = inverse class frequency in train (NER: per tag) for imbalance.",
                            ("none", "auto"))
    focal_gamma: float = _f(0.0, "Focal loss gamma (0 = plain cross-entropy; 2 is usual for imbalance).", ge=0)
    loss: str = _f("auto", "Regression loss on standardized targets: auto (= mse), mse, or huber (robust to outliers).",
                   ("auto", "mse", "huber"))
    calibrate: bool = _f(True, "Try temperature scaling on dev after training (classification; NER: on each word's tag "
                               "distribution); applied only where it lowers the held-out dev ECE (2-fold "
                               "cross-validation on dev), and then folded into the saved output layer.")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard package); the same as trackers [tensorboard].")
    trackers: list[str] = _f([], "Experiment trackers (main process only) of the config, every step's metrics, the final metrics "
                             "and the report, plots and model card. mlflow: MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db; "
                             "wandb: honours WANDB_MODE=offline; tensorboard: RUN_DIR/tensorboard.", trackers)
    progress: str = _f("auto", "Progress display: auto = bars on a terminal, lines otherwise.", ("auto", "bar", "lines", "none"))
    # the fast path (lmtune/training/fast.py): each piece on by default with CUDA, each can be switched off
    compile: str = _f("auto", "torch.compile the whole model for training steps (one compile, dynamic shapes); reduce-overhead "
                              "adds a CUDA graph per length bucket for forward and backward; auto = off when the step graphs "
                              "below record the whole step (on an H200 default mode saved 0.7 s per CoNLL epoch but its "
                              "compile took 3 minutes), reduce-overhead on a GPU otherwise, off on CPU.",
                      ("auto", "off", "default", "reduce-overhead", "max-autotune"))
    step_graphs: str = _f("auto", "Record each length bucket's whole optimizer step (forward, loss, backward, clip, AdamW) "
                                  "as one CUDA graph after 2 eager steps, and replay it; auto = on a GPU for one process "
                                  "without gradient accumulation, fp16 or an adversary (else off, said once in the log).",
                          ("auto", "on", "off"))
    length_buckets: str = _f("auto", "Pad each training batch up to the next of a few static lengths (16, 32, 64, ...; "
                                     "masked, labels ignored: the same loss), so a compiled model sees few shapes; auto = on "
                                     "when the model is compiled or steps are recorded.", ("auto", "on", "off"))
    sync_free: str = _f("auto", "Keep step losses and gradient norms on the device and read them every 50 steps and at "
                                "evaluations (no host-device wait per step; a non-finite loss then stops the run at the "
                                "next read); auto = on a GPU.", ("auto", "on", "off"))
    prefetch: str = _f("auto", "Collate the next batches in a background thread and copy them through pinned memory; "
                               "auto = on a GPU.", ("auto", "on", "off"))
    fused_optimizer: bool = _f(True, "Fused AdamW (one kernel for all parameters) where torch has it.")
    fsdp: str = _f("auto", "Shard the model across processes (torch FSDP2: each transformer layer a unit; checkpoints and "
                           "model/ hold consolidated weights); auto = when the launcher asks (accelerate launch with an FSDP "
                           "config). Full fine-tuning only; needs more than one process.", ("auto", "on", "off"))

    def validate(self, cfg: Config, where: str) -> None:
        if self.batch_size < self.grad_accum:
            raise InputError(f"{where}: train.batch_size ({self.batch_size}) must be at least "
                             f"train.grad_accum ({self.grad_accum}) >= 1: the batch is split into grad_accum micro-batches.")
        if self.epochs < 1 and self.max_steps < 1:
            raise InputError(f"{where}: set train.epochs >= 1 or train.max_steps >= 1.")
        if self.fsdp == "on" and (cfg.peft.method != "none" or cfg.continual.from_run):
            raise InputError(f"{where}: train.fsdp shards full fine-tuning only: set peft.method none and no continual.from_run, "
                             "or train.fsdp off (PEFT trains few weights: plain data parallel suits it).")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (LoRA, AdaLoRA, IA3, prefix or prompt tuning, adapters)."""

    method: str = _f("none", "Parameter-efficient method; none = full fine-tuning.", peft_methods)
    r: int = _f(8, "LoRA rank.", ge=1)
    alpha: int = _f(16, "LoRA / AdaLoRA scaling alpha.", gt=0)
    dropout: float = _f(0.1, "LoRA / AdaLoRA dropout.", ge=0, lt=1)
    target_modules: list[str] | None = _f(None, "Modules to adapt; default: every linear layer of the encoder (LoRA, AdaLoRA), "
                                          "peft's per-architecture choice (IA3).")
    init_r: int = _f(12, "AdaLoRA: initial rank of every adapted matrix.", ge=1)
    target_r: int = _f(4, "AdaLoRA: average rank to keep after budgeting.", ge=1)
    tinit: float = _f(0.1, "AdaLoRA: fraction of steps before budgeting starts.", ge=0, lt=1)
    tfinal: float = _f(0.2, "AdaLoRA: fraction of final steps with ranks fixed.", ge=0, lt=1)
    delta_t: int = _f(10, "AdaLoRA: steps between two budget allocations.", ge=1)
    num_virtual_tokens: int = _f(20, "Prefix / prompt tuning: number of virtual tokens.", ge=1)
    adapter_size: int = _f(64, "Bottleneck adapter width.", ge=1)
    compare_full: bool = _f(False, "Also run full fine-tuning on the same data and report both side by side.")


@dataclass
class AbstainConfig:
    """Abstention: a confidence threshold chosen on dev, below which predict returns the abstain label."""

    target: str = _f("none", "Choose a confidence threshold on dev for this target; below it predict returns the "
                             "abstain label. precision: accuracy of answered dev examples >= value; coverage: share "
                             "answered >= value; false_accept: share of out-of-scope (or misclassified) dev examples "
                             "answered <= value; accuracy_loss: refuse as much as possible while in-scope accuracy (abstaining counts as "
                             "wrong) stays at most value below answering everything.",
                  ("none", "precision", "coverage", "false_accept", "accuracy_loss"))
    value: float | None = _f(None, "The target's value; default precision 0.95, coverage 0.9, false_accept 0.1, accuracy_loss 0.02.", ge=0, le=1)
    calibrated: bool = _f(True, "Threshold the temperature-scaled probability (else the raw softmax).")
    score: str = _f("probability", "What the threshold is put on. probability: the top class's probability; mahalanobis: "
                                   "minus the Mahalanobis distance of the [CLS] feature to the nearest class mean (means and a "
                                   "shared covariance fitted on train after training; far better at out-of-scope inputs the "
                                   "model is confidently wrong about).", ("probability", "mahalanobis"))
    label: str = _f("abstain", "Label predict returns when the model abstains (oos_label instead when that is set).")
    interval_coverage: float = _f(0.9, "Regression: coverage of the prediction intervals (split conformal prediction on dev).",
                                  gt=0, lt=1)
    max_interval_width: float | None = _f(None, "Regression: abstain when a prediction's interval is wider than this "
                                                "(the value is still returned).", gt=0)
    oos_label: str | None = _f(None, "Label of out-of-scope rows (e.g. oos). In train it is an explicit out-of-scope class; "
                                     "in dev/test only, those rows tune the threshold and measure out-of-scope recall.")


@dataclass
class AdversarialConfig:
    """Adversarial training, on the word embeddings or on the words."""

    method: str = _f("none", "Adversarial training on the word-embedding output: fgm (one gradient-sign step of size "
                             "epsilon), pgd (steps projected steps of size alpha inside an epsilon ball), freelb "
                             "(steps ascent steps, parameter gradients averaged); or on the words: typo / synonym (of "
                             "`candidates` random typo / synonym versions of each example, the one the model finds "
                             "hardest is trained on next to the clean one).", adversaries)
    epsilon: float = _f(0.3, "Per-example L2 bound of the embedding perturbation (FreeLB: 0 = unbounded). A word "
                              "embedding of MiniLM/BERT has norm ~1; 1.0 per example stops a MiniLM from learning at all.", ge=0)
    alpha: float = _f(0.1, "PGD / FreeLB step size (FreeLB: also the size of the random start).", gt=0)
    steps: int = _f(3, "PGD / FreeLB ascent steps per optimizer micro-batch.", ge=1)
    rate: float = _f(0.2, "typo / synonym: share of the words of an example that one candidate changes (at least one).", gt=0, le=1)
    candidates: int = _f(8, "typo / synonym: random versions scored per example and step; the worst is trained on.", ge=1)
    synonyms: str = _f("auto", "synonym: substitute source (as attack.synonyms).", ("auto", "wordnet", "embedding"))

    def validate(self, cfg: Config, where: str) -> None:
        # the ranges cover the rest; only FreeLB may run unbounded
        if adversaries.meta(self.method, "kind") == "embedding" and self.method != "freelb" and self.epsilon == 0:
            raise InputError(f"{where}: adversarial needs epsilon > 0 (FreeLB: >= 0), alpha > 0 and steps >= 1; got "
                             f"epsilon {self.epsilon}, alpha {self.alpha}, steps {self.steps}.")


@dataclass
class AttackConfig:
    """Robustness attacks run after training (`lmtune attack` runs them on a finished run)."""

    methods: list[str] = _f([], "Attacks run on dev (or attack.data) after training, into robustness.json and report.md: "
                            "typo (random character edits), synonym (random word substitutions), search (greedy "
                            "word-importance attack that looks for the smallest change that flips the prediction).", attacks)
    data: str | None = _f(None, "Labeled file to attack instead of dev.", path=True)
    rate: float = _f(0.2, "typo / synonym: share of the words of each example that are changed (at least one).", gt=0, le=1)
    budget: float = _f(0.1, "search: most words it may change, as a share of the example's words (at least one).", gt=0, le=1)
    synonyms: str = _f("auto", "Substitutes: auto = WordNet for English when installed (lmtune[robust]), else the "
                               "model's nearest input-embedding neighbours.", ("auto", "wordnet", "embedding"))
    max_examples: int = _f(0, "Attack at most this many examples (0 = all).", ge=0)
    seed: int = _f(13, "Seed of the random perturbations.", ge=0)


@dataclass
class AugmentConfig:
    """Augmentation of the training data."""

    methods: list[str] = _f([], "Augment train (never dev/test): synonym, insert, swap, delete (EDA), typo, mlm (masked-LM "
                            "substitution), backtranslate. Each new row applies one method drawn at random.", augmenters)
    multiplier: int = _f(1, "New rows per training row.", ge=1)
    prob: float = _f(0.1, "Share of the words one method changes (at least one).", gt=0, le=1)
    mlm_model: str | None = _f(None, "Masked LM for method mlm (Hugging Face id or folder).")
    translate_to: str = _f("Helsinki-NLP/opus-mt-en-de", "backtranslate: model that translates into the pivot language.")
    translate_back: str = _f("Helsinki-NLP/opus-mt-de-en", "backtranslate: model that translates back.")
    synonyms: str = _f("auto", "Synonym source for synonym/insert (as attack.synonyms).", ("auto", "wordnet", "embedding"))
    seed: int = _f(7, "Seed of the augmentation.", ge=0)

    def validate(self, cfg: Config, where: str) -> None:
        if "mlm" in self.methods and not self.mlm_model:
            raise InputError(f"{where}: augment.methods has mlm: set augment.mlm_model to a masked language model.")


@dataclass
class ContinualConfig:
    """Continual fine-tuning from a finished run's weights."""

    from_run: str | None = _f(None, path=True, help="Continue from a finished run's weights (full or PEFT; `lmtune train CONFIG --from RUN_DIR`): "
                                    "the same model.name, labels extended (old head rows kept, new ones initialised).")
    missing_labels: str = _f("error", "Old labels with no example in the new train data (after replay): error, keep them in "
                                      "the head, or drop them.", ("error", "keep", "drop"))
    replay: float = _f(0.0, "Share of the old run's training data (re-read from its recorded sources) added to train, seeded; "
                            "0 = no replay.", ge=0, le=1)
    l2sp: float = _f(0.0, "L2-SP strength: alpha/2 * ||w - w_old||^2 over the weights shared with the old run, added to "
                          "every optimizer step's loss; 0 = off.", ge=0)


@dataclass
class PretrainConfig:
    """`lmtune pretrain`: masked-language-model pretraining on unlabeled text."""

    files: list[str] = _f([], path=True, help="`lmtune pretrain`: unlabeled text files (.txt: one text per line; CSV/TSV/JSONL/parquet: "
                          "the data.text_column column).")
    mlm_probability: float = _f(0.15, "Share of tokens (whole words with whole_word_mask) masked, drawn anew every batch.",
                                gt=0, lt=1)
    whole_word_mask: bool = _f(True, "Mask every sub-token of a chosen word together (Chinese words by jieba segmentation).")
    heldout: float = _f(0.05, "Share of the texts held out for perplexity (at most 2,000).", gt=0, lt=1)
    max_minutes: float = _f(0.0, "Stop after this many minutes of training (0 = train.epochs / train.max_steps only).",
                            ge=0)


@dataclass
class TuneConfig:
    """`lmtune tune`: the hyperparameter search."""

    space: dict | None = _f(None, "`lmtune tune` search space: config key -> [low, high] (two ints: an integer range), [low, high, "
                                  "log], or {choices: [...]}; default by model width: train.lr, train.batch_size, "
                                  "train.warmup_ratio, train.weight_decay (and peft.r for LoRA / AdaLoRA); every trial trains "
                                  "train.epochs, the pruner stopping the unpromising ones early.")
    pruner: str = _f("successive_halving", "Stop unpromising trials from their dev metric at each evaluation: successive_halving "
                                           "(asynchronous, the most aggressive), hyperband, median, or none.",
                     ("successive_halving", "hyperband", "median", "none"))
    storage: str | None = _f(None, "Where the study lives, shared by workers: a journal file (default STUDY_DIR/study.journal, one "
                                   "machine) or a database URL (postgresql://..., across machines).")
    seed: int = _f(0, "Seed of the TPE sampler.", ge=0)
    startup_trials: int = _f(4, "Random trials before TPE starts modelling the results.", ge=1)


CORE_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "peft": PeftConfig, "abstain": AbstainConfig,
                 "adversarial": AdversarialConfig, "attack": AttackConfig, "augment": AugmentConfig,
                 "continual": ContinualConfig, "pretrain": PretrainConfig, "tune": TuneConfig}


def section_names() -> tuple[str, ...]:
    """The config's sections: the core ones, then those that registered tasks and features add."""
    added = (config_sections.meta(n, "section", n) for n in config_sections.names())
    return tuple(dict.fromkeys([*CORE_SECTIONS, *added]))


def section_parts(name: str) -> tuple[type, ...]:
    """The dataclasses whose fields make up one section: its core class (if any), then each registered
    owner's (lmtune/registrations.py: a task's columns join `data`; GenerateConfig is `generate`)."""
    core = (CORE_SECTIONS[name],) if name in CORE_SECTIONS else ()
    owned = tuple(config_sections.get(n) for n in config_sections.names() if config_sections.meta(n, "section", n) == name)
    return core + owned


def section_class(name: str) -> type:
    """One dataclass for the section: its parts' fields in registration order (spaCy composes a
    component's config the same way), built once per set of parts."""
    parts = section_parts(name)
    return parts[0] if len(parts) == 1 else _composed(name, parts)


@functools.cache
def _composed(name: str, parts: tuple[type, ...]) -> type:
    # a dataclass inherits its bases' fields, the last base's first: the core fields lead
    return dataclasses.make_dataclass(parts[0].__name__, [], bases=tuple(reversed(parts)),
                                      namespace={"__reduce__": _reduce_section, "section_name": name, "__module__": __name__,
                                                 "__doc__": parts[0].__doc__})


def _reduce_section(obj: Any) -> tuple:
    """Pickle (and deepcopy) a composed section by its name: the class is rebuilt from the registry."""
    return _restore_section, (obj.section_name, dict(vars(obj)))


def _restore_section(name: str, state: dict) -> Any:
    obj = section_class(name).__new__(section_class(name))
    vars(obj).update(state)
    return obj


def _section(name: str) -> Any:
    return field(default_factory=lambda: section_class(name)())


@dataclass(eq=False)
class Config:
    task: str = _f("classification", "Task type from the task registry.", tasks)
    output_dir: str = _f("runs", "Folder that receives run directories.")
    run_name: str | None = _f(None, "Run directory name; default is a timestamp.")
    data: DataConfig = _section("data")
    model: ModelConfig = _section("model")
    train: TrainConfig = _section("train")
    peft: PeftConfig = _section("peft")
    abstain: AbstainConfig = _section("abstain")
    adversarial: AdversarialConfig = _section("adversarial")
    attack: AttackConfig = _section("attack")
    augment: AugmentConfig = _section("augment")
    continual: ContinualConfig = _section("continual")
    pretrain: PretrainConfig = _section("pretrain")
    tune: TuneConfig = _section("tune")
    # and one attribute per registered section of its own (cfg.generate, cfg.retrieval): see __post_init__

    def __post_init__(self) -> None:
        for name in self.added_sections():
            if not hasattr(self, name):
                setattr(self, name, section_class(name)())

    @staticmethod
    def added_sections() -> tuple[str, ...]:
        return tuple(n for n in section_names() if n not in CORE_SECTIONS)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **{n: dataclasses.asdict(getattr(self, n)) for n in self.added_sections()}}

    def redacted_dict(self) -> dict:
        """to_dict() with credentials masked (lmtune.redact): what config.yaml, lmtune.json and
        trackers get; the config itself keeps the real values for use."""
        from lmtune.redact import redact
        return redact(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.redacted_dict(), sort_keys=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()


def all_keys() -> dict[str, dataclasses.Field]:
    """Every config key, dotted ('train.lr'), with its dataclass field."""
    out = {f.name: f for f in fields(Config) if f.name not in CORE_SECTIONS}
    for sec in section_names():
        out.update({f"{sec}.{f.name}": f for f in fields(section_class(sec))})
    return out


def moved_keys() -> dict[str, str]:
    """Keys that moved to their owner's section: old dotted key -> new one (the old one still works, with a warning)."""
    return {old: new for n in config_sections.names() for old, new in config_sections.meta(n, "moved", {}).items()}


def _did_you_mean(key: str, known: list[str]) -> str:
    leaf = key.split(".")[-1]
    hits = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hits = hits or [k for k in known if k.split(".")[-1] == leaf]
    hits = hits or difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hits = hits or [k for k in known if difflib.get_close_matches(leaf, [k.split(".")[-1]], cutoff=0.7)]
    return f" Did you mean '{hits[0]}'?" if hits else ""


def _non_finite(value: Any) -> bool:
    """A YAML .inf or .nan anywhere in the value (lists and mappings too): no range or meaning holds for them."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(map(_non_finite, value))
    return isinstance(value, dict) and any(map(_non_finite, value.values()))


# ---- the pydantic model generated from the dataclasses: validation and the JSON Schema -------------

SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"
BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool", "list_type": "list",
              "dict_type": "a mapping", "model_type": "a mapping of keys to values"}


def _choice_names(choices: tuple | Registry) -> tuple[str, ...]:
    return tuple(choices.names()) if isinstance(choices, Registry) else tuple(choices)


def _with_choices(hint: Any, choices: tuple | Registry) -> Any:
    """str -> Literal[the choices]; list[str] -> list[Literal[...]]; None stays allowed where it was."""
    allowed = Literal[_choice_names(choices)]
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    typed = tuple(t if t is type(None) else list[allowed] if (typing.get_origin(t) or t) is list else allowed for t in members)
    return functools.reduce(operator.or_, typed)


def _model_field(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """One dataclass field as a pydantic (annotation, Field): help -> description, bounds -> ge/gt/le/lt,
    choices -> Literal (the schema's enum)."""
    from pydantic import Field
    if f.metadata.get("choices") is not None:
        hint = _with_choices(hint, f.metadata["choices"])
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return hint, Field(default, description=f.metadata.get("help"), **{k: f.metadata[k] for k in BOUNDS if k in f.metadata})


def _section_help(name: str, cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    # a dataclass without a docstring gets its signature as one: not a description
    return doc if doc and not doc.startswith(f"{cls.__name__}(") else f"The {name} section (`lmtune config` lists its keys)."


def _registry_state() -> tuple[tuple[str, ...], ...]:
    """Every registry's names: a field's choices may be a registry, so a newly registered name means a new model."""
    return tuple(tuple(r.names()) for r in vars(registry).values() if isinstance(r, Registry))


def config_model() -> type:
    """The pydantic model of a whole config, today's sections as nested models (built once per set of
    sections and registry names)."""
    return _config_model(tuple((n, section_class(n)) for n in section_names()), _registry_state())


@functools.lru_cache(maxsize=16)
def _config_model(sections: tuple[tuple[str, type], ...], _names: tuple) -> type:
    from pydantic import ConfigDict, Field, create_model
    # strict: a quoted "3" is no int and True no 1 (a float field still takes an int); unknown keys are
    # errors (the schema's additionalProperties: false); .inf and .nan are refused
    strict = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def model(name: str, cls: type, doc: str, keep: Any = lambda f: True, **more: Any) -> type:
        hints = typing.get_type_hints(cls)  # the annotations are strings (PEP 563), resolved in each declaring module
        own = {f.name: _model_field(f, hints[f.name]) for f in fields(cls) if keep(f)}
        with warnings.catch_warnings():  # a key may share a BaseModel attribute's name (generate.schema): the
            warnings.filterwarnings("ignore", "Field name .* shadows an attribute", UserWarning)  # model only checks values
            return create_model(name, __config__=strict, __doc__=doc, **own, **more)

    nested = {}
    for name, cls in sections:
        section = model(cls.__name__, cls, _section_help(name, cls))
        nested[name] = (section, Field(default_factory=section, description=_section_help(name, cls)))
    return model("Config", Config, "An lmtune config file: `lmtune train THIS_FILE`. Relative paths resolve against "
                 "the file's folder.", lambda f: f.name not in CORE_SECTIONS, **nested)


def json_schema() -> dict:
    """The JSON Schema of a config file (`lmtune config --schema`), draft-07: the YAML language server
    (VS Code's YAML extension, Neovim's yamlls) supports "JSON Schema 7 and below" fully, and check-jsonschema
    and jsonschema-rs read it. The sections are inlined, so none of pydantic's 2020-12 `$defs` remains;
    every other keyword it writes for these models (enum, minimum, exclusiveMaximum, anyOf) is draft-07's."""
    schema = config_model().model_json_schema(schema_generator=_schema_generator())
    schema = _inline_refs(schema, schema.pop("$defs", {}))
    return {"$schema": SCHEMA_DRAFT, "title": "lmtune config", **{k: v for k, v in schema.items() if k != "title"}}


@functools.cache
def _schema_generator() -> type:
    """pydantic's schema writer, with `X | None` as {"type": [X, "null"]} (draft-07's own spelling) rather
    than anyOf: a bound or enum on X then shows as itself in an editor, not as "matches none of anyOf"."""
    from pydantic.json_schema import GenerateJsonSchema

    class Draft07(GenerateJsonSchema):
        def nullable_schema(self, schema: Any) -> dict:
            inner = self.generate_inner(schema["schema"])
            if not isinstance(inner.get("type"), str):
                return super().nullable_schema(schema)
            return {**inner, "type": [inner["type"], "null"], **({"enum": [*inner["enum"], None]} if "enum" in inner else {})}

    return Draft07


def schema_text() -> str:
    """json_schema() as the file `lmtune config --schema` and `lmtune init` write."""
    import json
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _inline_refs(node: Any, defs: dict) -> Any:
    """Replace each {"$ref": "#/$defs/X", ...} with X itself (its own keys beside it win)."""
    if isinstance(node, list):
        return [_inline_refs(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return {k: _inline_refs(v, defs) for k, v in node.items()}


def _check(values: dict, locate: typing.Callable[[str], str]) -> Any:
    """Validate a nested config dict with the generated model; an error becomes the usual
    `FILE: line N: key ...` InputError (locate: dotted key -> where it was read). The error on the
    earliest line is reported first, as a reader goes through the file."""
    from pydantic import ValidationError
    try:
        return config_model().model_validate(values)
    except ValidationError as e:
        errors = [(_key_of(err["loc"]), err) for err in e.errors()]
        key, err = min(errors, key=lambda ke: _line_of(locate(ke[0])))
        raise InputError(_message(key, err, values, locate(key))) from None


def _key_of(loc: tuple) -> str:
    """pydantic's error location ('train', 'lr') or ('data', 'split', 0) -> the dotted key 'train.lr'."""
    return ".".join(map(str, loc[:2] if loc[0] in section_names() else loc[:1]))


def _line_of(where: str) -> int:
    _, sep, line = where.rpartition(": line ")
    return int(line) if sep and line.isdigit() else 1 << 30


def _message(key: str, err: dict, values: dict, at: str) -> str:
    """One pydantic error in lmtune's words: which key, what it must be, what it got."""
    section, _, leaf = key.rpartition(".")
    value = (values.get(section) or {}).get(leaf) if section else values.get(key)
    inside = len(err["loc"]) > key.count(".") + 1  # the error is about an item of a list or mapping
    f = all_keys().get(key)
    meta = f.metadata if f is not None else {}
    kind = err["type"]
    if kind == "literal_error":
        choices = meta["choices"]
        if inside and isinstance(choices, Registry):
            choices.check(err["input"], f"{at}: {key}")  # raises: unknown NAME; choose from ...; did you mean
        names = _choice_names(choices)
        hint = difflib.get_close_matches(str(err["input"]), names, n=1, cutoff=0.6)
        return (f"{at}: {key} = {err['input']!r} is not one of {', '.join(names)}."
                + (f" Did you mean '{hint[0]}'?" if hint else ""))
    if kind in BOUND_ERRORS:
        spec = meta.get("range") or ""
        shown = f"in {spec}" if spec[:1] in "[(" else spec
        return f"{at}: {key} must be {shown}, got {err['input']}. ({meta.get('help')})"
    if kind == "finite_number":
        return f"{at}: {key} must be {'finite numbers only' if inside else 'a finite number'}, got {value!r}."
    if kind == "extra_forbidden":
        return f"{at}: unknown key '{key}'.{_did_you_mean(key, list(all_keys()))}"
    if kind in TYPE_NAMES:
        hint = typing.get_type_hints(section_class(section) if section else Config).get(leaf, object)
        nullable = type(None) in typing.get_args(hint)
        what = f"{TYPE_NAMES[kind]}{' or null' if nullable and not inside else ''}"
        if inside:
            return f"{at}: {key} must be a {'list' if isinstance(value, list) else 'mapping'} of {what}, got {value!r}."
        return f"{at}: {key} must be {what}, got {value!r}."
    return f"{at}: {key}: {err['msg']}, got {value!r}."


def _flatten(d: dict) -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; a top-level key that is no section stays as it is."""
    out = {}
    sections = section_names()
    for k, v in d.items():
        if isinstance(v, dict) and k in sections:
            out.update({f"{k}.{leaf}": x for leaf, x in v.items()})
        else:
            out[k] = v
    return out


def _known_key(key: str, known: dict, moved: dict[str, str], source: str) -> str:
    """The dotted key a YAML or command-line key names: a moved key's new name (with a deprecation
    warning), or the full key of an unambiguous bare leaf name ('lr')."""
    if key in moved:
        msg = f"{source}: {key} has moved to {moved[key]}; write {moved[key]} (the old key will stop working)."
        warnings.warn(msg, DeprecationWarning, stacklevel=4)
        log.warning(msg)
        key = moved[key]
    if key in known:
        return key
    leaf = [k for k in known if k.split(".")[-1] == key]
    if len(leaf) != 1:
        raise InputError(f"{source}: unknown key '{key}'.{_did_you_mean(key, list(known))}")
    return leaf[0]


def path_keys() -> tuple[str, ...]:
    """The config keys whose values are files or folders (declared with option(..., path=True)), in every
    section a task or feature registers."""
    return tuple(k for k, f in all_keys().items() if f.metadata.get("path"))


def config_file_keys() -> tuple[str, ...]:
    """The path-valued keys whose files are lmtune config files (option(..., configs=True))."""
    return tuple(k for k, f in all_keys().items() if f.metadata.get("configs"))


def build_config(raw: dict | None = None, overrides: dict[str, Any] | None = None,
                 where: str = "config", base_dir: Path | None = None, lines: dict[str, int] | None = None) -> Config:
    """Make a Config from a nested dict (YAML) plus dotted overrides (CLI), validating every key.

    Relative data paths in `raw` resolve against `base_dir` (the YAML file's folder); paths given
    as overrides resolve against the current directory, as a shell user expects. `lines` (dotted key
    -> line of the YAML file) puts the line into errors about a key.
    """
    known, moved = all_keys(), moved_keys()
    values: dict[str, Any] = {}
    found: dict[str, int] = {}  # the YAML line of each resolved key
    origin: dict[str, str] = {}  # where each key was read: 'FILE: line N' or 'command line'
    for source, items, rel, at in ((where, _flatten(raw or {}), base_dir, lines or {}), ("command line", overrides or {}, None, {})):
        for raw_key, value in items.items():
            key = _known_key(raw_key, known, moved, _at(source, raw_key, at))
            origin[key] = _at(source, raw_key, at)
            if raw_key in at:
                found[key] = at[raw_key]
            if _non_finite(value):
                what = "a finite number" if isinstance(value, float) else "finite numbers only"
                raise InputError(f"{origin[key]}: {key} must be {what}, got {value!r}.")
            values[key] = _rebased(known[key], list(value) if isinstance(value, tuple) else value, rel)
    for key, value in _task_defaults(values.get("task", Config.task), values).items():
        values.setdefault(key, value)
    nested: dict[str, Any] = {}
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[leaf] = value
    typed = _check(nested, lambda k: origin.get(k, where))  # types, choices and bounds; ints become floats where due
    cfg = Config()
    for key in values:
        section, _, leaf = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, leaf, getattr(getattr(typed, section) if section else typed, leaf))
    _hub_splits(cfg.data, where)
    validate(cfg, where, found)
    return cfg


def _rebased(f: dataclasses.Field, value: Any, folder: Path | None) -> Any:
    """A relative data path read from a YAML file, joined to the file's folder (a value of the wrong
    type is left for the check to name)."""
    if folder is None:
        return value
    if not f.metadata.get("path"):  # declared with option(..., path=True): see path_keys
        return value
    if isinstance(value, str) and value and not value.startswith(("hub:", "memory:")):
        return str(p if (p := Path(value)).is_absolute() else folder / p)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [str(p if (p := Path(v)).is_absolute() else folder / p) for v in value]
    return value


def _task_defaults(task: str, values: dict[str, Any]) -> dict[str, Any]:
    """The task's own defaults (Task.defaults_for) for keys the user did not set, e.g. LoRA for a
    decoder's generation task; an unknown task is left to validate() to report."""
    from lmtune.registry import tasks
    if task not in tasks.names():
        return {}
    return tasks.get(task).defaults_for(values)


HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _hub_splits(d: DataConfig, where: str) -> None:
    """data.hub fills the split files left unset with Hub split sources (lmtune.data.hf_datasets)."""
    if not d.hub:
        return
    from lmtune.data.hf_datasets import hub_source
    unknown = set(d.hub_split_map or {}) - set(HUB_SPLITS)
    if unknown:
        raise InputError(f"{where}: data.hub_split_map: unknown split(s) {', '.join(sorted(unknown))}; use train, dev, test.")
    for split, hub_split in {**HUB_SPLITS, **(d.hub_split_map or {})}.items():
        if getattr(d, split) is None and hub_split:
            setattr(d, split, hub_source(d.hub, d.hub_config, str(hub_split)))


def _at(where: str, key: str, lines: dict[str, int] | None) -> str:
    """'FILE: line N' when the key was read from line N of the YAML file, else just where."""
    return f"{where}: line {lines[key]}" if lines and key in lines else where


def validate(cfg: Config, where: str = "config", lines: dict[str, int] | None = None) -> None:
    """Every value against its field's type, choices and bounds (the generated model: a value set in
    code is checked too), then each section's own checks, run by the class that declares them."""
    _check(cfg.to_dict(), lambda key: _at(where, key, lines))
    for name in section_names():
        for part in section_parts(name):
            if "validate" in vars(part):
                part.validate(getattr(cfg, name), cfg, where)
    _check_objective(cfg, _at(where, "train.objective", lines))


def _check_objective(cfg: Config, at: str) -> None:
    """train.objective other than sft only for a task that declares it (the tasks registry's `objectives`):
    any other task would train its own loss and ignore the setting."""
    objective = getattr(cfg.train, "objective", "sft")
    allowed = tasks.meta(cfg.task, "objectives", ("sft",)) if cfg.task in tasks else ("sft",)
    if objective not in allowed:
        able = [t for t in tasks.names() if objective in tasks.meta(t, "objectives", ())]
        raise InputError(f"{at}: train.objective {objective} is not a training objective of task {cfg.task} (it trains "
                         f"with {', '.join(allowed)}); {objective} is for task {' or '.join(able) or 'none'}. "
                         "Remove train.objective, or change the task.")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    if path is None:
        return build_config({}, overrides)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found.")
    try:
        text = p.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark else ""
        raise InputError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if not isinstance(raw, dict):
        raise InputError(f"{p}: the top level must be a mapping of keys to values.")
    return build_config(raw, overrides, where=str(p), base_dir=p.resolve().parent, lines=_key_lines(text))


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key ('train.lr', 'task') -> its line in the YAML text, for errors that name the line."""
    out: dict[str, int] = {}
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for key, value in root.value if isinstance(root, yaml.MappingNode) else []:
        out[str(key.value)] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            out.update({f"{key.value}.{k.value}": k.start_mark.line + 1 for k, _ in value.value})
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """'--train.lr 3e-5 --epochs=2' -> {'train.lr': 3e-05, 'epochs': 2} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise InputError(f"command line: expected --key value, got {a!r}.")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise InputError(f"command line: --{key} needs a value.")
            i += 1
            val = args[i]
        out[key.replace("-", "_")] = yaml.safe_load(val) if val != "" else None
        i += 1
    return out


def describe_fields() -> str:
    """Plain-text table of every key, default and help line (for --help-config and the README)."""
    rows = []
    for key, f in all_keys().items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        extra += f" (range {f.metadata['range']})" if f.metadata.get("range") else ""
        rows.append(f"  {key:<24} default {default!r:<14} {f.metadata.get('help', '')}{extra}")
    return "\n".join(rows)
