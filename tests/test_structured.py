"""Structured output (lmtune.structured): decoding constrained by xgrammar to a JSON Schema, a regex or a
set of strings, on a tiny random Llama: every output meets the constraint while the same model's free
outputs do not; the run keeps its constraint and applies it in predict, evaluate, the decoding search and
`serve`; the report compares both ways; bad constraints are config errors."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema_rs
import pytest
import torch
import yaml

import lmtune
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import InputError
from lmtune.generate_control import ResponsePenalties
from lmtune.structured import Constraint, json_layout, logits_processor
from lmtune.tasks import get_task
from tests.conftest import toy_rows
from tests.test_decoders import save_tiny_decoder

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "words": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["label", "words"], "additionalProperties": False}
CHOICES = ["the food was great", "the service was awful", "no opinion"]
REGEX = r"[a-z]{2,6} (pos|neg) [0-9]{1,2}"
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 3, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The generation task (source -> target) on a tiny random Llama, and prompts of varied length (left
    padding in one batch)."""
    path = save_tiny_decoder(tmp_path_factory.mktemp("tiny-structured"), "llama", positions=256)
    task = get_task("generation")
    task.format, task.instruction = "source_target", ""
    model, tok = task.load_model(Path(path))
    return task, model, tok, task.from_texts([t for t, _ in toy_rows(10, 9)]), path


def _generate(tiny, constraint, settings=None, max_new_tokens=40) -> list[str]:
    task, model, tok, examples, _ = tiny
    out = task.generate(model, tok, examples, torch.device("cpu"), settings=settings, max_new_tokens=max_new_tokens,
                        progress="none", constraint=constraint)
    return [o["text"] for o in out]


def _schema_valid(text: str) -> bool:
    try:
        return jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text))
    except ValueError:
        return False


@pytest.mark.parametrize("settings", [None, SAMPLED], ids=["greedy", "sampled-penalised"])
def test_a_schema_makes_every_output_parse_and_validate(tiny, settings):
    """The random model's free outputs are not JSON at all; constrained, every row of the batch (greedy, or
    sampled with the repetition penalty and the n-gram block) parses and validates (jsonschema-rs)."""
    free = _generate(tiny, None, settings)
    assert not any(_schema_valid(t) for t in free), free
    constrained = _generate(tiny, Constraint.of(schema=SCHEMA), settings)
    assert all(_schema_valid(t) for t in constrained), constrained
    assert all(t == json.dumps(json.loads(t)) for t in constrained)  # json.dumps' layout: no stray whitespace


@pytest.mark.parametrize("settings", [None, SAMPLED], ids=["greedy", "sampled-penalised"])
def test_choices_and_regex_hold_for_every_output(tiny, settings):
    assert not all(t in CHOICES for t in _generate(tiny, None, settings))
    chosen = _generate(tiny, Constraint.of(choices=CHOICES), settings)
    assert all(t in CHOICES for t in chosen), chosen
    assert not any(re.fullmatch(REGEX, t) for t in _generate(tiny, None, settings))
    matched = _generate(tiny, Constraint.of(regex=REGEX), settings)
    assert all(re.fullmatch(REGEX, t) for t in matched), matched


def test_the_processor_masks_on_cpu_without_triton(tiny):
    """xgrammar's CPU path (no triton installed): only tokens that continue a choice survive, the columns
    past the tokenizer's vocabulary (a padded LM head) never do, and a completed choice allows only the
    end of text. A row another criterion ended (padded by generate) is left alone from then on."""
    assert importlib.util.find_spec("triton") is None
    _, _, tok, _, _ = tiny
    width = len(tok) + 8
    proc = logits_processor(tok, choices=["the food"])
    ids = tok("the food", add_special_tokens=False)["input_ids"]
    seq = torch.tensor([[5, 6], [5, 6]])
    scores = proc(seq, torch.zeros(2, width))
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert ids[0] in allowed and all("the food".startswith(tok.decode([t])) for t in allowed)
    assert not torch.isfinite(scores[:, len(tok):]).any()
    for k, t in enumerate(ids):
        other = tok.eos_token_id if k == 0 else 7  # row 1 gets a token the grammar refuses: it is released
        seq = torch.cat([seq, torch.tensor([[t], [other]])], 1)
        scores = proc(seq, torch.zeros(2, width))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [tok.eos_token_id]
    assert torch.isfinite(scores[1]).all()  # released: untouched
    assert logits_processor(tok, choices=["x"]) is not logits_processor(tok, choices=["x"])  # fresh per call


