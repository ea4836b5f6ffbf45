"""What a task module provides. The training loop talks only to this interface."""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmtune.config import Config
from lmtune.data.splits import stratified_split
from lmtune.errors import InputError


@dataclass
class Splits:
    train: list
    dev: list
    test: list
    labels: list[str]
    info: dict = field(default_factory=dict)  # how the data was split, sizes, sources


@dataclass
class Encoded:
    features: list[dict]  # model inputs per example, each with a "length"
    examples: list  # the examples they came from, same order
    stats: dict = field(default_factory=dict)  # e.g. {"truncated": 3}

    @property
    def lengths(self) -> list[int]:
        return [f["length"] for f in self.features]

    def windows(self) -> list[list[dict]]:
        """The features of each example, in order. A task that windows long inputs names each
        feature's example under "example"; otherwise features and examples pair one to one."""
        out: list[list[dict]] = [[] for _ in self.examples]
        for k, f in enumerate(self.features):
            out[f.get("example", k)].append(f)
        return out


# Capabilities a task may declare (Task.capabilities). Callers ask `task.supports(X)` or
# `task.require(X, key)`, never probe for methods: a task that lacks one gets a clear error.
CALIBRATE = "calibrate"  # calibrate(outputs, enc, labels): temperature scaling fitted on dev
ABSTAIN = "abstain"  # fit_threshold(...): an abstention threshold chosen on dev
MAHALANOBIS = "mahalanobis"  # fit_scorer(...): a Mahalanobis out-of-scope score fitted on train
LABEL_NOISE = "label_noise"  # example_probs(...): out-of-fold probabilities for the label-noise search
EXAMPLE_LABELS = "example_labels"  # one label per example: re-sampling, example-level attacks (search)
INTERVALS = "intervals"  # fit_intervals(outputs, enc, labels): prediction intervals fitted on dev (regression)
DEV_RULES = "dev_rules"  # fit_decision_rules(outputs, enc, labels): other decision settings fitted on dev (QA's no-answer margin)
CONTINUAL = "continual"  # a head with one row per label: a run can continue another's (continual.from_run), labels extended
ENSEMBLE = "ensemble"  # softmax logits over the labels, one row per example: members' probabilities can be averaged
EXPLAIN = "explain"  # explain_targets(row, labels, label) / target_score(logits, target): what attributions explain (lmtune.explain)
GENERATE = "generate"  # generate / fit_decoding / score_generations / compare_unconstrained / generation_rows: outputs are generated text (decoders)
INDEX = "index"  # corpus / documents / set_index: queries are ranked against an index of embedded documents (lmtune.index)
RERANK = "rerank"  # relevance(rows, labels, label): a pair run scores how well text_pair answers text (lmtune.rerank)
# temperature_to_fold / folded_temperature / set_folded / unfolded_temperature, and a `calibration` dict: the calibration
# temperature can be carried by the saved output layer (lmtune.fold), so transformers.pipeline gives lmtune's probabilities
FOLD = "fold"
# soft_targets(outputs, enc, labels, temperature) / distill_with(temperature, alpha): a run of the task teaches (its
# soft targets: per example, or per word for NER), and the task's loss trains towards the `soft_targets` its features
# carry (lmtune.distill); soft_target_alignment / without_labels say how they meet the student and read unlabeled rows
DISTILL = "distill"
# label_scores(outputs, enc, labels) -> LabelScores: the calibrated probability of every label per example, which
# active learning's query strategies score (lmtune.active: entropy, margin, badge) and its suggestions come from
ACTIVE = "active"
# pseudo_labels(outputs, enc, labels): each example's predicted label and calibrated confidence, which self-training
# (lmtune.selftrain, data.unlabeled) thresholds to label unlabeled texts
SELF_TRAINING = "self_training"
# one label per example from a head over the encoder's text features: the recipe's few-shot stage (lmtune.fewshot) may
# put the encoder under an EmbeddingClassifier (sentence embedding -> linear) and tune it on pairs (SetFit)
FEWSHOT = "fewshot"
# the model is a transformers model: an encoder under its base_model_prefix and a head over the encoder's output, which
# reads nothing else of the encoder: task multitask (lmtune.tasks.multitask) shares one encoder between such heads
SHARED_ENCODER = "shared_encoder"
CAPABILITIES = (CALIBRATE, ABSTAIN, MAHALANOBIS, LABEL_NOISE, EXAMPLE_LABELS, INTERVALS, DEV_RULES, CONTINUAL, ENSEMBLE, EXPLAIN,
                GENERATE, INDEX, RERANK, FOLD, DISTILL, ACTIVE, SELF_TRAINING, FEWSHOT, SHARED_ENCODER)
