"""Readers, splits and every bad-input error: message names file + line + fix, exit 2, nothing written."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def _tsv_txt(path: Path, rows: list[tuple[str, str]], end: str = "\n") -> Path:
    """A public data set's shape: tab-separated, named .txt, texts full of commas, no quoting."""
    path.write_bytes(end.join(["sentence\tlabel"] + [f"{t}, and, more\t{lab}" for t, lab in rows]).encode() + end.encode())
    return path


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_tab_separated_txt_files_train_and_init(end, tmp_path, tiny_model, capsys):
    """issue 46 #11: a TSV named .txt (one with CRLF line ends) was read as CSV and refused."""
    files = {k: str(_tsv_txt(tmp_path / f"{k}.txt", toy_rows(n, seed), end)) for k, n, seed in (("train", 48, 1), ("dev", 16, 2))}
    assert main(["init", files["train"], "--output", str(tmp_path / "init.yaml")]) == 0
    written = yaml.safe_load((tmp_path / "init.yaml").read_text())
    assert written["data"]["text_column"] == "sentence" and written["task"] == "classification"
    assert "neg (24)" in (tmp_path / "init.yaml").read_text()  # labels read whole: 'neg', not 'neg\r'
    cfg = {"output_dir": str(tmp_path / "runs"), "run_name": "tsv", "model": {"name": tiny_model},
           "data": {**files, "text_column": "sentence", "max_length": 32},
           "train": {"epochs": 1, "batch_size": 16, "progress": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().err
    splits = json.loads((tmp_path / "runs" / "tsv" / "splits.json").read_text())
    assert splits["sizes"]["train"] == 48 and splits["sizes"]["dev"] == 16


def test_delimiter_is_detected_from_the_first_lines_and_a_wrong_width_names_it(tmp_path):
    from lmtune.data.readers import read_rows
    (tmp_path / "semi.dat").write_bytes('\ufefftext;label\r\n"a; quoted, text";x\r\nplain;y\r\n'.encode())
    assert [r for _, r in read_rows(tmp_path / "semi.dat")] == [{"text": "a; quoted, text", "label": "x"},
                                                              {"text": "plain", "label": "y"}]
    (tmp_path / "a.jsonl.txt").write_text('{"text": "a, b", "label": 1}\n')
    assert read_rows(tmp_path / "a.jsonl.txt") == [(1, {"text": "a, b", "label": 1})]
    (tmp_path / "one.txt").write_text("text\nno delimiter here\n")
    assert read_rows(tmp_path / "one.txt") == [(2, {"text": "no delimiter here"})]
    # a TSV named .csv: read as the extension says, and the error says how it read it and what to set
    _tsv_txt(tmp_path / "t.csv", toy_rows(3))
    with pytest.raises(InputError, match=r"t\.csv: line 2: 3 fields but the header has 1 \(read as comma-separated; "
                                         r"set data.format: tsv if the file is tab-separated"):
        read_rows(tmp_path / "t.csv")
    assert len(read_rows(tmp_path / "t.csv", "tsv")) == 3
    # a genuinely broken TSV .txt: detected as tab-separated, and says so
    (tmp_path / "b.txt").write_text("text\tlabel\nfine, yes\tpos\nok\tneg\nbroken\textra\tneg\n")
    with pytest.raises(InputError, match=r"b\.txt: line 4: 3 fields but the header has 2 \(read as tab-separated; "
                                         r"set data.format: csv if the file is comma-separated"):
        read_rows(tmp_path / "b.txt")


@pytest.mark.parametrize("key,value", [("train.lr", ".inf"), ("train.lr", "-.inf"), ("train.weight_decay", ".inf"),
                                       ("train.max_grad_norm", ".nan"), ("abstain.max_interval_width", ".inf"),
                                       ("data.split", "[.nan, 0.5, 0.5]")])
def test_non_finite_numbers_in_a_config_are_refused(key, value, tmp_path, capsys):
    """issue 46 #10: train.lr: inf was accepted (NaN was refused by the range check)."""
    section, leaf = key.split(".")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\ndata:\n  train: x.csv\n{section}:\n  {leaf}: {value}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"error: {re.escape(str(cfg))}: (line \d+: )?{re.escape(key)} must be (a finite number|finite numbers only), got ", err), err
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\ndata:\n  train: x.csv\n")
    assert main(["train", str(cfg), f"--{key}", value]) == 2  # the command line too
    assert f"command line: {key} must be" in capsys.readouterr().err
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
    p.write_text(yaml.safe_dump({"data": {"train": "t.csv"}, "train": {"lr": 1}, "retrieval": {"corpus": "docs.csv"},
                                 "pretrain": {"files": ["a.txt", "/abs/b.txt"]}, "generate": {"schema": "s.json"}}))
    cfg = load_config(p, {"epochs": 2, "train.schedule": "cosine"})
    assert cfg.data.train == str(tmp_path / "sub" / "t.csv")
    # every path-valued key a section declares (option(..., path=True)), a task's own sections included,
    # resolves against the YAML's folder, not the current directory
    assert cfg.retrieval.corpus == str(tmp_path / "sub" / "docs.csv") and cfg.generate.schema == str(tmp_path / "sub" / "s.json")
    assert cfg.pretrain.files == [str(tmp_path / "sub" / "a.txt"), "/abs/b.txt"]
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


# ---- every task format's reader, on arbitrary file contents (hypothesis) --------------------------
# The property: a reader either parses the file or raises InputError with a message that starts with
# the file's path (and names the line where one row is at fault); never another exception.

_KEYS = ["text", "label", "text_pair", "labels", "question", "context", "answers", "answer_start", "id", "tokens", "tags",
         "entities", "start", "end", "head", "tail", "instruction", "input", "output", "messages", "role", "content",
         "data", "paragraphs", "qas", "title", "is_impossible", "negative"]
_ATOMS = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats()
          | st.sampled_from(["", " ", "0", "1", "12", "pos", "B-PER", "O", "user", "assistant", "<e1>a</e1> <e2>b</e2>", "a,b"])
          | st.text(max_size=10))