def test_the_ngram_block_never_empties_a_grammar_row():
    """JSON repeats its punctuation: where the block would ban every token a grammar left, it is skipped."""
    ids = torch.tensor([[1, 2, 3, 2, 3, 2]])  # prompt [1]; generated "2 3 2 3 2": "2 3" would be banned next
    scores = torch.full((1, 6), float("-inf"))
    scores[0, 3] = 1.0  # the grammar allows 3 alone
    out = ResponsePenalties(start=1, ngram=2)(ids, scores.clone())
    assert out[0, 3] == 1.0
    scores[0, 4] = 0.5  # with another allowed token the block applies
    assert ResponsePenalties(start=1, ngram=2)(ids, scores.clone())[0, 3] == float("-inf")


def test_json_layout_follows_the_training_targets():
    values = [{"a": 1, "b": [1, 2]}, {"a": 2, "b": []}]
    assert json_layout([json.dumps(v) for v in values]) == "spaced"
    assert json_layout([json.dumps(v, separators=(",", ":")) for v in values]) == "compact"
    assert json_layout([json.dumps(v, indent=2) for v in values]) == "indent2"
    assert json_layout(["{ \"a\" :1}", "not json"]) == "free"


# ---- config and errors ---------------------------------------------------------------------------
def test_at_most_one_constraint_and_bad_constraints_are_errors():
    base = {"task": "generation"}
    for a, b in (("schema", "choices"), ("regex", "label_set"), ("choices", "regex")):
        values = {"schema": "s.json", "choices": ["a"], "regex": "a+", "label_set": ["x"]}
        with pytest.raises(InputError, match=f"generate.{a} and generate.{b}"):
            build_config({**base, "generate": {a: values[a], b: values[b]}})
    with pytest.raises(InputError, match="drop generate.json_schema"):
        build_config({**base, "generate": {"schema": "s.json", "json_schema": "s.json"}})
    with pytest.raises(InputError, match="generate.choices: 'a' is listed twice"):
        build_config({**base, "generate": {"choices": ["a", "b", "a"]}})
    with pytest.raises(InputError, match="generate.choices: every entry must be a non-empty string"):
        build_config({**base, "generate": {"choices": ["a", " "]}})
    with pytest.raises(InputError, match="generate.regex: not a valid regular expression"):
        build_config({**base, "generate": {"regex": "[a-"}})
    cfg = build_config({**base, "generate": {"regex": r"\bword\b"}})  # Python reads it, xgrammar cannot: found when read
    with pytest.raises(InputError, match=r"generate.regex: xgrammar cannot enforce .*[Ww]ord boundary"):
        get_task("generation")._read_constraint(cfg)
    task = get_task("generation")
    task.configure(build_config({**base, "generate": {"choices": CHOICES}}))
    assert task.constraint == Constraint(choices=tuple(CHOICES))
    task.configure(build_config({**base, "generate": {"regex": REGEX}}))
    assert task.constraint == Constraint(regex=REGEX)
    with pytest.raises(InputError, match="exactly one of schema, regex, choices"):
        Constraint.of(schema=SCHEMA, regex="a")
    with pytest.raises(InputError, match="response_format: not a valid JSON Schema"):
        Constraint.of(schema={"type": 3}, where="response_format")


def _data(n: int, seed: int) -> list[dict]:
    return [{"text": t, "target": json.dumps({"label": label, "words": len(t.split())})} for t, label in toy_rows(n, seed)]


