"""One typed config object that flows from YAML and CLI flags to every part of lmtune.

Each field carries its default and a one-line help text; `lmtune train --help-config` prints them
and the README's field list is generated from the same metadata, so docs cannot drift.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lmtune.errors import InputError
from lmtune.registry import adversaries, attacks, augmenters, config_sections, peft_methods, trackers

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
log = logging.getLogger(__name__)


def _f(default: Any, help: str, choices: tuple | None = None, range: str | None = None) -> Any:
    """A config field. `range` bounds a number, e.g. "> 0", ">= 1", "[0, 1)", "(0, 1]": validate() checks it.
    A task or feature declares the fields it owns with the same helper (`option`) in its own module."""
    meta = {"help": help, "choices": choices, "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


option = _f  # the public name, for sections declared outside this module (lmtune/registrations.py lists them)


@dataclass
class DataConfig:
    train: str | None = _f(None, "Training file (CSV, TSV, JSONL; parquet, arrow or a datasets save_to_disk folder). Required "
                                 "unless data.hub is set.")
    dev: str | None = _f(None, "Dev file; if absent (and test absent) train is split.")
    test: str | None = _f(None, "Test file; if absent (and dev absent) train is split.")
    hub: str | None = _f(None, "A dataset on the Hugging Face Hub, loaded with datasets.load_dataset; its splits fill data.train / "
                               "dev / test left unset (see data.hub_split_map).")
    hub_config: str | None = _f(None, "data.hub: the dataset's configuration (subset) name.")
    hub_split_map: dict | None = _f(None, "data.hub: which Hub split is lmtune's train / dev / test; default "
                                          "{train: train, dev: validation, test: test}; a null split is not used.")
    format: str = _f("auto", "File format; auto picks by extension (NER: .jsonl -> jsonl, else conll).",
                     ("auto", "csv", "tsv", "jsonl", "conll"))
    text_column: str = _f("text", "Column (or JSON key) holding the text.")
    text_pair_column: str | None = _f(None, "Second text column for sentence-pair tasks.")
    label_column: str = _f("label", "Column (or JSON key) holding the label.")
    encoding: str = _f("utf-8", "Text encoding of the data files.")
    split: list = _f([0.7, 0.18, 0.12], "train/dev/test fractions used when only train is given.")
    max_length: int = _f(128, "Max tokens per example; classification truncates (and counts), NER cuts windows.", range=">= 8")
    window_overlap: int | None = _f(None, "NER, and classification with long_text windows: sub-tokens shared by consecutive "
                                          "windows of a long text; default 1/4 of a window.", range=">= 0")
    long_text: str = _f("truncate", "Classification / multi-label texts longer than max_length: truncate (and count), or "
                                    "windows (every token in some window; each window is trained on with the text's label, and "
                                    "the windows' logits are averaged at prediction).", ("truncate", "windows"))
    max_windows: int = _f(8, "long_text windows: at most this many windows of one text are trained on (evenly spread, "
                             "first and last kept); prediction uses every window.", range=">= 1")
    window_pooling: str = _f("mean", "long_text windows: how the windows' logits become the text's: mean, or max per class.",
                             ("mean", "max"))
    group_column: str | None = _f(None, "`lmtune cv`: column whose rows must stay in one fold (a user, a document, a "
                                        "conversation): grouped stratified folds.")
    slice_columns: list = _f([], "Columns of the data (product, region, channel, language) whose values are slices: "
                                 "per-slice test metrics, the gap to the overall metric with a bootstrap interval, and "
                                 "the slices significantly worse, in results and report.md.")
    label_noise_folds: int = _f(0, "Classification: before training, find label-noise candidates by confident learning on "
                                   "k-fold out-of-fold probabilities (k extra fine-tunings); 0 = off.", range=">= 0")
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
    name: str = _f(DEFAULT_MODEL, "Hugging Face model id or local path (the packaged MiniLM by default).")
    dropout: float | None = _f(None, "Override the model's dropout probabilities (hidden and attention).", range="[0, 1)")
    gguf_file: str | None = _f(None, "GGUF weights file in model.name's folder or hub repo (dequantized on load; "
                                     "found automatically when a folder without config.json holds one).")
    freeze_embeddings: bool = _f(False, "Freeze the embedding layer.")
    freeze_layers: int = _f(0, "Freeze the first N transformer layers.", range=">= 0")


@dataclass
class TrainConfig:
    epochs: int = _f(3, "Passes over the training data (ignored when max_steps > 0).", range=">= 0")
    max_steps: int = _f(0, "Stop after this many optimizer steps; 0 = use epochs.", range=">= 0")
    batch_size: int = _f(16, "Examples per optimizer step (before accumulation is split out).", range=">= 1")
    grad_accum: int = _f(1, "Micro-batches per optimizer step; batch_size is split into this many.", range=">= 1")
    lr: float | None = _f(None, "Peak encoder learning rate; default by model width (1e-4 below 768, 5e-5 at 768, 2e-5 "
                               "above), or per PEFT method (lora 1e-3, adalora 2e-3, ia3 5e-3, prefix 1e-2, prompt 3e-2, adapter 1e-3).", range="> 0")
    head_lr: float | None = _f(None, "Learning rate of the newly initialised task head; default 10 x lr (full) or lr (PEFT).", range="> 0")
    weight_decay: float = _f(0.01, "AdamW weight decay (never applied to biases and norm weights).", range=">= 0")
    layer_lr_decay: float = _f(1.0, "Layer-wise lr decay: layer i of N gets lr * decay**(N - i).", range="(0, 1]")
    schedule: str = _f("linear", "Learning-rate schedule after warmup.", ("linear", "cosine", "constant"))
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming up linearly from 0.", range="[0, 1)")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm; 0 disables clipping.", range=">= 0")
    precision: str = _f("auto", "auto = bf16 on a GPU that has it, else fp32.", ("auto", "fp32", "bf16", "fp16"))
    group_by_length: bool = _f(True, "Batch examples of similar length together (less padding, faster).")
    seed: int = _f(42, "Seed for splits, data order, dropout and head initialisation.", range=">= 0")
    eval_every: int = _f(0, "Evaluate on dev every N optimizer steps; 0 = once per epoch.", range=">= 0")
    metric: str | None = _f(None, "Dev metric for early stopping and the best checkpoint, one of the task's headline metrics; "
                                  "default: the first (accuracy for classification, f1 for NER, macro_f1 for multi-label, "
                                  "spearman for regression).")
    patience: int = _f(0, "Stop after this many evaluations without improvement; 0 = never.", range=">= 0")
    class_weights: str = _f("none", "Loss weights: auto = inverse class frequency in train (NER: per tag) for imbalance.",
                            ("none", "auto"))
    focal_gamma: float = _f(0.0, "Focal loss gamma (0 = plain cross-entropy; 2 is usual for imbalance).", range=">= 0")
    loss: str = _f("auto", "Regression loss on standardized targets: auto (= mse), mse, or huber (robust to outliers).",
                   ("auto", "mse", "huber"))
    calibrate: bool = _f(True, "Fit a temperature on dev after training (classification; NER: on each word's tag "
                               "distribution); outputs use calibrated probabilities.")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard package); the same as trackers [tensorboard].")
    trackers: list = _f([], "Experiment trackers (main process only) of the config, every step's metrics, the final metrics "
                            "and the report, plots and model card. mlflow: MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db; "
                            "wandb: honours WANDB_MODE=offline; tensorboard: RUN_DIR/tensorboard.")
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
        for name in self.trackers:
            trackers.check(name, f"{where}: train.trackers")


@dataclass
class PeftConfig:
    method: str = _f("none", "Parameter-efficient method; none = full fine-tuning.", peft_methods)
    r: int = _f(8, "LoRA rank.", range=">= 1")
    alpha: int = _f(16, "LoRA / AdaLoRA scaling alpha.", range="> 0")
    dropout: float = _f(0.1, "LoRA / AdaLoRA dropout.", range="[0, 1)")
    target_modules: list | None = _f(None, "Modules to adapt; default: every linear layer of the encoder (LoRA, AdaLoRA), "
                                           "peft's per-architecture choice (IA3).")
    init_r: int = _f(12, "AdaLoRA: initial rank of every adapted matrix.", range=">= 1")
    target_r: int = _f(4, "AdaLoRA: average rank to keep after budgeting.", range=">= 1")
    tinit: float = _f(0.1, "AdaLoRA: fraction of steps before budgeting starts.", range="[0, 1)")
    tfinal: float = _f(0.2, "AdaLoRA: fraction of final steps with ranks fixed.", range="[0, 1)")
    delta_t: int = _f(10, "AdaLoRA: steps between two budget allocations.", range=">= 1")
    num_virtual_tokens: int = _f(20, "Prefix / prompt tuning: number of virtual tokens.", range=">= 1")
    adapter_size: int = _f(64, "Bottleneck adapter width.", range=">= 1")
    compare_full: bool = _f(False, "Also run full fine-tuning on the same data and report both side by side.")


@dataclass
class AbstainConfig:
    target: str = _f("none", "Choose a confidence threshold on dev for this target; below it predict returns the "
                             "abstain label. precision: accuracy of answered dev examples >= value; coverage: share "
                             "answered >= value; false_accept: share of out-of-scope (or misclassified) dev examples "
                             "answered <= value; accuracy_loss: refuse as much as possible while in-scope accuracy (abstaining counts as "
                             "wrong) stays at most value below answering everything.",
                  ("none", "precision", "coverage", "false_accept", "accuracy_loss"))
    value: float | None = _f(None, "The target's value; default precision 0.95, coverage 0.9, false_accept 0.1, accuracy_loss 0.02.", range="[0, 1]")
    calibrated: bool = _f(True, "Threshold the temperature-scaled probability (else the raw softmax).")
    score: str = _f("probability", "What the threshold is put on. probability: the top class's probability; mahalanobis: "
                                   "minus the Mahalanobis distance of the [CLS] feature to the nearest class mean (means and a "
                                   "shared covariance fitted on train after training; far better at out-of-scope inputs the "
                                   "model is confidently wrong about).", ("probability", "mahalanobis"))
    label: str = _f("abstain", "Label predict returns when the model abstains (oos_label instead when that is set).")
    interval_coverage: float = _f(0.9, "Regression: coverage of the prediction intervals (split conformal prediction on dev).",
                                  range="(0, 1)")
    max_interval_width: float | None = _f(None, "Regression: abstain when a prediction's interval is wider than this "
                                                "(the value is still returned).", range="> 0")
    oos_label: str | None = _f(None, "Label of out-of-scope rows (e.g. oos). In train it is an explicit out-of-scope class; "
                                     "in dev/test only, those rows tune the threshold and measure out-of-scope recall.")


@dataclass
class AdversarialConfig:
    method: str = _f("none", "Adversarial training on the word-embedding output: fgm (one gradient-sign step of size "
                             "epsilon), pgd (steps projected steps of size alpha inside an epsilon ball), freelb "
                             "(steps ascent steps, parameter gradients averaged); or on the words: typo / synonym (of "
                             "`candidates` random typo / synonym versions of each example, the one the model finds "
                             "hardest is trained on next to the clean one).", adversaries)
    epsilon: float = _f(0.3, "Per-example L2 bound of the embedding perturbation (FreeLB: 0 = unbounded). A word "
                              "embedding of MiniLM/BERT has norm ~1; 1.0 per example stops a MiniLM from learning at all.", range=">= 0")
    alpha: float = _f(0.1, "PGD / FreeLB step size (FreeLB: also the size of the random start).", range="> 0")
    steps: int = _f(3, "PGD / FreeLB ascent steps per optimizer micro-batch.", range=">= 1")
    rate: float = _f(0.2, "typo / synonym: share of the words of an example that one candidate changes (at least one).", range="(0, 1]")
    candidates: int = _f(8, "typo / synonym: random versions scored per example and step; the worst is trained on.", range=">= 1")
    synonyms: str = _f("auto", "synonym: substitute source (as attack.synonyms).", ("auto", "wordnet", "embedding"))

    def validate(self, cfg: Config, where: str) -> None:
        # the ranges cover the rest; only FreeLB may run unbounded
        if adversaries.meta(self.method, "kind") == "embedding" and self.method != "freelb" and self.epsilon == 0:
            raise InputError(f"{where}: adversarial needs epsilon > 0 (FreeLB: >= 0), alpha > 0 and steps >= 1; got "
                             f"epsilon {self.epsilon}, alpha {self.alpha}, steps {self.steps}.")


@dataclass
class AttackConfig:
    methods: list = _f([], "Attacks run on dev (or attack.data) after training, into robustness.json and report.md: "
                           "typo (random character edits), synonym (random word substitutions), search (greedy "
                           "word-importance attack that looks for the smallest change that flips the prediction).")
    data: str | None = _f(None, "Labeled file to attack instead of dev.")
    rate: float = _f(0.2, "typo / synonym: share of the words of each example that are changed (at least one).", range="(0, 1]")
    budget: float = _f(0.1, "search: most words it may change, as a share of the example's words (at least one).", range="(0, 1]")
    synonyms: str = _f("auto", "Substitutes: auto = WordNet for English when installed (lmtune[robust]), else the "
                               "model's nearest input-embedding neighbours.", ("auto", "wordnet", "embedding"))
    max_examples: int = _f(0, "Attack at most this many examples (0 = all).", range=">= 0")
    seed: int = _f(13, "Seed of the random perturbations.", range=">= 0")

    def validate(self, cfg: Config, where: str) -> None:
        for m in self.methods:
            attacks.check(m, f"{where}: attack.methods")


@dataclass
class AugmentConfig:
    methods: list = _f([], "Augment train (never dev/test): synonym, insert, swap, delete (EDA), typo, mlm (masked-LM "
                           "substitution), backtranslate. Each new row applies one method drawn at random.")
    multiplier: int = _f(1, "New rows per training row.", range=">= 1")
    prob: float = _f(0.1, "Share of the words one method changes (at least one).", range="(0, 1]")
    mlm_model: str | None = _f(None, "Masked LM for method mlm (Hugging Face id or folder).")
    translate_to: str = _f("Helsinki-NLP/opus-mt-en-de", "backtranslate: model that translates into the pivot language.")
    translate_back: str = _f("Helsinki-NLP/opus-mt-de-en", "backtranslate: model that translates back.")
    synonyms: str = _f("auto", "Synonym source for synonym/insert (as attack.synonyms).", ("auto", "wordnet", "embedding"))
    seed: int = _f(7, "Seed of the augmentation.", range=">= 0")

    def validate(self, cfg: Config, where: str) -> None:
        for m in self.methods:
            augmenters.check(m, f"{where}: augment.methods")
        if "mlm" in self.methods and not self.mlm_model:
            raise InputError(f"{where}: augment.methods has mlm: set augment.mlm_model to a masked language model.")


@dataclass
class ContinualConfig:
    from_run: str | None = _f(None, "Continue from a finished run's weights (full or PEFT; `lmtune train CONFIG --from RUN_DIR`): "
                                    "the same model.name, labels extended (old head rows kept, new ones initialised).")
    missing_labels: str = _f("error", "Old labels with no example in the new train data (after replay): error, keep them in "
                                      "the head, or drop them.", ("error", "keep", "drop"))
    replay: float = _f(0.0, "Share of the old run's training data (re-read from its recorded sources) added to train, seeded; "
                            "0 = no replay.", range="[0, 1]")
    l2sp: float = _f(0.0, "L2-SP strength: alpha/2 * ||w - w_old||^2 over the weights shared with the old run, added to "
                          "every optimizer step's loss; 0 = off.", range=">= 0")


@dataclass
class PretrainConfig:
    files: list = _f([], "`lmtune pretrain`: unlabeled text files (.txt: one text per line; CSV/TSV/JSONL/parquet: "
                         "the data.text_column column).")
    mlm_probability: float = _f(0.15, "Share of tokens (whole words with whole_word_mask) masked, drawn anew every batch.",
                                range="(0, 1)")
    whole_word_mask: bool = _f(True, "Mask every sub-token of a chosen word together (Chinese words by jieba segmentation).")
    heldout: float = _f(0.05, "Share of the texts held out for perplexity (at most 2,000).", range="(0, 1)")
    max_minutes: float = _f(0.0, "Stop after this many minutes of training (0 = train.epochs / train.max_steps only).",
                            range=">= 0")


@dataclass
class TuneConfig:
    space: dict | None = _f(None, "`lmtune tune` search space: config key -> [low, high] (two ints: an integer range), [low, high, "
                                  "log], or {choices: [...]}; default by model width: train.lr, train.batch_size, "
                                  "train.warmup_ratio, train.weight_decay (and peft.r for LoRA / AdaLoRA); every trial trains "
                                  "train.epochs, the pruner stopping the unpromising ones early.")
    pruner: str = _f("successive_halving", "Stop unpromising trials from their dev metric at each evaluation: successive_halving "
                                           "(asynchronous, the most aggressive), hyperband, median, or none.",
                     ("successive_halving", "hyperband", "median", "none"))
    storage: str | None = _f(None, "Where the study lives, shared by workers: a journal file (default STUDY_DIR/study.journal, one "
                                   "machine) or a database URL (postgresql://..., across machines).")
    seed: int = _f(0, "Seed of the TPE sampler.", range=">= 0")
    startup_trials: int = _f(4, "Random trials before TPE starts modelling the results.", range=">= 1")


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
                                      namespace={"__reduce__": _reduce_section, "section_name": name, "__module__": __name__})


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
    task: str = _f("classification", "Task type from the task registry.")
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


def _coerce(key: str, value: Any, f: dataclasses.Field, where: str) -> Any:
    if _non_finite(value):
        what = "a finite number" if isinstance(value, float) else "finite numbers only"
        raise InputError(f"{where}: {key} must be {what}, got {value!r}.")
    tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing) | {"types": types})
    allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is type(None):
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        if t is list and isinstance(value, (list, tuple)):
            value = list(value)
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise InputError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, choices))}.")
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise InputError(f"{where}: {key} must be {names}, got {value!r}.")


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
    for source, items, rel, at in ((where, _flatten(raw or {}), base_dir, lines or {}), ("command line", overrides or {}, None, {})):
        for raw_key, value in items.items():
            key = _known_key(raw_key, known, moved, _at(source, raw_key, at))
            if raw_key in at:
                found[key] = at[raw_key]
            value = _coerce(key, value, known[key], _at(source, raw_key, at))
            if (key in ("data.train", "data.dev", "data.test", "attack.data", "continual.from_run") and value
                    and rel is not None and not str(value).startswith(("hub:", "memory:"))):
                p = Path(value)
                value = str(p if p.is_absolute() else (rel / p))
            if key == "pretrain.files" and rel is not None:
                value = [str(p if (p := Path(v)).is_absolute() else rel / p) for v in value]
            values[key] = value
    for key, value in _task_defaults(values.get("task", Config.task)).items():
        values.setdefault(key, value)
    cfg = Config()
    for key, value in values.items():
        obj = cfg
        *path, leaf = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    _hub_splits(cfg.data, where)
    validate(cfg, where, found)
    return cfg


def _task_defaults(task: str) -> dict[str, Any]:
    """The task's own defaults (Task.config_defaults) for keys the user did not set, e.g. LoRA for a
    decoder's generation task; an unknown task is left to validate() to report."""
    from lmtune.registry import tasks
    if task not in tasks.names():
        return {}
    return dict(tasks.get(task).config_defaults)


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


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith((">", "<")):
        op, bound = spec.split()
        b = float(bound)
        return {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op]
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def check_ranges(cfg: Config, where: str = "config", lines: dict[str, int] | None = None) -> None:
    """Every numeric field against its declared range (a negative lr or eval_every is refused, not trained)."""
    for key, f in all_keys().items():
        spec = f.metadata.get("range")
        section, _, leaf = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, leaf)
        if spec and value is not None and not isinstance(value, bool) and not _in_range(value, spec):
            shown = f"in {spec}" if spec[0] in "[(" else spec
            raise InputError(f"{_at(where, key, lines)}: {key} must be {shown}, got {value}. ({f.metadata['help']})")


def _at(where: str, key: str, lines: dict[str, int] | None) -> str:
    """'FILE: line N' when the key was read from line N of the YAML file, else just where."""
    return f"{where}: line {lines[key]}" if lines and key in lines else where


def validate(cfg: Config, where: str = "config", lines: dict[str, int] | None = None) -> None:
    """Every field against its range, then each section's own checks, run by the class that declares them."""
    check_ranges(cfg, where, lines)
    for name in section_names():
        for part in section_parts(name):
            if "validate" in vars(part):
                part.validate(getattr(cfg, name), cfg, where)


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
