"""Preference tuning of task generation (issue 50, item 2) on a tiny random Llama: train.objective dpo on a
pairs file lowers the DPO loss and widens the reward margin, the reference log-probs are the starting
model's (adapter disabled), orpo trains, a bad pairs file is exit 2 with its line, the candidate ranking
never prefers a loop on a ROUGE-L tie, and `lmtune prefer` turns an SFT run into pairs and a DPO run."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
import lmtune.prefer
import lmtune.recipe
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.peft import apply_peft
from lmtune.prefer import PENALTIES, Candidate, pick_pair, score_candidates
from lmtune.tasks import get_task
from lmtune.tasks.preference import fill_reference, response_log_probs
from lmtune.training.loop import inputs
from tests.test_generation import _rows, _save_tiny, _write

BAD = "the the the the the"  # the rejected output: a loop


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-prefer"))


def _pairs(n: int, seed: int) -> list[dict]:
    return [{"prompt": r["text"], "chosen": r["summary"], "rejected": BAD} for r in _rows(n, seed)]


def _pair_cfg(tmp_path: Path, model: str, objective: str, **train) -> dict:
    return {"task": "generation", "output_dir": str(tmp_path / "runs"), "run_name": objective, "model": {"name": model},
            "data": {"train": _write(tmp_path / "pairs.jsonl", _pairs(48, 1)), "dev": _write(tmp_path / "dev.jsonl", _pairs(12, 2)),
                     "test": _write(tmp_path / "test.jsonl", _rows(8, 3)), "label_column": "summary", "max_length": 96},
            "generate": {"instruction": "", "max_new_tokens": 8, "search_trials": 1, "search_examples": 6},
            "peft": {"method": "lora", "r": 8},
            "train": {"epochs": 3, "lr": 5e-3, "progress": "none", "seed": 1, "objective": objective, **train}}


def _history(run) -> list[dict]:
    return [json.loads(x) for x in (run.run_dir / "history.jsonl").read_text().splitlines()]


def test_dpo_on_pairs_lowers_the_loss_and_widens_the_reward_margin(tmp_path, tiny_llama):
    run = lmtune.train(_pair_cfg(tmp_path, tiny_llama, "dpo", rpo_alpha=0))  # plain DPO: TRL's sigmoid loss alone
    steps = [h["train_loss"] for h in _history(run) if "train_loss" in h]
    evals = [h for h in _history(run) if "dev_reward_margin" in h]
    # the first step's policy is its reference (the LoRA starts at zero): the loss is log 2 exactly
    assert steps[0] == pytest.approx(math.log(2), abs=1e-4)
    assert sum(steps[-4:]) / 4 < steps[0] - 0.05, steps
    assert len(evals) == 3 and evals[-1]["dev_reward_margin"] > evals[0]["dev_reward_margin"] > 0, evals
    dev = run.metrics["dev"]
    assert dev["reward_accuracy"] == 1.0 and dev["pairs"] == 12 and dev["loss"] < math.log(2)
    results = json.loads((run.run_dir / "results.json").read_text())
    assert results["metrics"]["dev"]["reward_accuracy"] == 1.0
    assert "### Preference tuning" in (run.run_dir / "report.md").read_text()
    # the decoding search ran again, with the chosen outputs as dev references, and test was generated
    assert (run.run_dir / "generation.json").is_file() and "rougeL" in run.metrics["test"]
    assert run.task.state()["objective"] == "dpo"
    # the saved run scores pairs against the same reference (its adapter disabled): the same dev loss
    again = lmtune.load(run.run_dir).evaluate(tmp_path / "dev.jsonl")
    assert again["loss"] == pytest.approx(dev["loss"], rel=1e-4) and again["reward_accuracy"] == 1.0


def test_reference_log_probs_are_the_starting_models_with_the_adapter_disabled(tmp_path, tiny_llama):
    cfg = build_config(_pair_cfg(tmp_path, tiny_llama, "dpo"))
    task = get_task("generation")
    examples = task.read_file(cfg.data.dev, cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = task.encode(examples, tok, 96)
    peft_model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_llama), cfg.peft, "CAUSAL_LM", 10)
    with torch.no_grad():  # a trained-looking adapter: with it the log-probs differ from the base model's
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    collate = lambda f: task.collate(f, tok)  # noqa: E731
    fill_reference(peft_model, enc.features, collate, torch.device("cpu"), batch_size=5, adapter_off=True)
    batch = collate(enc.features)
    with torch.no_grad():
        plain, _ = response_log_probs(base(**inputs(batch)), batch)
        adapted, _ = response_log_probs(peft_model(**inputs(batch)), batch)
    n = len(enc.features)
    stored = torch.tensor([f["reference"] for f in enc.features])
    assert torch.allclose(stored[:, 0], plain[:n], atol=1e-4) and torch.allclose(stored[:, 1], plain[n:], atol=1e-4)
    assert not torch.allclose(stored[:, 0], adapted[:n], atol=1e-2)
    # the prompt is masked: only response tokens count (chosen: its words and end-of-text)
    assert batch["logits_to_keep"][:n].sum(1).tolist() == [len(tok(ex.label, add_special_tokens=False)["input_ids"]) + 1
                                                         for ex in examples]


def test_orpo_trains_without_a_reference(tmp_path, tiny_llama):
    run = lmtune.train(_pair_cfg(tmp_path, tiny_llama, "orpo", epochs=2))
    steps = [h["train_loss"] for h in _history(run) if "train_loss" in h]
    assert sum(steps[-3:]) / 3 < sum(steps[:3]) / 3, steps
    dev = run.metrics["dev"]
    assert dev["reward_accuracy"] >= 0.9 and dev["reward_margin"] > 0


@pytest.mark.parametrize("broken, message", [
    ({"prompt": "a text", "chosen": "good"}, "line 3: missing 'rejected'"),
    ({"prompt": "a text", "chosen": "  ", "rejected": "bad"}, "line 3: 'chosen' must be non-empty text"),
])
def test_a_bad_pairs_file_is_exit_2_with_its_line(tmp_path, tiny_llama, capsys, broken, message):
    cfg = _pair_cfg(tmp_path, tiny_llama, "dpo")
    rows = _pairs(4, 1)
    rows[2] = broken
    cfg["data"]["train"] = _write(tmp_path / "bad.jsonl", rows)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.jsonl'}: {message}" in err, err
    assert not (tmp_path / "runs").exists()


def test_sft_rows_under_dpo_are_exit_2(tmp_path, tiny_llama, capsys):
    cfg = _pair_cfg(tmp_path, tiny_llama, "dpo")
    cfg["data"]["train"] = _write(tmp_path / "sft.jsonl", _rows(8, 1))
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "train.objective dpo trains on preference pairs" in capsys.readouterr().err


def test_a_loop_is_never_chosen_over_a_clean_output_of_equal_rouge():
    clean = Candidate("the food was fine", 0.5, loop=False, capped=False, invented=False)
    looping = Candidate("the food the food the food", 0.5, loop=True, capped=False, invented=False)
    for order in ([looping, clean], [clean, looping]):
        best, worst = pick_pair(order)
        assert best is clean and worst is looping
    # a ROUGE-L gain smaller than the loop penalty does not buy a loop its place
    assert pick_pair([Candidate("x y", 0.5 + PENALTIES["loop"] / 2, True, False, False), clean])[0] is clean
    # two candidates closer than the margin make no pair
    assert pick_pair([clean, Candidate("the food was ok", 0.48, False, False, False)]) is None
    # the checks themselves: a real loop, a cap hit and an invented name are found
    ex = get_task("generation").from_texts(["the food was great at the diner"])[0]
    ex.references = ["the food was great"]
    got = score_candidates(ex, [{"text": "the food was great", "finished": True},
                                {"text": "great great great great great great", "finished": True},
                                {"text": "the food was great", "finished": False},
                                {"text": "Zorblax said the food was great", "finished": True}])
    assert [c.loop for c in got] == [False, True, False, False] and [c.capped for c in got] == [False, False, True, False]
    assert [c.invented for c in got] == [False, False, False, True] and got[0].rougeL == pytest.approx(1.0)
    assert max(got, key=lambda c: c.score) is got[0]


def _sft(tmp_path: Path, model: str, name: str = "sft", **peft) -> Path:
    data = {k: _write(tmp_path / f"{k}.jsonl", _rows(n, s)) for k, n, s in (("train", 48, 1), ("dev", 8, 2), ("test", 8, 3))}
    run = lmtune.train({"task": "generation", "output_dir": str(tmp_path / "runs"), "run_name": name, "model": {"name": model},
                        "data": {**data, "label_column": "summary", "max_length": 96},
                        "generate": {"instruction": "Summarize.", "max_new_tokens": 10, "search_trials": 0, "search_examples": 8},
                        "peft": {"method": "lora", "r": 8, **peft},
                        "train": {"epochs": 2, "lr": 5e-3, "progress": "none", "seed": 1}})
    return run.run_dir


def test_prefer_makes_pairs_from_an_sft_run_and_trains_dpo(tmp_path, tiny_llama, capsys, caplog, monkeypatch):
    sft_dir = _sft(tmp_path, tiny_llama)
    monkeypatch.chdir(tmp_path)  # output_dir "runs", relative as by default: the new run must load from anywhere
    args = ["prefer", str(sft_dir), "--k", "3", "--max-prompts", "16", "--run_name", "dpo", "--output_dir", "runs",
            "--train.epochs", "1", "--train.progress", "none"]
    new = Path("runs") / "dpo"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the DPO training, after the sampling
    with monkeypatch.context() as m:
        m.setattr(lmtune.recipe, "_train", stopped)
        assert main(args) == 130
    assert not new.exists()  # the recipe removed its unfinished run; the sampled pairs survive in the SFT run
    kept = sft_dir / "prefer_pairs" / "k3-t0.8-p16-s1"
    assert f"its pairs are kept in {kept}" in caplog.text
    kept_pairs = (kept / "pairs.jsonl").read_text()

    def no_sampling(*args, **kwargs):
        raise AssertionError("the rerun samples again instead of reusing the kept pairs")
    with monkeypatch.context() as m:
        m.setattr(lmtune.prefer, "make_pairs", no_sampling)
        assert main(args) == 0
    out = capsys.readouterr().out
    assert f"run dir: {new}" in out
    assert (new / "prefer" / "pairs.jsonl").read_text() == kept_pairs
    pairs = [json.loads(x) for x in kept_pairs.splitlines()]
    assert pairs and all(set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["prompt"] in [r["text"] for r in _rows(48, 1)] for p in pairs)  # the source text, wrapped again on reading
    # the dev pairs keep the dev split's true references: the decoding search and dev ROUGE-L score against the
    # data, not against the SFT model's own chosen sample
    dev_truth = {r["text"]: r["summary"] for r in _rows(8, 2)}
    dev_pairs = [json.loads(x) for x in (new / "prefer" / "dev_pairs.jsonl").read_text().splitlines()]
    assert dev_pairs and all(p["references"] == [dev_truth[p["prompt"]]] for p in dev_pairs)
    summary = json.loads((new / "prefer.json").read_text())
    assert summary["sampling_seconds"] > 0 and summary["objective"] == "dpo" and summary["pairs_reused"] is True
    assert summary["train"]["prompts"] == 16 and summary["train"]["candidates"] == 64
    assert summary["train"]["pairs"] == len(pairs) and set(summary["train"]["chosen"]) >= {"loop_share", "invented_share"}
    results = json.loads((new / "results.json").read_text())
    assert "reward_accuracy" in results["metrics"]["dev"] and "rougeL" in results["metrics"]["test"]
    assert results["prefer"]["train"]["pairs"] == len(pairs)
    sft_train = yaml.safe_load((sft_dir / "config.yaml").read_text())["train"]
    new_train = yaml.safe_load((new / "config.yaml").read_text())["train"]  # a pair is two sequences: half the rows per micro-batch
    assert new_train["batch_size"] == sft_train["batch_size"] and new_train["grad_accum"] == 2 * sft_train["grad_accum"]
    report = (new / "report.md").read_text()
    assert "### Preference tuning" in report and "Pairs made by `lmtune prefer`" in report
    assert json.loads((new / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((new / "prefer" / "sft_model").resolve())

    # the run loads from another directory, and after its folder is moved (its base, the merged SFT model, is inside it)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for moved in (False, True):
        where = Path(shutil.move(tmp_path / new, tmp_path / "moved")) if moved else tmp_path / new
        run = lmtune.load(where)
        assert run.task.objective == "dpo" and run.task.instruction == "Summarize."
        assert run.metrics["train"]["train_seconds"] > 0
        assert run.predict(["the food was great"])[0]["output"] is not None


def test_pairs_with_references_are_scored_against_them(tmp_path, tiny_llama, capsys):
    cfg = _pair_cfg(tmp_path, tiny_llama, "dpo")
    rows = [{**p, "references": ["the true summary", "another"]} for p in _pairs(3, 2)] + _pairs(1, 3)
    examples = get_task("generation").read_file(_write(tmp_path / "refs.jsonl", rows), build_config(cfg))
    assert [ex.references for ex in examples] == [["the true summary", "another"]] * 3 + [[rows[3]["chosen"]]]
    assert all(ex.label == r["chosen"] for ex, r in zip(examples, rows))  # still trained towards chosen
    rows[1]["references"] = "not a list"
    cfg["data"]["dev"] = _write(tmp_path / "bad_refs.jsonl", rows)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert f"{tmp_path / 'bad_refs.jsonl'}: line 2: 'references' must be a non-empty list" in capsys.readouterr().err


def test_the_new_run_keeps_the_sft_runs_json_layout_and_constraint(tmp_path, tiny_llama):
    from lmtune.prefer import _preference_task
    cfg = build_config(_pair_cfg(tmp_path, tiny_llama, "dpo"))
    sft_task = get_task("generation")
    schema = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}
    sft_task.set_state({"schema": schema, "json_layout": "compact", "stop": ["\n\n"]})
    task, train, dev = _preference_task(sft_task, cfg)
    assert task.json_layout == "compact" and task.schema == schema and task.stop == ["\n\n"]
    assert task.constraint is not None and task.constraint.json_layout == "compact"
    assert len(train) == 48 and len(dev) == 12 and task.objective == "dpo"


def test_prefer_refuses_an_unmergeable_sft_run_before_sampling(tmp_path, tiny_llama, capsys, monkeypatch):
    sft_dir = _sft(tmp_path, tiny_llama, method="prefix", num_virtual_tokens=4)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before finding the run cannot be merged")
    monkeypatch.setattr(lmtune.prefer, "make_pairs", no_sampling)
    assert main(["prefer", str(sft_dir), "--run_name", "dpo"]) == 2
    assert "peft.method prefix cannot be merged into the model's weights" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sft"]


def test_a_loaded_dpo_run_whose_adapter_cannot_be_switched_off_says_so(tmp_path, tiny_llama, capsys):
    from lmtune.peft import can_disable
    from lmtune.registry import peft_methods
    assert peft_methods.names(disables=True) == ("lora", "adalora", "ia3") and not can_disable("adapter")
    cfg = _pair_cfg(tmp_path, tiny_llama, "dpo", epochs=1)
    cfg["peft"] = {"method": "prefix", "num_virtual_tokens": 4}
    run = lmtune.train(cfg)
    assert main(["evaluate", str(run.run_dir), "--data", str(tmp_path / "dev.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "trained with peft.method prefix, whose adapter cannot be switched off" in err and "fully fine-tuned" not in err, err


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_objective_for_a_task_without_it_is_exit_2_with_its_line(tmp_path, capsys, objective):
    (tmp_path / "c.yaml").write_text(f"task: classification\nmodel:\n  name: x\ndata:\n  train: t.jsonl\n"
                                     f"train:\n  epochs: 1\n  objective: {objective}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c.yaml'}: line 8: train.objective {objective} is not a training objective of task classification" in err
    assert "is for task generation" in err
    assert not (tmp_path / "runs").exists()


def test_the_config_schema_has_the_preference_keys():
    from lmtune.config import json_schema
    train = json_schema()["properties"]["train"]["properties"]
    assert train["objective"]["enum"] == ["sft", "dpo", "orpo"] and train["objective"]["default"] == "sft"
    assert train["beta"]["default"] == 0.1 and train["beta"]["exclusiveMinimum"] == 0
    assert train["orpo_lambda"]["default"] == 0.1
    assert train["rpo_alpha"]["default"] == 1.0 and train["rpo_alpha"]["minimum"] == 0
    with pytest.raises(lmtune.errors.InputError, match="objective"):
        build_config({"task": "generation", "model": {"name": "x"}, "data": {"train": "a"}, "train": {"objective": "kto"}})


def test_a_preference_run_defaults_to_three_epochs_and_three_tenths_of_the_sft_learning_rate():
    from lmtune.tasks.generation import GenerationTask
    sft = build_config({"task": "generation"})
    assert sft.train.epochs == 1 and GenerationTask().default_lr(sft) is None  # SFT: LoRA's 1e-3
    for method, sft_lr in (("lora", 1e-3), ("ia3", 5e-3)):
        cfg = build_config({"task": "generation", "peft": {"method": method}, "train": {"objective": "dpo"}})
        assert cfg.train.epochs == 3
        assert GenerationTask().default_lr(cfg) == pytest.approx(0.3 * sft_lr)
    assert build_config({"task": "generation", "train": {"objective": "orpo", "epochs": 2}}).train.epochs == 2  # user's wins
    assert build_config({"task": "generation", "train": {"objective": "dpo"}}, {"train.epochs": 5}).train.epochs == 5
    # a pair is two sequences: its micro-batches hold half the batch (same optimizer batch, SFT's peak memory)
    assert sft.train.grad_accum == 1 and build_config({"task": "generation", "train": {"objective": "dpo"}}).train.grad_accum == 2
    assert build_config({"task": "generation", "train": {"objective": "dpo", "grad_accum": 4}}).train.grad_accum == 4
    assert build_config({"task": "generation", "train": {"objective": "dpo", "batch_size": 1}}).train.grad_accum == 1


def test_the_dpo_loss_adds_the_chosen_outputs_length_averaged_nll_weighted_by_rpo_alpha():
    """RPO: plain DPO (rpo_alpha 0) can fall while the chosen output's likelihood falls too; the NLL term
    is the chosen output's mean token NLL, per pair, and leaves the rewards alone."""
    import torch
    import torch.nn.functional as F
    from lmtune.tasks.preference import pair_losses
    logps = torch.tensor([-12.0, -30.0, -20.0, -25.0])  # chosen of pairs 0, 1, then their rejected
    counts = torch.tensor([4, 10, 5, 5])
    ref = torch.tensor([[-10.0, -18.0], [-28.0, -26.0]])
    plain, c0, r0 = pair_losses("dpo", logps, counts, ref, 0.1, 0.1, 0.0)
    expected = -F.logsigmoid(0.1 * ((logps[:2] - ref[:, 0]) - (logps[2:] - ref[:, 1])))
    assert torch.allclose(plain, expected)
    rpo, c1, r1 = pair_losses("dpo", logps, counts, ref, 0.1, 0.1, 0.5)
    assert torch.allclose(rpo - plain, 0.5 * torch.tensor([12.0 / 4, 30.0 / 10]))
    assert torch.equal(c0, c1) and torch.equal(r0, r1)
