"""Registries and the task interface: a new task is one module plus one registration, capabilities
are declared (and checked when the class is made), and unknown names are clear errors."""
from __future__ import annotations

import copy

import pytest

import lmtune
from lmtune import registry
from lmtune.config import build_config, validate
from lmtune.errors import InputError
from lmtune.tasks import get_task, register
from lmtune.tasks.base import ABSTAIN, CALIBRATE, Task
from lmtune.tasks.classification import ClassificationTask
from lmtune.tracking import Tracker


class ShoutTask(ClassificationTask):
    """A throwaway task defined only here: classification of upper-cased text, without abstention."""
    name = "shout"
    capabilities = frozenset({CALIBRATE})

    def read(self, cfg):
        splits = super().read(cfg)
        for ex in splits.train + splits.dev + splits.test:
            ex.text = ex.text.upper()
        return splits


def test_a_task_registered_outside_lmtune_trains_end_to_end(tiny_config):
    register("shout", "tests.test_registry:ShoutTask")
    cfg = copy.deepcopy(tiny_config)
    cfg.update(task="shout")
    cfg["train"].update(max_steps=4)
    run = lmtune.train(cfg)
    assert run.metrics["train"]["steps"] == 4 and isinstance(run.task, ShoutTask)
    assert lmtune.load(run.run_dir).predict(["GREAT FOOD"])[0]["label"] in ("pos", "neg")
    with pytest.raises(InputError, match="abstain.target: the shout task does not support abstain"):
        lmtune.train({**cfg, "run_name": "x", "abstain": {"target": "coverage"}})


def test_declared_capabilities_need_their_methods():
    with pytest.raises(TypeError, match="no method for"):
        type("Broken", (Task,), {"capabilities": frozenset({ABSTAIN})})
    with pytest.raises(TypeError, match="unknown capabilities"):
        type("Odd", (Task,), {"capabilities": frozenset({"telepathy"})})


def test_unknown_names_are_errors_with_a_suggestion():
    with pytest.raises(InputError, match=r"unknown task 'clasification'.*Did you mean 'classification'"):
        get_task("clasification")
    with pytest.raises(InputError, match=r"peft\.method = 'lorra' is not one of none, lora"):
        build_config({"peft": {"method": "lorra"}})
    with pytest.raises(InputError, match=r"attack\.methods: unknown attack 'typos'.*Did you mean 'typo'"):
        validate(build_config({"attack": {"methods": ["typos"]}}))


def test_names_come_from_the_registries():
    assert registry.peft_methods.names(mergeable=True) == ("lora", "adalora", "ia3")
    assert registry.adversaries.names(kind="word") == ("typo", "synonym")
    assert set(registry.backends.names()) == {"torch", "onnx", "onnx-int8"}
    assert {"classification", "ner"} <= set(registry.tasks.names())


def test_report_is_rendered_from_the_results_document(tiny_config, capsys):
    import json

    from lmtune.cli import main
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=4)
    cfg["abstain"] = {"target": "coverage", "value": 0.9}
    run = lmtune.train(cfg)
    doc = json.loads((run.run_dir / "results.json").read_text())
    assert doc["schema"] == 1 and set(doc["metrics"]) == {"dev", "test"} and doc["summary"]["steps"] == 4
    assert doc["metrics"]["dev"]["accuracy"] == run.metrics["dev"]["accuracy"]  # metrics.json keeps its keys
    written = (run.run_dir / "report.md").read_text()
    (run.run_dir / "report.md").unlink()
    assert main(["report", str(run.run_dir)]) == 0
    assert (run.run_dir / "report.md").read_text() == written
    lmtune.load(run.run_dir).attack(methods=["typo"])  # a later section: the report is rendered again, whole
    doc = json.loads((run.run_dir / "results.json").read_text())
    report = (run.run_dir / "report.md").read_text()
    assert doc["robustness"]["attacks"]["typo"] and report.startswith(written.rstrip("\n")[:200]) and "## Robustness" in report


class RowsTracker(Tracker):
    """A throwaway tracker defined only here: keeps every history row it is handed."""
    seen: list = []
    final: dict = {}
    closed = False

    def __init__(self, run_dir, cfg):
        super().__init__(run_dir, cfg)
        self.done = 0
        RowsTracker.seen, RowsTracker.final, RowsTracker.closed = [], {}, False

    def __call__(self, state):
        RowsTracker.seen += state.history[self.done:]
        self.done = len(state.history)

    def finish(self, results, files):
        RowsTracker.final = {"metrics": results["metrics"], "files": [f.name for f in files]}

    def close(self, failed=False):
        RowsTracker.closed = not failed


class CountingAdversary:
    """A throwaway adversary defined only here: the plain step, counted (one pass per micro-batch)."""
    passes = 1

    def __init__(self):
        self.calls = 0

    @classmethod
    def build(cls, inputs):
        assert inputs.features and inputs.tokenizer is not None
        return cls()

    def describe(self):
        return {"method": "counting", "calls": self.calls}

    def step(self, model, batch, loss_fn, backward, no_sync=None, items=None):
        self.calls += 1
        loss = loss_fn(model, batch)
        backward(loss)
        return loss


def test_a_tracker_and_an_adversary_registered_outside_lmtune_plug_in(tiny_config, request):
    registry.trackers.register("rows", "tests.test_registry:RowsTracker")
    registry.adversaries.register("counting", "tests.test_registry:CountingAdversary", kind="custom")
    # registered for this test only: later tests (the config schema's enums) see lmtune's own entries
    request.addfinalizer(lambda: (registry.trackers.unregister("rows"), registry.adversaries.unregister("counting")))
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=3, trackers=["rows"])
    cfg["adversarial"] = {"method": "counting"}
    run = lmtune.train(cfg)
    assert [r["step"] for r in RowsTracker.seen if "train_loss" in r] == [1, 2, 3] and RowsTracker.closed
    assert "test" in RowsTracker.final["metrics"] and "report.md" in RowsTracker.final["files"]
    assert run.metrics["train"]["adversarial"] == {"method": "counting", "calls": 3}
    with pytest.raises(InputError, match=r"train\.trackers: unknown tracker 'mlfow'"):
        validate(build_config({"train": {"trackers": ["mlfow"]}}))


def test_a_tracker_whose_package_is_missing_fails_before_training(tiny_config, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(trackers=["tensorboard"])
    with pytest.raises(InputError, match="tensorboard needs the tensorboard package"):
        lmtune.train(cfg)
