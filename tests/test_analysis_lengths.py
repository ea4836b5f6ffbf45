"""lmtune lengths: input lengths in tokens per split against data.max_length (an analysis added as one
module and one registration line)."""
from __future__ import annotations

import json

import numpy as np

import lmtune
from lmtune.cli import main
from tests.conftest import toy_rows, write_csv


def test_lengths_counts_tokens_per_split_and_what_max_length_cuts(tmp_path, tiny_model, capsys):
    long_rows = [(t + " and then" * (i % 4), lab) for i, (t, lab) in enumerate(toy_rows(48, 1))]
    data = {"train": str(write_csv(tmp_path / "train.csv", long_rows)), "dev": str(write_csv(tmp_path / "dev.csv", toy_rows(16, 2))),
            "test": str(write_csv(tmp_path / "test.csv", toy_rows(16, 3))), "max_length": 12}
    run = lmtune.train({"output_dir": str(tmp_path / "runs"), "run_name": "t", "data": data, "model": {"name": tiny_model},
                        "train": {"max_steps": 2, "batch_size": 8, "progress": "none", "seed": 1}})
    assert main(["lengths", str(run.run_dir)]) == 0
    assert capsys.readouterr().out.startswith("## Input lengths")
    result = json.loads((run.run_dir / "lengths.json").read_text())
    for split, rows in (("train", long_rows), ("dev", toy_rows(16, 2))):
        want = np.array([len(run.tokenizer(text)["input_ids"]) for text, _ in rows])  # with [CLS] and [SEP]
        got = result["splits"][split]
        assert got["n"] == len(rows) and got["max"] == want.max() and got["median"] == int(np.median(want))
        assert got["over_max_length"] == int((want > 12).sum())
    assert result["splits"]["train"]["over_max_length"] > 0 and result["max_length"] == 12
    report = (run.run_dir / "report.md").read_text()
    assert "## Input lengths" in report and "| train | 48 |" in report and "Over max_length: train" in report
    new = write_csv(tmp_path / "new.csv", [("short text", "pos")])
    assert run.analyse("lengths", data=str(new))["splits"] == {
        str(new): {"n": 1, "mean": 4.0, "median": 4, "p90": 4, "p99": 4, "max": 4, "over_max_length": 0, "over_share": 0.0}}
