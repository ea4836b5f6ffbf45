"""lmtune distill for NER: the teacher's per-word tag distributions (soft targets at each word's first sub-token)
teach a student through NER's loss; unlabeled sentences (tokens or raw text) add the soft term alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmtune
from lmtune.cli import main
from lmtune.distill import distill, read_unlabeled, with_soft_targets
from lmtune.errors import InputError
from tests.test_ner import toy_ner, write_conll

TRAIN = {"epochs": 10, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "progress": "none", "seed": 1}


def _swapped(sents: list) -> list:
    """The same sentences with PER and LOC exchanged: a teacher of the wrong types, or wrong hard labels."""
    swap = {"PER": "LOC", "LOC": "PER"}
    out = []
    for toks, tags in sents:
        new, prev = [], None
        for t in tags:  # a two-word PER becomes two one-word LOCs' worth of tags: rebuilt as B-/I- of the new type
            typ = None if t == "O" else swap[t[2:]]
            new.append("O" if typ is None else (f"I-{typ}" if t.startswith("I-") and prev == typ else f"B-{typ}"))
            prev = typ
        out.append((toks, new))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("distill-ner-data")
    files = {k: str(write_conll(d / f"{k}.conll", toy_ner(n, s))) for k, n, s in (("train", 150, 1), ("dev", 30, 2), ("test", 30, 3))}
    files["swapped"] = str(write_conll(d / "swapped.conll", _swapped(toy_ner(150, 1))))
    # read as predict reads NER input: token lists and raw text (JSONL), one token per line (CoNLL without tags)
    lines = [json.dumps({"tokens": toks}) for toks, _ in toy_ner(12, 7)]
    lines += [json.dumps({"text": " ".join(toks)}) for toks, _ in toy_ner(8, 8)]
    files["unlabeled"] = str(Path(d / "unlabeled.jsonl"))
    Path(files["unlabeled"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    conll = d / "unlabeled.conll"
    conll.write_text("\n\n".join("\n".join(toks) for toks, _ in toy_ner(5, 9)) + "\n", encoding="utf-8")
    files["unlabeled_conll"] = str(conll)
    return files


def _config(out: Path, model: str, data: dict, name: str, **train) -> dict:
    return {"task": "ner", "output_dir": str(out), "run_name": name, "model": {"name": model},
            "data": {k: data[k] for k in ("train", "dev", "test")} | {"max_length": 16}, "train": {**TRAIN, **train}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model, data):
    run = lmtune.train(_config(tmp_path_factory.mktemp("ner-teacher"), tiny_model, data, "teacher"))
    assert run.metrics["test"]["f1"] >= 0.7
    return run


def test_the_ner_loss_mixes_per_token_soft_targets_with_the_hard_tags():
    from lmtune.tasks import get_task
    task = get_task("ner")
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)  # two sentences, four positions, three tags
    labels = torch.tensor([[-100, 0, 2, -100], [-100, -100, -100, -100]])  # the second is unlabeled
    teacher_log = torch.full((2, 4, 3), float("nan"))
    teacher_log[0, 1], teacher_log[0, 2], teacher_log[1, 1] = (torch.log_softmax(torch.randn(3), -1) for _ in range(3))
    batch = {"labels": labels, "soft_targets": teacher_log}
    out = type("Out", (), {"logits": logits})()
    ce = F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), reduction="sum", ignore_index=-100)
    assert float(task.loss(out, batch)) == pytest.approx(float(ce))  # no distillation asked: the hard term alone
    task.distill_with(2.0, 0.25)
    kl = sum(float((teacher_log[i, p].exp() * (teacher_log[i, p] - torch.log_softmax(logits[i, p] / 2.0, -1))).sum())
             for i, p in ((0, 1), (0, 2), (1, 1)))  # only where the teacher has a row: the unlabeled word included
    assert float(task.loss(out, batch)) == pytest.approx(0.25 * 4.0 * kl + 0.75 * float(ce), rel=1e-5)
    # what the loss is averaged over: positions with a hard label or a soft target (the unlabeled word counts)
    features = [{"labels": [-100, 0, 2, -100], "soft_positions": [1, 2]}, {"labels": [-100] * 4, "soft_positions": [1]}]
    assert task.num_items(features) == 3


def test_the_teacher_labels_each_word_softly_and_unlabeled_sentences_are_read_as_predict_reads_them(teacher, data):
    from lmtune.tasks import get_task
    task = get_task("ner")
    task.set_state(teacher.task.state())
    extra = read_unlabeled(task, data["unlabeled"], teacher.config) + read_unlabeled(task, data["unlabeled_conll"], teacher.config)
    assert len(extra) == 12 + 8 + 5 and all(ex.tags is None for ex in extra)
    assert extra[12].text is not None and extra[12].offsets is not None  # raw text: split into words as predict splits it
    taught = with_soft_targets(teacher, extra, 1.0)
    labels = teacher.labels
    enc = teacher.encode(extra)
    decoded = teacher.task.word_log_probs(teacher.outputs(enc), enc)  # the calibrated word distributions predict decodes
    for ex, lp in zip(taught, decoded):
        assert ex.soft_targets.shape == (len(ex.tokens), len(labels))
        assert np.allclose(np.exp(ex.soft_targets).sum(1), 1.0, atol=1e-4)  # each word: a distribution over the tags
        assert np.allclose(ex.soft_targets, lp, atol=1e-5)  # at T 1: exactly those
    # the student's features carry them at each word's first sub-token, NaN elsewhere once collated
    task.distill_with(2.0, 0.5)
    enc = task.encode(taught[:4], teacher.tokenizer, 16, labels)
    batch = task.collate(enc.features, teacher.tokenizer)
    for f, soft, lab in zip(enc.features, batch["soft_targets"], batch["labels"]):
        assert f["soft_positions"] == [p for p, _, _ in f["words"]]
        has = ~torch.isnan(soft[:, 0])
        assert has.nonzero().flatten().tolist() == f["soft_positions"] and (lab == -100).all()  # unlabeled: soft alone
    # softer at a higher temperature
    hot = with_soft_targets(teacher, extra[:3], 4.0)
    entropy = [float(-(np.exp(s) * s).sum()) for s in (hot[0].soft_targets, taught[0].soft_targets)]
    assert entropy[0] > entropy[1]


def test_a_ner_teacher_distils_into_a_truncated_student_that_is_an_ordinary_run(tmp_path, teacher, tiny_model, data, capsys):
    out = tmp_path / "runs"
    assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--student-layers", "1", "--unlabeled",
                 data["unlabeled"], "--output_dir", str(out), "--run_name", "student", "--train.epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: test f1" in printed and "hard_only" in printed
    run_dir = out / "student"
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["sizes"] == {"train": 150 + 20, "dev": 30, "test": 30}  # the unlabeled sentences joined train
    assert splits["distill"]["unlabeled_rows"] == 20 and splits["distill"]["alignment"] == "position"
    d = json.loads((run_dir / "results.json").read_text())["distill"]
    assert d["metric"] == "f1" and d["alignment"] == "position" and d["unlabeled_rows"] == 20
    assert d["teacher"]["kind"] == "single" and d["student"]["kind"] == "truncated" and d["student"]["layers"] == "1"
    assert d["teacher"]["f1"] == pytest.approx(teacher.metrics["test"]["f1"])
    student = lmtune.load(run_dir)
    assert student.task.name == "ner" and student.model.config.num_hidden_layers == 1
    assert d["student"]["f1"] == pytest.approx(student.metrics["test"]["f1"])
    hard = lmtune.load(d["hard_only"]["run_dir"])
    assert d["hard_only"]["f1"] == pytest.approx(hard.metrics["test"]["f1"])
    report = (run_dir / "report.md").read_text()
    assert "## Distillation (teacher, student, student on hard labels alone)" in report
    assert "aligned by position" in report and "Entities by type" in report  # NER's own section too
    # evaluate and predict as on any NER run
    assert main(["evaluate", str(run_dir), "--data", data["test"]]) == 0
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--input", data["test"], "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all("entities" in r and len(r["tags"]) == len(r["gold"]) for r in rows)


def test_soft_targets_change_what_the_student_learns(tmp_path, teacher, tiny_model, data):
    """The train file's tags with PER and LOC swapped: trained on them alone (alpha 0) the student learns the swap;
    with alpha 1 the hard tags weigh nothing and the (right) teacher's soft targets teach it."""
    over = {"output_dir": str(tmp_path), "data.train": data["swapped"], "train.epochs": 6}
    hard = distill(teacher.run_dir, student=tiny_model, alpha=0.0, compare=False, overrides={**over, "run_name": "a0"})
    soft = distill(teacher.run_dir, student=tiny_model, alpha=1.0, compare=False, overrides={**over, "run_name": "a1"})
    assert hard["student"]["f1"] <= 0.3 and soft["student"]["f1"] >= 0.7, (hard["student"], soft["student"])
    text = "then john mary left paris today"

    def types(name: str) -> dict[str, set[str]]:
        ents = lmtune.load(tmp_path / name).predict([text])[0]["entities"]
        return {w: {e["label"] for e in ents if w in e["text"]} for w in ("john", "paris")}
    assert types("a1") == {"john": {"PER"}, "paris": {"LOC"}}  # the teacher's types
    assert types("a0") == {"john": {"LOC"}, "paris": {"PER"}}  # the swapped file's


