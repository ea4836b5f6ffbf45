"""Readers, splits and every bad-input error: message names file + line + fix, exit 2, nothing written."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lmtune.cli import main
from lmtune.data import read_examples, stratified_split
from lmtune.errors import InputError
from tests.conftest import toy_rows, write_csv


def test_csv_tsv_jsonl_read_with_custom_columns(tmp_path):
    write_csv(tmp_path / "a.csv", [("hello, world", "x", "p1"), ("bye", "y", "p2")], header=("sent", "tag", "other"))
    write_csv(tmp_path / "a.tsv", [("hello", "x", "q")], header=("sent", "tag", "other"), delimiter="\t")
    (tmp_path / "a.jsonl").write_text('{"sent": "hi", "tag": 3}\n\n{"sent": "yo", "tag": 4}\n')
    csv_ex = read_examples(tmp_path / "a.csv", "sent", "tag", "other")
    assert [(e.text, e.text_pair, e.label) for e in csv_ex] == [("hello, world", "p1", "x"), ("bye", "p2", "y")]
    assert csv_ex[1].source.endswith("a.csv:3")
    assert read_examples(tmp_path / "a.tsv", "sent", "tag")[0].text == "hello"
    js = read_examples(tmp_path / "a.jsonl", "sent", "tag")
    assert [e.label for e in js] == ["3", "4"] and js[1].source.endswith("a.jsonl:3")


def test_multiline_csv_field_keeps_line_numbers(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('text,label\n"two\nlines",a\n,b\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.csv: line 4: empty value in column 'text'"):
        read_examples(p)


def test_split_is_stratified_and_reproducible():
    labels = ["a"] * 70 + ["b"] * 20 + ["c"] * 10
    tr, dv, te = stratified_split(labels, [0.7, 0.18, 0.12], seed=3)
    assert sorted(tr + dv + te) == list(range(100))
    assert Counter(labels[i] for i in dv) == {"a": 13, "b": 4, "c": 2}
    assert Counter(labels[i] for i in te) == {"a": 8, "b": 2, "c": 1}
    assert stratified_split(labels, [0.7, 0.18, 0.12], seed=3) == (tr, dv, te)
    assert stratified_split(labels, [0.7, 0.18, 0.12], seed=4) != (tr, dv, te)


def test_rare_class_stays_in_train():
    tr, _dv, _te = stratified_split(["a"] * 20 + ["b"], [0.7, 0.18, 0.12], seed=0)
    assert 20 in tr


def _config(tmp_path: Path, data: dict) -> Path:
    cfg = {"output_dir": str(tmp_path / "runs"), "data": data, "train": {"progress": "none"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BAD_INPUTS = {
    "missing file": (lambda d: {"train": str(d / "nope.csv")}, [r"nope\.csv: file not found"]),
    "missing column": (lambda d: {"train": str(write_csv(d / "t.csv", toy_rows(10), header=("sentence", "label")))},
                       [r"t\.csv: line 2: no column 'text'", "'sentence'", "data.text_column"]),
    "empty text": (lambda d: {"train": str(write_csv(d / "t.csv", toy_rows(4) + [("  ", "pos")] + toy_rows(4)))},
                   [r"t\.csv: line 6: empty value in column 'text'"]),
    "undecodable bytes": (lambda d: {"train": str(_bad_bytes(d / "t.csv"))}, [r"t\.csv: line 3: byte 0xff is not valid utf-8", "data.encoding"]),
    "unseen dev label": (lambda d: {"train": str(write_csv(d / "t.csv", toy_rows(20))),
                                    "dev": str(write_csv(d / "d.csv", toy_rows(3) + [("new words", "neutral")]))},
                         [r"d\.csv:5: label 'neutral' never appears in the training data", "neg, pos"]),
    "unseen test label": (lambda d: {"train": str(write_csv(d / "t.csv", toy_rows(20))),
                                     "dev": str(write_csv(d / "d.csv", toy_rows(3))),
                                     "test": str(write_csv(d / "e.csv", [("x y", "other")]))},
                          [r"e\.csv:2: label 'other'"]),
    "one class": (lambda d: {"train": str(write_csv(d / "t.csv", [(t, "pos") for t, _ in toy_rows(10)]))},
                  [r"t\.csv: only one class \('pos'\)", "at least 2"]),
    "bad jsonl": (lambda d: {"train": str(_write(d / "t.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n'))},
                  [r"t\.jsonl: line 2: not valid JSON"]),
    "ragged csv": (lambda d: {"train": str(_write(d / "t.csv", "text,label\na,b\nc,d,e\n"))},
                   [r"t\.csv: line 3: 3 fields but the header has 2"]),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _bad_bytes(path: Path) -> Path:
    path.write_bytes(b"text,label\ngood day,pos\nbad \xff day,neg\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    make, patterns = BAD_INPUTS[case]
    cfg = _config(tmp_path, make(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    for pat in patterns:
        assert re.search(pat, err), (pat, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir, no files
    assert not (tmp_path / "runs").exists()


def test_config_unknown_key_suggests(tmp_path, capsys):
    cfg = _config(tmp_path, {"train": "x.csv"})
    assert main(["train", str(cfg), "--train.learning_rate", "1e-4"]) == 2
    assert "unknown key 'train.learning_rate'" in capsys.readouterr().err
    assert main(["train", str(cfg), "--train.lrr", "1e-4"]) == 2
    assert "Did you mean 'train.lr'" in capsys.readouterr().err
    raw = yaml.safe_load(cfg.read_text())
    raw["trian"] = {"lr": 1}
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 2
    assert "unknown key 'trian'" in capsys.readouterr().err


def test_config_types_overrides_and_relative_paths(tmp_path):
    from lmtune.config import build_config, load_config
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"train": "t.csv"}, "train": {"lr": 1}}))
    cfg = load_config(p, {"epochs": 2, "train.schedule": "cosine"})
    assert cfg.data.train == str(tmp_path / "sub" / "t.csv")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2 and cfg.train.schedule == "cosine"
    with pytest.raises(InputError, match="train.epochs must be int"):
        build_config({"train": {"epochs": "many"}})
    with pytest.raises(InputError, match="not one of linear, cosine, constant"):
        build_config({"train": {"schedule": "step"}})
    with pytest.raises(InputError, match="must be at least train.grad_accum"):
        build_config({"train": {"batch_size": 2, "grad_accum": 3}})


def test_config_yaml_error_names_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: [unclosed\n")
    assert main(["train", str(p)]) == 2
    assert f"{p}: line" in capsys.readouterr().err


def test_split_only_train_records_rows_and_test_without_dev_splits_dev_off_train(tmp_path):
    from lmtune.config import build_config
    from lmtune.tasks import get_task
    task = get_task("classification")
    train = str(write_csv(tmp_path / "t.csv", toy_rows(100)))
    s = task.read(build_config({"data": {"train": train}}))
    assert s.info["sizes"] == {"train": 70, "dev": 18, "test": 12}
    assert len(set(s.info["train_rows"]) | set(s.info["dev_rows"]) | set(s.info["test_rows"])) == 100
    assert s.labels == ["neg", "pos"]
    s2 = task.read(build_config({"data": {"train": train, "test": str(write_csv(tmp_path / "e.csv", toy_rows(10, 9)))}}))
    assert s2.info["sizes"] == {"train": 80, "dev": 20, "test": 10}
    assert not set(s2.info["dev_rows"]) & {ex.source for ex in s2.train}


def test_audit_finds_planted_problems_and_stays_quiet_on_clean_data(tmp_path, capsys):
    clean = toy_rows(100, 1)
    cfg = _config(tmp_path, {"train": str(write_csv(tmp_path / "clean.csv", clean)),
                             "dev": str(write_csv(tmp_path / "cdev.csv", toy_rows(30, 77)))})
    # toy_rows draws from a small vocabulary: keep only dev rows that are not train texts
    train_texts = {t for t, _ in clean}
    write_csv(tmp_path / "cdev.csv", [r for r in toy_rows(60, 77) if r[0] not in train_texts][:20])
    assert main(["audit", str(cfg), "--strict"]) == 0
    found = {f["check"] for f in json.loads(capsys.readouterr().out)}
    assert not found & {"duplicates", "conflicting_labels", "leakage_dev", "imbalance"}, found

    dirty = clean + [clean[0], (clean[1][0], "neg" if clean[1][1] == "pos" else "pos")] + [("pos text " + str(i), "pos") for i in range(300)]
    cfg = _config(tmp_path, {"train": str(write_csv(tmp_path / "dirty.csv", dirty)),
                             "dev": str(write_csv(tmp_path / "ddev.csv", clean[:10]))})
    assert main(["audit", str(cfg), "--strict"]) == 1
    found = {f["check"]: f for f in json.loads(capsys.readouterr().out)}
    assert {"duplicates", "conflicting_labels", "leakage_dev", "imbalance"} <= set(found)
    assert found["leakage_dev"]["severity"] == "critical" and found["conflicting_labels"]["examples"]


def test_ner_audit_finds_conflicting_tags_rare_types_duplicates_and_leakage():
    from lmtune.audit import audit
    from lmtune.data.ner_readers import NerExample
    from lmtune.tasks.base import Splits

    def ex(i, text, tags):
        return NerExample(text.split(), tags.split(), f"f.conll:{i}")
    clean = [ex(i, f"{name} visited {city} on day {i}", "B-PER O B-LOC O O O")
             for i, (name, city) in enumerate((n, c) for n in ("anna", "omar", "li") for c in ("paris", "rome", "oslo", "kyiv"))]
    dev = [ex(200 + i, f"bob saw {c} at {i}", "B-PER O B-LOC O O") for i, c in enumerate(("lima", "baku"))]
    quiet = {f["check"] for f in audit(Splits(clean, dev, [], ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))}
    assert not quiet & {"conflicting_labels", "duplicates", "leakage_dev", "imbalance"}, quiet

    dirty = clean + [clean[0], ex(300, "anna visited paris on day 0", "B-LOC O B-LOC O O O"),
                     ex(301, "acme hired anna", "B-ORG O B-PER")]
    found = {f["check"]: f for f in audit(Splits(dirty, dev + [clean[1]], [], ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]))}
    assert {"conflicting_labels", "duplicates", "leakage_dev", "rare_labels", "imbalance"} <= set(found), set(found)
    assert "f.conll:300=B-LOC O B-LOC O O O" in found["conflicting_labels"]["examples"]
    assert "ORG (1)" in found["rare_labels"]["detail"] and "training entities" in found["imbalance"]["detail"]