_HOOKS = {CALIBRATE: "calibrate", ABSTAIN: "fit_threshold", MAHALANOBIS: "fit_scorer", LABEL_NOISE: "example_probs",
          INTERVALS: "fit_intervals", DEV_RULES: "fit_decision_rules", EXPLAIN: "explain_targets", GENERATE: "generate",
          INDEX: "corpus", RERANK: "relevance", FOLD: "set_folded", DISTILL: "distill_with",
          ACTIVE: "label_scores", SELF_TRAINING: "pseudo_labels"}


@dataclass
class LabelScores:
    """ACTIVE: what a model says about each example's labels, for active learning (lmtune.active)."""
    probs: np.ndarray  # [examples, labels] calibrated probabilities
    exclusive: bool  # one label per example (a softmax over the labels); False: independent per-label probabilities
    thresholds: np.ndarray | None = None  # multi-label: each label's decision threshold (None: 0.5)

    def decided(self) -> np.ndarray:
        """[examples, labels] bool: the predicted label (exclusive) or labels (each above its threshold)."""
        if self.exclusive:
            return np.eye(self.probs.shape[1], dtype=bool)[self.probs.argmax(1)] if len(self.probs) else self.probs > 1
        return self.probs >= (0.5 if self.thresholds is None else self.thresholds)