def test_a_student_with_another_tokenizer_is_aligned_by_word(tmp_path, teacher, data):
    """A student whose tokenizer splits words into other sub-tokens (letters, here): the teacher's word rows land on
    the student's first sub-token of each word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    folder = tmp_path / "letters-bert"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    assert len(tok("paris", add_special_tokens=False)["input_ids"]) == 5  # not the teacher's sub-tokens
    d = distill(teacher.run_dir, student=str(folder), unlabeled=data["unlabeled"], compare=False,
                overrides={"output_dir": str(tmp_path), "run_name": "letters", "train.epochs": 1, "data.max_length": 48})
    assert d["alignment"] == "word" and d["student"]["f1"] is not None
    assert "aligned by word" in (tmp_path / "letters" / "report.md").read_text()
    assert lmtune.load(tmp_path / "letters").predict(["john left paris"])[0]["tags"]


def test_a_soup_of_ner_runs_teaches_and_an_ensemble_of_them_is_refused(tmp_path, teacher, tiny_model, data):
    from lmtune.search.combine import ensemble, soup
    other = lmtune.train(_config(tmp_path, tiny_model, data, "other", epochs=2, seed=2))
    with pytest.raises(InputError, match="ensemble: the ner task does not support ensemble"):
        ensemble([str(teacher.run_dir), str(other.run_dir)], tmp_path / "ens")
    soup([str(teacher.run_dir), str(other.run_dir)], tmp_path / "soup")
    d = distill(tmp_path / "soup", student=tiny_model, student_layers=1, compare=False,
                overrides={"output_dir": str(tmp_path), "run_name": "from-soup", "train.epochs": 1})
    assert d["teacher"]["kind"] == "soup" and d["student"]["f1"] is not None


def test_misaligned_ner_input_is_refused_before_anything_is_written(tmp_path, teacher, tiny_model, capsys):
    from lmtune.tasks import get_task
    bad = tmp_path / "u.jsonl"
    bad.write_text(json.dumps({"tokens": ["john", "left"]}) + "\n"
                   + json.dumps({"tokens": ["mary", "left", "rome"], "tags": ["B-PER", "O"]}) + "\n", encoding="utf-8")
    out = tmp_path / "runs"
    assert main(["distill", str(teacher.run_dir), "--student", tiny_model, "--unlabeled", str(bad), "--output_dir",
                 str(out), "--run_name", "s"]) == 2
    assert f"{bad}: line 2: 'tags' must be a list as long as 'tokens' (3)" in capsys.readouterr().err
    assert not (out / "s").exists()
    # soft targets for other words than the sentence has (a row short) are an error naming the sentence
    task = get_task("ner")
    ex = task.from_texts(["john left paris"])[0]
    short = with_soft_targets(teacher, task.from_texts(["john left"]), 2.0)[0].soft_targets
    ex.soft_targets = short
    ex.source = "u.jsonl: line 1"
    with pytest.raises(InputError, match=r"u.jsonl: line 1: soft targets of shape \[2, 5\] do not align with the "
                                         r"sentence's 3 words and 5 tags"):
        task.encode([ex], teacher.tokenizer, 16, teacher.labels)


def test_length_buckets_and_recorded_steps_pad_the_soft_targets_without_changing_the_student(tmp_path, teacher, tiny_model, data,
                                                                                                caplog):
    """The GPU fast path pads each batch to a length bucket and steps through static buffers (on CPU without the CUDA
    graph itself): the soft targets' sequence dimension is padded with NaN rows (no soft term there), so the student
    trains to the same weights as without it."""
    off = {"compile": "off", "length_buckets": "off", "sync_free": "off", "prefetch": "off", "step_graphs": "off"}
    on = {**off, "length_buckets": "on", "sync_free": "on", "step_graphs": "on"}
    over = {"output_dir": str(tmp_path), "model.dropout": 0.0, "train.max_steps": 8, "train.eval_every": 4,
            "train.calibrate": False, "train.lr": 3e-4, "train.head_lr": 3e-4}
    students = []
    for name, fast in (("plain", off), ("fast", on)):
        with caplog.at_level("INFO", logger="lmtune"):
            distill(teacher.run_dir, student=tiny_model, unlabeled=data["unlabeled"], compare=False,
                    overrides={**over, "run_name": name, **{f"train.{k}": v for k, v in fast.items()}})
        students.append(lmtune.load(tmp_path / name).model.state_dict())
    assert "steps through static buffers" in caplog.text  # the recorded step's path was taken
    diff = torch.stack([(students[0][k].float() - students[1][k].float()).abs().max() for k in students[0]]).max()
    assert float(diff) <= 1e-5  # (a NaN from the padding would fail this too)