_JSON = st.recursive(_ATOMS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5),
                     max_leaves=15)
_FIELD = st.lists(st.sampled_from(list("ab Zé,\t;|\"'\r\n{}[]:<>/-0 1") + ["\ufeff", "\x00", "\u2028", "\u200b", "e1", "B-X"]),
                  max_size=12).map("".join)

# format: (task, file extension, data config, the columns / keys its rows are made of, or a list of such shapes)
READER_FORMATS = {
    "classification csv": ("classification", ".csv", {}, ["text", "label"]),
    "classification tsv": ("classification", ".tsv", {}, ["text", "label"]),
    "classification txt": ("classification", ".txt", {}, ["text", "label"]),
    "classification unknown ext": ("classification", ".dat", {}, ["text", "label"]),
    "classification jsonl": ("classification", ".jsonl", {}, ["text", "label"]),
    "pairs csv": ("classification", ".csv", {"text_pair_column": "text_pair"}, ["text", "text_pair", "label"]),
    "pairs jsonl": ("classification", ".jsonl", {"text_pair_column": "text_pair"}, ["text", "text_pair", "label"]),
    "regression csv": ("regression", ".csv", {}, ["text", "label"]),
    "regression jsonl": ("regression", ".jsonl", {}, ["text", "label"]),
    "multilabel csv": ("multilabel", ".csv", {}, ["text", "label"]),
    "multilabel jsonl": ("multilabel", ".jsonl", {}, ["text", "label"]),
    "ner conll": ("ner", ".conll", {}, []),
    "ner jsonl": ("ner", ".jsonl", {}, [["tokens", "tags"], ["text", "entities"]]),
    "qa squad json": ("qa", ".json", {}, []),
    "qa jsonl": ("qa", ".jsonl", {}, ["question", "context", "answers", "id"]),
    "qa csv": ("qa", ".csv", {}, ["question", "context", "answers"]),
    "relation jsonl": ("relation", ".jsonl", {}, [["text", "head", "tail", "label"], ["text", "label"]]),
    "relation csv": ("relation", ".csv", {}, ["text", "label"]),
    "generation jsonl": ("generation", ".jsonl", {}, [["instruction", "input", "output"], ["messages"], ["text", "label"]]),
    "retrieval csv": ("retrieval", ".csv", {}, ["text", "label"]),
    "retrieval jsonl": ("retrieval", ".jsonl", {}, ["text", "label"]),
}


