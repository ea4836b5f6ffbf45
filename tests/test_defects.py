"""Issue 17's defects outside the HTTP service, one test each (the service's are in test_hostile.py).
Each failed on main before its fix."""
from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

import lmtune
from lmtune.cli import main
from lmtune.data import read_examples
from lmtune.data.ner_readers import NerExample
from lmtune.data.tagging import bio_labels, detect_scheme
from lmtune.errors import InputError
from lmtune.serve.security import mask_pii
from lmtune.tasks.ner import NerTask, error_kinds
from tests.conftest import toy_rows, write_csv


def _cfg_file(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_3_run_files_are_readable_by_other_users(tiny_config):
    old = os.umask(0o022)
    try:
        cfg = copy.deepcopy(tiny_config)
        cfg["train"].update(max_steps=2)
        run = lmtune.train(cfg)
    finally:
        os.umask(old)
    private = [str(p.relative_to(run.run_dir)) for p in run.run_dir.rglob("*")
               if not stat.S_IMODE(p.stat().st_mode) & (0o055 if p.is_dir() else 0o044)]
    assert not private, private  # model/model.safetensors and atomic temps were 0600 / 0700


def test_4_duplicate_column_names_are_refused(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,text\nhello,pos,other\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.csv: line 1: the column name 'text' appears more than once"):
        read_examples(p)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.jsonl: line 1: the key 'text' appears more than once"):
        read_examples(j)


def test_6_numeric_labels_form_one_typed_label_space(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": 2}\n', encoding="utf-8")
    assert [e.label for e in read_examples(p)] == ["1", "1", "2"]  # 1 and 1.0: one class
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.jsonl: line 2: label \"1\" is a string, but line 1 has the number 1"):
        read_examples(mixed)


def test_8_jsonl_with_u2028_inside_a_string_is_read(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"text": "one\u2028two\u0085three", "label": "x"}, ensure_ascii=False) + "\n"
                 + json.dumps({"text": "b", "label": "y"}) + "\n", encoding="utf-8")
    ex = read_examples(p)
    assert [e.text for e in ex] == ["one\u2028two\u0085three", "b"] and ex[1].source.endswith(":2")