class Task:
    """The whole contract between a task module and the rest of lmtune; the training loop talks only
    to this interface. Subclasses implement the required methods and declare their capabilities."""
    name: str = ""
    headline: tuple[str, ...] = ()  # metric names shown in report.md and the CLI summary
    hub_pipeline: str = "text-classification"  # the Hub's pipeline tag, for the model card
    hub_loadable: bool = True  # transformers.pipeline(hub_pipeline) loads model/ as saved (False: a head of lmtune's own)
    peft_task_type: str = ""  # peft's TaskType for this head
    encode_options: dict[str, str] = {}  # encode() keyword -> data.<key> it comes from (e.g. NER windows)
    output_names: tuple[str, ...] = ("logits",)  # the model output attributes unbatch reads (and an ONNX export keeps)
    decision_key: str = "label"  # the key of a prediction row that holds the decision (an attack "succeeds" when it changes)
    # the key of a prediction row that holds spans of the text, [{"text", "label", "score", "start", "end"}] (NER's
    # entities, joint's slots), or None where predictions have none: what an app reads spans from without naming a task
    span_key: str | None = None
    explain_tokens: bool = False  # EXPLAIN targets sit on tokens (NER's entities): gradients only, no occlusion or faithfulness
    capabilities: frozenset[str] = frozenset()
    config_defaults: dict[str, Any] = {}  # dotted config key -> this task's default, where the user set none

    @classmethod
    def defaults_for(cls, values: dict[str, Any]) -> dict[str, Any]:
        """This task's defaults given the keys the user set (dotted key -> value): config_defaults, unless a
        task's defaults depend on another key (generation: train.objective)."""
        return dict(cls.config_defaults)

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        unknown = set(cls.capabilities) - set(CAPABILITIES)
        missing = [cap for cap in cls.capabilities if cap in _HOOKS and getattr(cls, _HOOKS[cap]) is getattr(Task, _HOOKS[cap])]
        if unknown or missing:
            raise TypeError(f"task {cls.__name__}: unknown capabilities {sorted(unknown)} or no method for {missing}")

    # ---- capabilities -----------------------------------------------------------------------
    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, key: str) -> None:
        if not self.supports(capability):
            raise InputError(f"{key}: the {self.name} task does not support {capability.replace('_', ' ')}.")

    def temperature_to_fold(self) -> Any:
        """FOLD: the whole temperature (a scalar, or one per output row) the saved output layer should carry."""
        raise NotImplementedError

    def set_folded(self, folded: Any) -> None:
        """FOLD: record what the output layer's weights are divided by now (lmtune.json's folded_temperature)."""
        raise NotImplementedError

    def unfolded_temperature(self) -> Any:
        """What the model's logits must still be divided by for calibrated probabilities (an ensemble divides
        each member's logits by it): the task's temperature, less what a FOLD task's weights already carry."""
        return float(self.state().get("temperature", 1.0))

    def relevance(self, rows: list[dict], labels: list[str], label: str | None = None) -> list[float]:
        """RERANK: one relevance score per prediction row of a (query, document) pair, higher = more relevant."""
        raise NotImplementedError

    def label_scores(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> LabelScores:
        """ACTIVE: the calibrated probability of every label for each example (a long text's windows pooled)."""
        raise NotImplementedError

    # ---- state saved with the model (lmtune.json / task_state.safetensors) --------------------
    def state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def audit(self, splits: Splits, truncation: dict[str, dict] | None = None, max_length: int | None = None) -> list[dict]:
        """The data audit's findings (audit.py's format): the generic checks over the splits, then the task's own
        (audit_findings). Task multitask audits each sub-task's data on its own."""
        from lmtune.audit import audit
        return audit(splits, truncation, max_length) + self.audit_findings(splits)

    def audit_findings(self, splits: Splits) -> list[dict]:
        """Task-specific data audit findings, beside the generic ones (audit.py's finding format)."""
        return []

    def report_state(self) -> dict:
        """What report() needs beyond the metrics and state() (e.g. calibration curves), as JSON data:
        saved in results.json so that report.md can be rendered again from data alone."""
        return {}

    def set_report_state(self, data: dict) -> None:
        pass

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    # ---- required -----------------------------------------------------------------------------
    def read(self, cfg: Config) -> Splits:
        """Read and validate all data; raise InputError before anything is written."""
        raise NotImplementedError

    def read_file(self, path: str, cfg: Config, labels: list[str] | None = None, require_label: bool = True) -> list:
        """Read one extra file (evaluate/predict) against the labels the model knows."""
        raise NotImplementedError

    def from_texts(self, texts: list) -> list:
        """Unlabeled examples from raw texts (predict, serve)."""
        raise NotImplementedError

    def build_model(self, cfg: Config, labels: list[str]) -> tuple[torch.nn.Module, Any]:
        """Pretrained backbone + a new head, and its tokenizer."""
        raise NotImplementedError

    def load_model(self, model_dir: Path) -> tuple[torch.nn.Module, Any]:
        """A trained model saved in save_pretrained layout."""
        raise NotImplementedError

    def encode(self, examples: list, tokenizer: Any, max_length: int, labels: list[str] | None, **options) -> Encoded:
        """Token ids (+ label ids, -100 where unlabeled) and lengths; counts truncation. Call it through
        encode_examples(), which passes the options the task declares."""
        raise NotImplementedError

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def num_items(self, features: list[dict]) -> int:
        """What the loss is averaged over (examples, or labeled tokens)."""
        raise NotImplementedError

    def pad_values(self, tokenizer: Any) -> dict[str, int] | None:
        """The collated batch's keys with a sequence dimension and the value that pads each, when
        padding a batch wider changes neither outputs nor loss (the fast path's length buckets);
        None (the default) when it would, or when the task has not said."""
        return None

    def train_batches(self, features: list[dict], batch_size: int, seed: int, epoch: int,
                      group_by_length: bool = True) -> list[list[int]]:
        """An epoch's batches of indices into the training features, a pure function of (seed, epoch) so that a
        resumed run replays them. Default: shuffled, grouped by length (training.batching.epoch_batches)."""
        from lmtune.training.batching import epoch_batches
        return epoch_batches([f["length"] for f in features], batch_size, seed, epoch, group_by_length)

    def train_features(self, enc: Encoded) -> list[dict]:
        """The features of the train split that are trained on (all; a windowing task may cap a long text's)."""
        return enc.features

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed (not averaged) loss, so micro-batches add up exactly."""
        raise NotImplementedError

    def example_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of each example of a batch, shape [batch] (what word-level adversarial training
        maximizes). Default: cross-entropy of heads whose `logits` and `labels` share their leading dims."""
        logits, labels = outputs.logits.float(), batch["labels"]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100)
        return ce.view(labels.shape[0], -1).sum(1)

    def unbatch(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Per-example outputs (e.g. logits rows) as numpy arrays."""
        raise NotImplementedError

    def evaluate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        """Metrics from per-feature outputs; a task whose features are windows of an example merges
        them here (enc maps features to examples). Must contain every name usable as train.metric."""
        raise NotImplementedError

    def predictions(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[dict]:
        raise NotImplementedError

    def report(self, split_metrics: dict[str, dict], labels: list[str], run_dir: Path) -> str:
        """Task-specific Markdown for report.md (tables, plots it writes into run_dir)."""
        raise NotImplementedError

    def default_lr(self, cfg: Config) -> float | None:
        """This task's learning rate where train.lr is unset, or None for the PEFT method's / the encoder's own."""
        return None

    def before_fit(self, model, features: list[dict], collate, device) -> None:
        """Anything computed from the model as built (PEFT applied, nothing trained) before the loop
        changes it, onto the features of every split (generation's DPO: the reference log-probs)."""

    def prepare_outputs(self, model, features: list[dict], collate, device) -> None:
        """The same for a loaded run's model before it scores features (Run.outputs)."""

    def decision_labels(self, labels: list[str]) -> list[str]:
        """The values the decision (decision_key) takes, of the run's labels: all of them, unless the run's labels
        hold more than the decision (joint: the intents, then the slot tags)."""
        return list(labels)

    def span_types(self, labels: list[str]) -> list[str]:
        """The types (a span's "label") the spans under span_key can have, of the run's labels; [] without spans."""
        return []

    def reads_pairs(self, cfg: Config) -> bool:
        """Whether each input is two texts (predict --pair, the API's pairs)."""
        return cfg.data.text_pair_column is not None

    def response_fields(self) -> dict[str, tuple[Any, str]]:
        """The fields of one prediction over HTTP: name -> (type, description); the server builds its
        response schema (and the OpenAPI docs) from them, so it never names a task."""
        raise NotImplementedError

    # ---- capability hooks (declared in `capabilities`) ------------------------------------------
    def calibrate(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        raise NotImplementedError

    def fit_threshold(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], target: str,
                      value: float | None, calibrated: bool, **kw) -> dict:
        raise NotImplementedError

    def fit_scorer(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        raise NotImplementedError

    def example_probs(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def fit_intervals(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        raise NotImplementedError

    def fit_decision_rules(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> dict:
        raise NotImplementedError

    def soft_targets(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str], temperature: float) -> Any:
        """A teacher's soft targets per example at the distillation temperature, from its calibrated outputs (an
        ensemble's: its averaged calibrated probabilities): what a student of the same task trains towards
        (lmtune.distill), in the form the task's encode reads them from the examples: one row over the labels per
        example ([examples, labels]: classification, multi-label), or one array per example (NER: [words, tags])."""
        raise NotImplementedError

    def soft_target_alignment(self, shared_tokenizer: bool) -> str:
        """DISTILL: how the teacher's soft targets meet the student's inputs: "example" (one target per text, whatever
        either model's tokenizer), or a token-level task's "position" (teacher and student share the tokenizer) or
        "word" (they do not: the words are what both see)."""
        return "example"

    def without_labels(self, examples: list) -> list:
        """The examples with their labels dropped, each keeping its file:line (distill's --unlabeled file: a label
        column there is ignored). Default: a text (pair) task's, through from_texts."""
        texts = [ex.text if ex.text_pair is None else (ex.text, ex.text_pair) for ex in examples]
        return [replace(new, source=ex.source) for new, ex in zip(self.from_texts(texts), examples)]

    def distill_with(self, temperature: float, alpha: float) -> None:
        """Train towards the features' soft targets: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha)
        * the task's own loss on labeled rows (unlabeled rows: the soft term alone)."""
        raise NotImplementedError

    def pseudo_labels(self, outputs: list[np.ndarray], enc: Encoded, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """SELF_TRAINING: per example of enc, the index (into labels) of the predicted label and its calibrated
        confidence in [0, 1] (the probability predict reports), as two arrays of len(enc.examples)."""
        raise NotImplementedError

    def explain_targets(self, row: dict, labels: list[str], label: str | None = None) -> list[dict]:
        """What to attribute for one prediction row: [{"name": shown name, "index": output column}], the
        predicted label(s) by default or `label` when given (an unknown label is an InputError)."""
        raise NotImplementedError

    def target_score(self, logits: torch.Tensor, target: dict, log_odds: bool = False) -> torch.Tensor:
        """The number an explanation is about, per row of a batch of sequence-level outputs [batch, ...]:
        the calibrated probability of the target class (faithfulness is measured on it), or with log_odds
        its log-odds, which attributions explain because it does not saturate (the gradients of a
        probability near 1 vanish along most of the Integrated Gradients path); differentiable."""
        raise NotImplementedError


    def generate(self, model, tokenizer: Any, examples: list, device: torch.device, settings: dict | None = None,
                 progress: str = "auto", max_new_tokens: int | None = None, streamer: Any = None,
                 constraint: Any = "run") -> list[dict]:
        """Generated outputs, one {"text", "tokens", "finished"} per example, with the decoding settings
        saved with the model (overridden by `settings`); `streamer` receives the tokens of a single example.
        `constraint`: "run" (the structured-output constraint the run was trained with, if any), None (free
        decoding) or a lmtune.structured.Constraint (a request's own)."""
        raise NotImplementedError

    def compare_unconstrained(self, model, tokenizer: Any, examples: list, device: torch.device, constrained: list[dict],
                              progress: str = "auto") -> dict:
        """With a structured-output constraint, the examples generated again without it, compared with
        `constrained` (their outputs under it): {"structured": {...}}; {} without a constraint."""
        raise NotImplementedError

    def fit_decoding(self, model, tokenizer: Any, examples: list, device: torch.device, seed: int, trials: int,
                     progress: str = "auto") -> dict:
        """Choose the decoding settings on dev examples; they are saved with the model."""
        raise NotImplementedError

    def score_generations(self, examples: list, generated: list[dict]) -> dict:
        """Metrics of generated outputs against the examples' references, and the output checks."""
        raise NotImplementedError

    def generation_rows(self, examples: list, generated: list[dict]) -> list[dict]:
        """Prediction rows: each output beside its prompt and references."""
        raise NotImplementedError

    def corpus(self, cfg: Config, splits: Splits) -> list[dict]:
        """The documents the run's index holds after training: [{"text", "id"?}]."""
        raise NotImplementedError

    def documents(self, texts: list[str]) -> list:
        """Examples of documents alone, to embed into an index."""
        raise NotImplementedError

    def set_index(self, index: Any) -> None:
        """The run's index (lmtune.index.Index): predictions of bare queries rank against it."""
        raise NotImplementedError


def dev_and_test(task: Task, cfg: Config, train: list, labels: list[str] | None = None) -> tuple[list, list, list, dict]:
    """train, dev, test and the splits.json record for tasks without a label to stratify on: the dev
    (and test) files when given, else a seeded shuffle split of train (test kept when given)."""
    d = cfg.data
    extra = () if labels is None else (labels,)
    if d.dev:
        dev = task.read_file(d.dev, cfg, *extra)
        test = task.read_file(d.test, cfg, *extra) if d.test else []
        return train, dev, test, {"method": "files", "train": d.train, "dev": d.dev, "test": d.test}
    test = task.read_file(d.test, cfg, *extra) if d.test else None
    return shuffle_split(train, test, d.split, cfg.train.seed, "random split", d.train)


def shuffle_split(train: list, test: list | None, fractions: list[float], seed: int, method: str,
                  source: str) -> tuple[list, list, list, dict]:
    """Dev (and test, when no test file was given) split off train by a seeded shuffle, for tasks with
    no single label per example to stratify on; returns train, dev, test and the splits.json record."""
    fr = fractions if test is None else [fractions[0], fractions[1], 0.0]
    fr = [f / sum(fr) for f in fr]
    tr, dv, te = stratified_split([0] * len(train), fr, seed)  # one stratum: a seeded shuffle
    dev = [train[i] for i in dv]
    test = test if test is not None else [train[i] for i in te]
    info = {"method": method, "fractions": fr, "seed": seed, "source": source, "dev_rows": [ex.source for ex in dev]}
    return [train[i] for i in tr], dev, test, info


def input_pad_values(tokenizer: Any) -> dict[str, int]:
    """What pad_batch pads the model inputs with (Task.pad_values of tasks whose batches it makes)."""
    return {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}


def pad_rows(rows: list, width: int, fill: int) -> torch.Tensor:
    """Integer rows right-padded with `fill` to `width`, as one long tensor. Through numpy: a list
    assigned into a numpy row costs a microsecond, a torch.tensor per row ten (a 32-row NER batch
    collated in 0.056 ms instead of 0.65, CPU); the loop collates every step."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


def pad_batch(features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (/ token_type_ids) padded to the batch's own longest row.
    Hand-written: several times faster than tokenizer.pad on small CPU batches (see pad_rows)."""
    width = max(f["length"] for f in features)
    batch = {"input_ids": pad_rows([f["input_ids"] for f in features], width, tokenizer.pad_token_id or 0),
             "attention_mask": pad_rows([[1] * f["length"] for f in features], width, 0)}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad_rows([f["token_type_ids"] for f in features], width, 0)
    return batch


def task_options(task: Task, cfg: Config) -> dict:
    """Encoding options a task declares (e.g. NER windows) taken from the config."""
    return {name: getattr(cfg.data, key) for name, key in task.encode_options.items()}


def encode_examples(task: Task, examples: list, tokenizer: Any, cfg: Config, labels: list[str] | None) -> Encoded:
    """The one way examples are encoded: with the run's max_length and every option the task declares
    (an encode call that forgot them made the NER label-noise folds ignore window_overlap)."""
    return task.encode(examples, tokenizer, cfg.data.max_length, labels, **task_options(task, cfg))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                      focal_gamma: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over rows of [N, C] logits (labels -100 ignored), optionally class-weighted
    and focal ((1 - p_true) ** gamma down-weights what the model already gets right)."""
    logits = logits.float()
    if weight is None and not focal_gamma:
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
    ce = F.cross_entropy(logits, labels, weight=None if weight is None else weight.to(logits.device),
                         reduction="none", ignore_index=-100)
    if focal_gamma:  # p_true from the unweighted cross-entropy, which is ce itself when there are no weights
        plain = ce if weight is None else F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
        ce = ce * (1 - torch.exp(-plain)) ** focal_gamma
    return ce.sum()


def attach_soft_targets(features: list[dict], examples: list) -> list[dict]:
    """Each feature carries its example's soft targets (lmtune.distill), when the example has them; a
    windowing task's features name their example, the others pair with theirs one to one."""
    for k, f in enumerate(features):
        soft = examples[f.get("example", k)].soft_targets
        if soft is not None:
            f["soft_targets"] = soft
    return features


def collate_soft_targets(features: list[dict]) -> torch.Tensor | None:
    """The batch's soft targets [batch, labels] (NaN rows for features without them), or None when none has any."""
    rows = [f.get("soft_targets") for f in features]
    width = next((len(r) for r in rows if r is not None), 0)
    if not width:
        return None
    return torch.tensor([r if r is not None else [float("nan")] * width for r in rows], dtype=torch.float)


def soft_target_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed T^2 * KL(teacher_T || student_T) over the rows that have soft targets (the teacher's
    log-probabilities at temperature T; NaN rows: none). The T^2 keeps the soft gradients' scale
    independent of T (Hinton et al. 2015). Masked arithmetic, not indexing: the shapes stay static."""
    has = ~torch.isnan(soft_targets[:, :1])
    teacher_log = torch.nan_to_num(soft_targets.to(logits.device), nan=0.0)
    student_log = torch.log_softmax(logits.float() / temperature, -1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1, keepdim=True)
    return (kl * has.to(kl.device)).sum() * temperature ** 2


def class_score(z: torch.Tensor, index: int, log_odds: bool) -> torch.Tensor:
    """Rows of (temperature-scaled) logits [N, C]: the probability of class `index`, or its log-odds
    (z_index - logsumexp of the others), which does not saturate."""
    if not log_odds:
        return torch.softmax(z, -1)[:, index]
    return z[:, index] - torch.logsumexp(torch.cat([z[:, :index], z[:, index + 1:]], 1), 1)


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency ("balanced") class weights: each class contributes equally overall; a class
    absent from train gets the largest weight of the others rather than infinity."""
    counts = np.asarray(counts, dtype=float)
    w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return np.where(counts > 0, w, w.max() if w.any() else 1.0)


def sub_report(task: Task, split_metrics: dict[str, dict], labels: list[str], run_dir: Path, prefix: str) -> str:
    """A sub-task's report section (task joint's heads, task multitask's tasks), its plots renamed PREFIX_NAME.png in
    run_dir (two sub-tasks would both write reliability.png), its ### headings prefixed."""
    with tempfile.TemporaryDirectory() as tmp:
        text = task.report(split_metrics, labels, Path(tmp))
        for png in Path(tmp).glob("*.png"):
            shutil.move(str(png), run_dir / f"{prefix}_{png.name}")
            text = text.replace(f"]({png.name})", f"]({prefix}_{png.name})")
    return re.sub(r"^### ", "### " + prefix.capitalize() + ": ", text, flags=re.MULTILINE)