@st.composite
def _table(draw, columns: list) -> str:
    """A delimited table with the format's header (sometimes another delimiter, quotes, ragged rows, CRLF)."""
    columns = _shapes(columns)[0]
    delim = draw(st.sampled_from([",", "\t", ";", "|"]))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    header = delim.join(draw(st.permutations(columns))) if columns and draw(st.booleans()) else draw(_FIELD)
    rows = draw(st.lists(st.lists(_FIELD, min_size=1, max_size=len(columns) + 1), max_size=6))
    return header + end + end.join(delim.join(r) for r in rows) + draw(st.sampled_from(["", end]))


_WORDS = st.lists(st.sampled_from(["EU", "rejects", "German", "call", "中", "国", "lamb", " "]), min_size=1, max_size=5)
_NUMBER = st.integers(-2, 30) | st.floats() | st.sampled_from(["12", "1.5", True])
_ANSWER = st.sampled_from(["EU", "German", "rejects", "lamb", "中国", ""]) | _ATOMS
# per key, values of about the right shape (so rows get past the first checks), else anything
_PLAUSIBLE = {
    "text": _WORDS.map(" ".join) | st.just("<e1>EU</e1> rejects <e2>call</e2>"),
    "label": st.sampled_from(["pos", "neg", "1.5", "a,b", "Cause-Effect(e1,e2)"]) | _NUMBER | st.lists(_ATOMS, max_size=3),
    "tokens": _WORDS | st.lists(_ATOMS, max_size=2), "tags": st.lists(st.sampled_from(["O", "B-PER", "I-PER", "E-LOC", "S-X", "B-"]), max_size=5),
    "entities": st.lists(st.fixed_dictionaries({"start": _NUMBER, "end": _NUMBER, "label": _ATOMS}) | _JSON, max_size=3),
    "question": st.sampled_from(["who?", "何", " "]), "context": st.sampled_from(["EU rejects German call", "中国 EU", " "]),
    "answers": st.fixed_dictionaries({"text": st.lists(_ANSWER, max_size=3), "answer_start": st.lists(_NUMBER, max_size=3)})
    | st.lists(st.fixed_dictionaries({"text": _ANSWER, "answer_start": _NUMBER}), max_size=3),
    "instruction": st.sampled_from(["Summarize.", "Translate:", " "]), "input": st.sampled_from(["EU", "", " "]),
    "output": st.sampled_from(["ok", "", "中"]),
    "head": _WORDS.map(" ".join) | st.lists(_NUMBER, min_size=2, max_size=2), "tail": _WORDS.map(" ".join),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                "content": _ATOMS}) | _JSON, max_size=3),
}


def _shapes(keys: list) -> list[list[str]]:
    return keys if keys and isinstance(keys[0], list) else [keys or _KEYS]


@st.composite
def _jsonl(draw, keys: list) -> str:
    """JSON lines: mostly rows of one of the format's shapes (each key usually present, with a value of about
    the right type), some anything."""
    def value(k: str):
        good = _PLAUSIBLE.get(k, _ATOMS)
        return st.one_of(good, good, good, _JSON)
    row = st.one_of(*[st.fixed_dictionaries({k: value(k) for k in shape}) for shape in _shapes(keys)],
                    *[st.fixed_dictionaries({}, optional={k: value(k) for k in shape}) for shape in _shapes(keys)])
    rows = draw(st.lists(row, min_size=1, max_size=4))
    odd = draw(st.sampled_from([[]] * 4 + [[draw(_FIELD)], [json.dumps(draw(_JSON))]]))  # not JSON, not an object
    lines = [json.dumps(r) for r in rows] + odd  # (json.dumps writes NaN / Infinity, which the readers meet too)
    return "\n".join(draw(st.permutations(lines)))


@st.composite
def _squad(draw) -> str:
    qa = st.fixed_dictionaries({"id": _ATOMS, "question": _PLAUSIBLE["question"] | _ATOMS,
                                "answers": _PLAUSIBLE["answers"] | _JSON}) | _JSON
    para = st.fixed_dictionaries({"context": _PLAUSIBLE["context"] | _ATOMS, "qas": st.lists(qa, max_size=3) | _JSON}) | _JSON
    doc = st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({"paragraphs": st.lists(para, max_size=2) | _JSON})
                                                  | _JSON, max_size=2) | _JSON}) | _JSON
    return json.dumps(draw(doc))