def test_9_max_length_beyond_the_models_positions_is_refused_before_writing(tiny_config, tmp_path, capsys):
    cfg = copy.deepcopy(tiny_config)  # the tiny model has 128 positions
    cfg["data"]["max_length"] = 100000
    assert main(["train", str(_cfg_file(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "data.max_length = 100000" in err and "only 128 positions" in err and "Traceback" not in err
    assert not Path(cfg["output_dir"]).exists()


def test_10_a_model_that_cannot_load_leaves_no_run_dir(tiny_config, tmp_path, capsys):
    custom = tmp_path / "custom-model"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my-own-arch", "auto_map": {"AutoConfig": "x.MyConfig"}}))
    for name in (str(custom), str(tmp_path / "missing" / "model")):
        cfg = copy.deepcopy(tiny_config)
        cfg["model"]["name"] = name
        assert main(["train", str(_cfg_file(tmp_path, cfg))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: model.name") and "Traceback" not in err, err
        assert not Path(cfg["output_dir"]).exists()  # used to leave config.yaml, splits.json, train.log


def test_11_masking_keeps_latency_ids_and_addresses():
    assert mask_pii("POST /v1/predict 200 26123.5ms id=x") == "POST /v1/predict 200 26123.5ms id=x"
    assert mask_pii("Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)").startswith("Uvicorn running on http://127.0.0.1:8000")
    assert mask_pii("call me on +1 (415) 555-0134 or 13812345678") == "call me on <phone> or <phone>"
    assert mask_pii("mail a.b@example.com") == "mail <email>"


@pytest.mark.parametrize("flag,value,pattern", [("train.lr", "-1", r"train\.lr must be > 0, got -1"),
                                                 ("train.eval_every", "-3", r"train\.eval_every must be >= 0"),
                                                 ("train.warmup_ratio", "1.5", r"train\.warmup_ratio must be in \[0, 1\)"),
                                                 ("peft.r", "0", r"peft\.r must be >= 1")])
def test_13_out_of_range_numbers_are_refused(tiny_config, tmp_path, capsys, flag, value, pattern):
    assert main(["train", str(_cfg_file(tmp_path, tiny_config)), f"--{flag}", value]) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert not Path(tiny_config["output_dir"]).exists()


def test_14_chinese_entity_text_is_the_characters_without_spaces(tiny_model):
    from transformers import AutoTokenizer

    from lmtune.data.ner_readers import span_text
    from tests.test_ner import _outputs_for
    chars = list("李开复在北京工作")
    tags = ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O"]
    ex = [NerExample(chars, tags, "mem:1")]
    task, labels = NerTask(), bio_labels({"PER", "LOC"})
    enc = task.encode(ex, AutoTokenizer.from_pretrained(tiny_model), 32, labels)
    row = task.predictions(_outputs_for(enc, labels, [tags]), enc, labels)[0]
    assert [e["text"] for e in row["entities"]] == ["李开复", "北京"]
    assert span_text(NerExample(["New", "York", "市"], None, ""), 0, 3) == "New York市"
    missed = error_kinds([tags], [["O"] * len(chars)], ex)["missed"]["example"]
    assert missed.split("'")[1] in ("李开复", "北京")  # was '李 开 复' / '北 京' in report.md


def _conll(path: Path, sents: list[list[tuple[str, str]]]) -> str:
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sents) + "\n", encoding="utf-8")
    return str(path)


BIO_SENTS = [[("john", "B-PER"), ("smith", "I-PER"), ("visited", "O"), ("paris", "B-LOC")],
             [("mary", "B-PER"), ("likes", "O"), ("rome", "B-LOC"), ("and", "O"), ("oslo", "B-LOC")]]


def test_7_one_stray_tag_does_not_switch_the_scheme():
    seqs = [[t for _, t in s] for s in BIO_SENTS] * 5 + [["O", "I-PER", "O"]]
    assert detect_scheme(seqs) == "bio"  # it was iob1 after the first stray I-
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC"], ["I-PER", "B-PER", "O"]]) == "iob1"


def test_15_scheme_is_detected_once_for_the_data_set_and_repairs_are_reported(tiny_model, tmp_path):
    stray = [("the", "O"), ("anna", "I-PER"), ("ran", "O")]
    train = _conll(tmp_path / "train.conll", BIO_SENTS * 6 + [stray])
    dev = _conll(tmp_path / "dev.conll", BIO_SENTS * 3)
    test = _conll(tmp_path / "test.conll", [stray] + BIO_SENTS)
    run = lmtune.train({"task": "ner", "output_dir": str(tmp_path / "runs"), "run_name": "n",
                        "data": {"train": train, "dev": dev, "test": test, "max_length": 32}, "model": {"name": tiny_model},
                        "train": {"max_steps": 2, "batch_size": 4, "progress": "none"}})
    splits = json.loads((run.run_dir / "splits.json").read_text())
    assert splits["tag_scheme"] == "bio"
    repairs = splits["tag_scheme_repairs"]
    assert repairs["count"] == 2
    assert any(r.startswith(f"{train}: line 68: 'I-PER' opens an entity after 'O'") for r in repairs["first"])
    assert any(r.startswith(f"{test}: line 2:") for r in repairs["first"])
    report = (run.run_dir / "report.md").read_text()
    assert "Tag scheme: BIO" in report and "2 tag(s) broke it and were repaired" in report
    gold = [json.loads(x)["gold"] for x in (run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert gold[0] == ["O", "B-PER", "O"]  # written back in BIO (was IOB1 for the whole file)
    assert gold[1] == [t for _, t in BIO_SENTS[0]]


def test_unseen_entity_type_error_names_the_line_and_the_files_own_tag(tiny_model, tmp_path, capsys):
    train = _conll(tmp_path / "train.conll", BIO_SENTS * 4)
    dev = _conll(tmp_path / "dev.conll", BIO_SENTS + [[("in", "O"), ("acme", "B-ORG")]])
    cfg = {"task": "ner", "output_dir": str(tmp_path / "runs"), "data": {"train": train, "dev": dev}, "model": {"name": tiny_model}}
    assert main(["train", str(_cfg_file(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert f"{dev}: line 13: entity type 'ORG' (tag 'B-ORG') never appears in the training data" in err, err


def test_text_that_is_only_invisible_characters_is_refused(tmp_path):
    p = write_csv(tmp_path / "z.csv", toy_rows(4) + [("\u200b\u200b", "pos")])
    with pytest.raises(InputError, match=r"z\.csv: line 6: .*only invisible"):
        read_examples(p)


def test_predict_input_streams_in_chunks_and_writes_atomically(tiny_config, tmp_path, monkeypatch, capsys):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=2)
    run = lmtune.train(cfg)
    big = write_csv(tmp_path / "big.csv", toy_rows(1100, 9))
    calls = []
    real = lmtune.api.Run.predict_examples

    def counting(self, examples):
        calls.append(len(examples))
        return real(self, examples)

    monkeypatch.setattr(lmtune.api.Run, "predict_examples", counting)
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")
    assert main(["predict", str(run.run_dir), "--input", str(big), "--output", str(out)]) == 0
    assert calls == [512, 512, 76]  # predicted (and written) chunk by chunk
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1100 and rows[-1]["source"].endswith(":1101")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\n\u200b,pos\n", encoding="utf-8")
    assert main(["predict", str(run.run_dir), "--input", str(bad), "--output", str(out)]) == 2
    assert len(out.read_text().splitlines()) == 1100  # the previous output is intact