def _write_config(folder: Path, model: str, **generate) -> Path:
    """A YAML config in `folder` whose data and schema paths are relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 64, 1), ("dev", 16, 2), ("test", 12, 3)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _data(n, seed)), encoding="utf-8")
    cfg = {"task": "generation", "output_dir": str(folder / "runs"), "run_name": "structured", "model": {"name": model},
           "data": {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl", "label_column": "target", "max_length": 128},
           "generate": {"instruction": "", "max_new_tokens": 36, "search_trials": 1, "search_examples": 4, "eval_examples": 6, **generate},
           "peft": {"method": "none"}, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "progress": "none", "seed": 1}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize("content, message", [
    ('{"type": "object",\n  "properties": {"a": }}', r"schema\.json: line 2: not valid JSON"),
    ('{"type": "strange"}', r"schema\.json: not a valid JSON Schema"),
    ('[1, 2]', r"schema\.json: a JSON Schema is an object"),
])
def test_a_bad_schema_file_is_an_input_error_before_training(tmp_path, tiny, capsys, monkeypatch, content, message):
    folder = tmp_path / "project"
    config = _write_config(folder, tiny[4], schema="schema.json")
    (folder / "schema.json").write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the schema path resolves against the config's folder, not here
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: \S*" + message, err), err
    assert not (folder / "runs").exists()  # nothing written
    (folder / "schema.json").unlink()
    assert main(["train", str(config)]) == 2
    assert "schema.json: cannot read the JSON Schema file of generate.schema" in capsys.readouterr().err


# ---- a run: every path constrained, the report both ways ----------------------------------------------
def test_a_schema_run_is_constrained_everywhere_and_reports_both_ways(tmp_path, tiny, monkeypatch):
    folder = tmp_path / "project"
    config = _write_config(folder, tiny[4], schema="schema.json")
    (folder / "schema.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config)]) == 0
    run_dir = folder / "runs" / "structured"
    results = json.loads((run_dir / "results.json").read_text())
    s = results["metrics"]["test"]["structured"]
    assert s["constraint"] == "schema" and s["n"] == 6
    assert s["valid_constrained"] == 1.0 and s["valid_unconstrained"] < 1.0, s
    assert {"rougeL_constrained", "rougeL_unconstrained", "exact_match_constrained", "exact_match_unconstrained"} <= set(s)
    assert results["metrics"]["test"]["valid"] == 1.0
    search = json.loads((run_dir / "generation.json").read_text())["search"]
    assert len(search["trials"]) == 2 and all(t["valid"] == 1.0 for t in search["trials"])  # the search decodes constrained
    report = (run_dir / "report.md").read_text()
    assert "Structured output, JSON Schema (generate.schema)" in report and "| test | unconstrained |" in report

    (folder / "schema.json").unlink()  # the run keeps the schema itself
    run = lmtune.load(run_dir)
    assert run.task.schema == SCHEMA and run.task.json_layout == "spaced"
    outputs = [p["output"] for p in run.predict(["the food was great", "awful service, very awful"])]
    assert all(_schema_valid(o) for o in outputs), outputs
    few = folder / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in _data(4, 5)), encoding="utf-8")
    metrics = run.evaluate(few)
    assert metrics["valid"] == 1.0 and metrics["structured"]["valid_constrained"] == 1.0

    from fastapi.testclient import TestClient

    from lmtune.serve.app import ServeSettings, create_app
    monkeypatch.setenv("LMTUNE_API_KEYS", "k-structured-long-enough")
    app = create_app(ServeSettings(run_dir=str(run_dir), backend="torch", max_new_tokens=36))
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"text": "the service was awful", "stream": False},
                        headers={"Authorization": "Bearer k-structured-long-enough"})
    assert r.status_code == 200 and _schema_valid(r.json()["output"]), r.text

    from lmtune.ui.app import UiSettings, create_ui  # the dashboard's Try it
    ui = TestClient(create_ui(UiSettings(runs_dir=str(folder / "runs"), workdir=str(folder))), base_url="http://127.0.0.1:7860")
    r = ui.post("/api/run/structured/predict", json={"text": "very good food"}, headers={"X-Lmtune-UI": "1"})
    assert r.status_code == 200 and _schema_valid(r.json()["output"]), r.text