@st.composite
def _conll(draw) -> str:
    token = st.sampled_from(["EU", "rejects", "-DOCSTART-", "中", "a\u00a0b", "x"]) | _FIELD.filter(lambda s: "\n" not in s)
    tag = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "E-LOC", "S-X", "I-", "-", "B-"])
    line = st.tuples(token, st.lists(tag, max_size=3)).map(lambda t: " ".join([t[0], *t[1]])) | st.just("")
    return "\n".join(draw(st.lists(line, max_size=12)))


def _contents(fmt: str):
    task, ext, _, keys = READER_FORMATS[fmt]
    text = (_squad() if ext == ".json" else _conll() if ext == ".conll" else _jsonl(keys) if ext == ".jsonl"
            else _table(keys) | _jsonl(keys))
    encoded = st.tuples(text, st.sampled_from(["utf-8"] * 12 + ["utf-8-sig", "latin-1", "utf-16"])).map(
        lambda te: te[0].encode(te[1], errors="replace"))
    return st.one_of(*[encoded] * 6, st.binary(max_size=200))


@pytest.mark.parametrize("fmt", sorted(READER_FORMATS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_reader_parses_or_names_the_file_and_line(fmt, data, tmp_path):
    from lmtune.config import build_config
    from lmtune.tasks import get_task
    task_name, ext, data_cfg, _ = READER_FORMATS[fmt]
    path = tmp_path / f"f{ext}"
    path.write_bytes(data.draw(_contents(fmt), label="file bytes"))
    cfg = build_config({"task": task_name, "data": data_cfg})
    for require_label in (True, False):
        try:
            get_task(task_name).read_file(str(path), cfg, None, require_label)
        except InputError as e:
            assert str(e).startswith(f"{path}:"), str(e)
            line = re.search(r": line (\d+)\b", str(e))
            if line:  # the line it names is in the file
                assert 1 <= int(line.group(1)) <= len(re.findall(rb"\r\n|\r|\n", path.read_bytes())) + 1, str(e)


# files that crashed a reader with another exception (found by the property test above and by hand)
HOSTILE_FILES = [
    ("ner", "e.jsonl", '{"text": "EU rejects", "entities": 5}\n', r"line 1: 'entities' must be a list"),
    ("ner", "e.jsonl", '{"text": "EU rejects", "entities": [{"start": Infinity, "end": 2, "label": "ORG"}]}\n',
     r"line 1: entity 1 needs integer 'start'"),
    ("ner", "e.jsonl", '{"tokens": ["EU", "rejects"], "tags": [5, null]}\n',
     r"line 1: 'tags' must be a list as long as 'tokens' \(2\), of tag names"),
    ("generation", "g.jsonl", '{"instruction": "Summarize.", "input": 5, "output": "ok"}\n', r"line 1: 'input' must be text"),
    ("qa", "q.jsonl", '{"question": "who?", "context": "EU rejects", "answers": "EU"}\n', r"line 1: answers must be"),
    ("qa", "q.jsonl", '{"question": "who?", "context": "EU rejects", "answers": [5]}\n', r"line 1: answers must be"),
    ("qa", "q.jsonl", '{"question": "who?", "context": "EU rejects", "answers": {"text": "EU", "answer_start": 0}}\n',
     r"line 1: .*must be lists"),
    ("qa", "q.json", '{"data": [{"paragraphs": [5]}]}', r"data\[0\]: a \.json QA file must be SQuAD-style"),
    ("qa", "q.json", '{"data": [7]}', r"data\[0\]: a \.json QA file must be SQuAD-style"),
    ("qa", "q.json", '{"data": [{"paragraphs": [{"context": "EU", "qas": 3}]}]}', r"'qas' must be a list of objects"),
    ("qa", "q.csv", 'question,context,answers\nwho?,EU rejects,"{""text"": [""EU""], ""answer_start"": [0]"\n',
     r"line 2: answers must be"),
    ("classification", "t.txt", "\r\nhello,pos\n", r"line 1: the header row is empty"),
    ("ner", "n.conll", "EU B-ORG\nrejects\u2028 O\ncall Z-X\n", r"line 3: tag 'Z-X' is not valid"),  # U+2028 is no line break
]


@pytest.mark.parametrize("task_name,name,content,message", HOSTILE_FILES)
def test_hostile_files_are_input_errors_with_the_line(task_name, name, content, message, tmp_path):
    from lmtune.config import build_config
    from lmtune.tasks import get_task
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as e:
        get_task(task_name).read_file(str(path), build_config({"task": task_name}))
    assert str(e.value).startswith(f"{path}: ")
