"""What the recipe's stages hand each other, in typed parts that each stage fills once: the inputs
(given), the built model, the prepared data, the fit and the outcome (evaluation and what is saved)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from lmtune.artifacts import RunDir
from lmtune.config import Config
from lmtune.tasks.base import Encoded, Splits
from lmtune.training.loop import predict_outputs


@dataclass
class Inputs:
    """What the run was asked to do. Only the label-noise stage changes it (it may drop train rows)."""
    cfg: Config
    task: Any
    splits: Splits
    rd: RunDir
    resume: bool | str | Path = False
    callbacks: tuple = ()
    previous: Any = None  # continual.Previous: the run this one continues
    slice_values: tuple | None = None  # data.slice_columns: (split, {column: value per example}), read by record
    noise: dict | None = None  # the label-noise search's result
    unlabeled: list | None = None  # data.unlabeled: its texts as unlabeled examples, read by the unlabeled stage
    # a self-training student's: the fewshot stage's record of the run that trains it, whose method (decided on the
    # gold labels) the student's fewshot stage takes instead of deciding again (lmtune.fewshot.given_decision)
    fewshot_decision: dict | None = None


@dataclass
class Built:
    """The model being trained and its tokenizer; adapt adds PEFT and the learning rates."""
    model: Any
    tokenizer: Any
    head: list = field(default_factory=list)  # a continued run's per-label head tensors (no L2-SP on them)
    lrs: Any = None  # training.optim.LearningRates, with the metric early stopping watches
    trainable: int = 0
    total: int = 0


@dataclass
class Data:
    """Train, dev and test as the model reads them, and the training rows the loop draws from."""
    encoded: dict[str, Encoded]  # each split's encoding
    train_features: list  # what the loop trains on: train (re-sampled) plus the augmented rows
    train_size: int  # training examples after re-sampling and augmentation: the schedule's length
    collate: Callable
    augmented: Encoded | None = None  # augment.methods' new rows, encoded
    resampled: list | None = None  # data.resample's example indices
    synonyms: Any = None  # robust.text.Synonyms, when the adversary needs them
    audit: list = field(default_factory=list)  # the data audit's findings


@dataclass
class Fit:
    """What training left: its checkpoints, final state and cost."""
    ckpt: Any
    state: Any  # training.loop.TrainState
    resumed_from: int | None
    peak_mem: Any
    seconds: float  # this process only; a resumed run counts its own part
    adversary: Any = None


@dataclass
class Outcome:
    """The restored model's outputs (computed once per split), metrics, predictions and analyses."""
    outputs: Callable[[str], list]
    split_metrics: dict = field(default_factory=dict)
    preds: dict = field(default_factory=dict)
    continual: dict | None = None  # forgetting figures
    slices: dict | None = None  # per-slice metrics of the slice split
    drift_reference: dict | None = None  # what the serve drift monitor compares traffic with
    # registered analyses' results that a training stage measured (selftrain), by name: results.json sections
    sections: dict = field(default_factory=dict)


@dataclass
class Context:
    inputs: Inputs
    accelerator: Accelerator
    built: Built | None = None
    data: Data | None = None
    fit: Fit | None = None
    outcome: Outcome | None = None
    trackers: list = field(default_factory=list)
    fewshot: dict | None = None  # the few-shot stage's record (lmtune.fewshot): method, why, pairs, contrastive seconds
    run: Any = None  # the inference.Run train() returns

    cfg = property(lambda self: self.inputs.cfg)
    task = property(lambda self: self.inputs.task)
    splits = property(lambda self: self.inputs.splits)
    rd = property(lambda self: self.inputs.rd)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def outputs(self, model, split: str) -> list:
        """`model`'s outputs on an encoded split (the loop's dev evaluation, and the final model's)."""
        return predict_outputs(model, self.data.encoded[split].features, self.data.collate, self.task.unbatch,
                               self.accelerator.device, f"eval {split}", self.cfg.train.progress)

    def final_outputs(self) -> Callable[[str], list]:
        """The current model's outputs per split, each computed once."""
        return functools.cache(lambda split: self.outputs(self.built.model, split))
