"""The run-analysis seam (lmtune.analysis): an analysis registered from outside lmtune, here in this file,
gets its command, its Run.analyse entry, its RUN_DIR/NAME.json and its report.md section, with no
lmtune file touched."""
from __future__ import annotations

import json

import pytest

import lmtune
from lmtune.analysis import Analysis, Param, examples_of
from lmtune.cli import main
from lmtune.registry import analyses

NAME = "lowconf"


def low_confidence(run, split: str = "dev", threshold: float = 0.5, data: str | None = None) -> dict:
    """How many of a split's (or a file's) predictions score under a threshold."""
    if not 0 < threshold < 1:
        raise lmtune.InputError(f"{NAME}: --threshold must be in (0, 1), got {threshold}.")
    rows = run.predict_examples(examples_of(run, data, split, require_label=False))
    return {"data": data or split, "threshold": threshold, "n": len(rows),
            "below": sum(r["score"] < threshold for r in rows)}


def section(r: dict) -> str:
    return f"## Low-confidence predictions\n\n{r['below']} of {r['n']} predictions on {r['data']} score under {r['threshold']}.\n"


LOW_CONFIDENCE = Analysis(
    section, low_confidence, help="predictions that score under a threshold",
    params=(Param("split", default="dev", choices=("dev", "test")),
            Param("threshold", float, 0.5, "the score under which a prediction counts"),
            Param("data", help="a file with the run's columns instead of a split"),
            Param("json", bool, help="print the result as JSON", command_only=True)))


@pytest.fixture
def registered():
    analyses.register(NAME, f"{__name__}:LOW_CONFIDENCE")
    yield
    analyses.unregister(NAME)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from tests.conftest import toy_rows, write_csv
    d = tmp_path_factory.mktemp("seam")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, seed))) for k, n, seed in (("train", 48, 1), ("dev", 24, 2), ("test", 24, 3))}
    return lmtune.train({"output_dir": str(d / "runs"), "run_name": "t", "data": {**data, "max_length": 32},
                         "model": {"name": tiny_model},
                         "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}})


def _below(run, path: str, threshold: float) -> int:
    return sum(r["score"] < threshold for r in run.predict_file(path))


def test_a_registered_analysis_runs_from_the_command_line(run, registered, capsys):
    dev = run.config.data.dev
    assert main([NAME, str(run.run_dir), "--threshold", "0.7"]) == 0
    out, err = capsys.readouterr()
    written = json.loads((run.run_dir / f"{NAME}.json").read_text())
    assert written == {"data": "dev", "threshold": 0.7, "n": 24, "below": _below(run, dev, 0.7)}
    assert out.startswith("## Low-confidence predictions") and f"wrote {run.run_dir / (NAME + '.json')}" in err
    report = (run.run_dir / "report.md").read_text()
    assert report.count("## Low-confidence predictions") == 1 and section(written).strip() in report
    assert json.loads((run.run_dir / "results.json").read_text())[NAME] == written
    assert main([NAME, str(run.run_dir), "--split", "test", "--threshold", "0.6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["below"] == _below(run, run.config.data.test, 0.6)


def test_run_analyse_replaces_the_section_and_bad_input_writes_nothing(run, registered, capsys):
    result = run.analyse(NAME, threshold=0.55)
    assert result["below"] == _below(run, run.config.data.dev, 0.55)
    report = (run.run_dir / "report.md").read_text()
    assert report.count("## Low-confidence predictions") == 1 and "score under 0.55." in report
    before = (run.run_dir / f"{NAME}.json").read_text()
    assert main([NAME, str(run.run_dir), "--threshold", "1.5"]) == 2
    assert "--threshold must be in (0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([NAME, str(run.run_dir), "--threshold", "high"])  # the declared type is checked by the parser
    assert e.value.code == 2
    assert (run.run_dir / f"{NAME}.json").read_text() == before


def test_commands_come_from_the_registry_when_the_parser_is_built(registered, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert NAME in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([NAME, "--help"])
    out = capsys.readouterr().out
    assert "--threshold" in out and "--split {dev,test}" in out and "--json" in out
    analyses.unregister(NAME)
    with pytest.raises(SystemExit) as e:
        main([NAME, "RUN"])
    assert e.value.code == 2  # gone with its registration


def test_sections_written_by_training_and_unknown_names_cannot_be_run(run):
    with pytest.raises(lmtune.InputError, match="written by training"):
        run.analyse("continual")
    with pytest.raises(lmtune.InputError, match="unknown analysis 'drfit'.*Did you mean 'drift'"):
        run.analyse("drfit")
    assert {"drift", "fairness", "explain", "robustness", "continual"} <= set(analyses.names())
    assert analyses.get("robustness").command == "attack"  # the built-in commands keep their names
