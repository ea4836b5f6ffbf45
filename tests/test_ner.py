"""NER: readers, schemes, sub-word alignment, windows, constrained decoding, seqeval, end to end."""
from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml
from transformers import AutoModelForTokenClassification, AutoTokenizer

import lmtune
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.ner_readers import read_ner, split_words
from lmtune.data.tagging import (SCHEMES, allowed, allowed_transitions, bio_labels, count_invalid, detect_scheme, from_bio, spans,
                                 to_bio, viterbi)
from lmtune.errors import InputError
from lmtune.tasks.base import Encoded
from lmtune.tasks.ner import NerTask

PEOPLE = ["john", "mary", "ahmed", "li", "sofia", "peter", "anna", "omar"]
PLACES = ["paris", "london", "tokyo", "berlin", "cairo", "lima", "oslo", "rome"]
FILL = ["said", "that", "the", "meeting", "in", "was", "long", "and", "then", "we", "left", "today"]


def toy_ner(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        toks, tags = [], []
        for _ in range(rng.randint(3, 9)):
            r = rng.random()
            if r < 0.15:
                toks += [rng.choice(PEOPLE), rng.choice(PEOPLE)]
                tags += ["B-PER", "I-PER"]
            elif r < 0.3:
                toks.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                toks.append(rng.choice(FILL))
                tags.append("O")
        out.append((toks, tags))
    return out


def write_conll(path: Path, sents, scheme: str = "bio") -> Path:
    lines = ["-DOCSTART- -X- O O", ""]
    for toks, tags in sents:
        lines += [f"{t} X X {g}" for t, g in zip(toks, from_bio(tags, scheme))] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


BIO_CASES = [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "B-PER", "I-PER", "O"], ["B-LOC"], ["O", "O"],
             ["B-ORG", "I-ORG", "I-ORG", "B-ORG", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_round_trip(scheme):
    for bio in BIO_CASES:
        other = from_bio(bio, scheme)
        assert to_bio(other, scheme) == bio, (scheme, other)
        assert spans(other, scheme) == spans(bio)
    if scheme != "bio":
        assert detect_scheme([from_bio(b, scheme) for b in BIO_CASES]) == scheme


def test_readers_conll_chars_jsonl_tokens_and_spans(tmp_path):
    sents = toy_ner(5, 0)
    conll = write_conll(tmp_path / "a.conll", sents, "bioes")
    ex, scheme = read_ner(conll)
    assert scheme == "bioes" and [e.tags for e in ex] == [t for _, t in sents]
    assert ex[1].source == f"{conll}:{4 + len(sents[0][0])}"
    chars = tmp_path / "zh.txt"
    chars.write_text("中\tB-ORG\n共\tI-ORG\n好\tO\n\n我\tO\n", encoding="utf-8")
    ex, _ = read_ner(chars)
    assert [e.tokens for e in ex] == [["中", "共", "好"], ["我"]] and ex[0].tags == ["B-ORG", "I-ORG", "O"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"tokens": ["Li", "visits", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}) + "\n" +
                  json.dumps({"text": "我在北京工作, Ana-Maria works at ACME.",
                              "entities": [{"start": 2, "end": 4, "label": "LOC"}, {"start": 8, "end": 17, "label": "PER"},
                                           {"start": 27, "end": 30, "label": "ORG"}]}, ensure_ascii=False) + "\n")
    ex, _ = read_ner(jl)
    assert ex[0].tags == ["B-PER", "O", "B-LOC"]
    sp = ex[1]
    got = [(sp.text[sp.offsets[s][0]:sp.offsets[e - 1][1]], t) for s, e, t in spans(sp.tags)]
    assert got == [("北京", "LOC"), ("Ana-Maria", "PER"), ("ACM", "ORG")]  # a span edge inside a word cuts the word
    assert "E" in sp.tokens


@pytest.mark.parametrize("content,pattern", [
    ("a B-PER\nb\n", r"line 2: a token without a tag"),
    ("a B-PER\nb X-PER\n", r"line 2: tag 'X-PER' is not valid"),
    ('{"text": "abc", "entities": [{"start": 1, "end": 9, "label": "X"}]}\n', r": line 1: entity 1 \(1-9\) is out of range"),
    ('{"text": "abcdef", "entities": [{"start": 0, "end": 3, "label": "X"}, {"start": 2, "end": 5, "label": "Y"}]}\n',
     r"overlap"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', r"'tags' must be a list as long as 'tokens'"),
])
def test_ner_bad_input_errors_and_writes_nothing(tmp_path, capsys, content, pattern):
    ext = "jsonl" if content.startswith("{") else "conll"
    data = tmp_path / f"bad.{ext}"
    data.write_text(content, encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "ner", "output_dir": str(tmp_path / "runs"), "data": {"train": str(data)}}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad." in err and re.search(pattern, err), err
    assert not (tmp_path / "runs").exists()


def test_alignment_first_subtoken_and_chinese_mixed_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = NerTask()
    labels = bio_labels({"PER", "LOC"})
    words = ["unbelievableness", "john", "visited", "paris"]
    assert len(tok(words[0], add_special_tokens=False)["input_ids"]) > 1
    ex = read_ner_examples([(words, ["O", "B-PER", "O", "B-LOC"])])
    enc = task.encode(ex, tok, 32, labels)
    f = enc.features[0]
    labeled = [(i, x) for i, x in enumerate(f["labels"]) if x != -100]
    assert [labels[x] for _, x in labeled] == ["O", "B-PER", "O", "B-LOC"]
    assert [w for _, w, _ in f["words"]] == [0, 1, 2, 3]
    assert [p for p, _, _ in f["words"]] == [i for i, _ in labeled]
    # every word of mixed Chinese / digits / Latin text gets exactly one predicted position
    words = [w for w in ("我", "在", "2023", "年", "去", "了", "Paris", "和", "東京")]
    assert [t for t in (lambda s: [s[a:b] for a, b in split_words(s)])("我在2023年去了Paris和東京")] == \
        ["我", "在", "2023", "年", "去", "了", "Paris", "和", "東", "京"]
    enc = task.encode(read_ner_examples([(words, ["O"] * len(words))]), tok, 32, labels)
    assert sorted(w for _, w, _ in enc.features[0]["words"]) == list(range(len(words)))
    # a word the tokenizer drops entirely still gets a position (as [UNK])
    enc = task.encode(read_ner_examples([(["a", "\u200b", "b"], ["O", "O", "O"])]), tok, 32, labels)
    assert sorted(w for _, w, _ in enc.features[0]["words"]) == [0, 1, 2]


def read_ner_examples(pairs):
    from lmtune.data.ner_readers import NerExample
    return [NerExample(t, g, f"mem:{i}") for i, (t, g) in enumerate(pairs)]


def _outputs_for(enc: Encoded, labels: list[str], pred_tags: list[list[str]]) -> list[np.ndarray]:
    """Per-feature log-probs that put the given tag on each word (what a model would output)."""
    index = {lab: i for i, lab in enumerate(labels)}
    outs = []
    for f in enc.features:
        out = np.full((f["length"], len(labels)), np.log(0.01 / (len(labels) - 1)))
        for pos, w, _ in f["words"]:
            out[pos, index[pred_tags[f["example"]][w]]] = np.log(0.99)
        outs.append(out)
    return outs


def test_long_sentence_windows_cover_every_word(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = NerTask()
    labels = bio_labels({"PER", "LOC"})
    toks, tags = [], []
    for s in toy_ner(40, 3):
        toks += s[0]
        tags += s[1]
    ex = read_ner_examples([(toks, tags)])
    enc = task.encode(ex, tok, 24, labels)
    n_sub = len(tok(toks, is_split_into_words=True, add_special_tokens=False)["input_ids"])
    assert n_sub >= 3 * 24 and len(enc.features) >= 3
    assert all(f["length"] <= 24 for f in enc.features)
    m = task.evaluate(_outputs_for(enc, labels, [tags]), enc, labels)
    assert m["words_dropped"] == 0 and m["words"] == len(toks) and m["sentences_windowed"] == 1
    assert m["f1"] == 1.0


def test_seqeval_numbers_and_error_kinds_on_a_hand_made_example(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = NerTask()
    labels = bio_labels({"PER", "LOC", "ORG"})
    gold = [(["john", "smith", "met", "mary", "in", "paris"], ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC"]),
            (["acme", "corp", "hired", "li"], ["B-ORG", "I-ORG", "O", "B-PER"])]
    pred = [["B-PER", "I-PER", "O", "O", "O", "B-ORG"], ["B-ORG", "O", "O", "B-PER"]]
    enc = task.encode(read_ner_examples(gold), tok, 32, labels)
    m = task.evaluate(_outputs_for(enc, labels, pred), enc, labels)
    # gold 5 entities, predicted 4; correct: john smith, li -> P = 2/4, R = 2/5
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.4)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert m["per_type"]["PER"]["recall"] == pytest.approx(2 / 3)
    assert {k: v["count"] for k, v in m["errors"].items()} == {"missed": 1, "wrong type": 1, "wrong boundary": 1}


def test_constrained_decoding_never_emits_an_invalid_sequence():
    labels = bio_labels({"PER", "LOC", "ORG"})
    start_ok, trans_ok = allowed_transitions(labels)
    rng = np.random.default_rng(0)
    raw_invalid = 0
    for _ in range(300):
        lp = np.log(rng.dirichlet(np.ones(len(labels)) * 0.3, size=rng.integers(1, 12)))
        raw_invalid += count_invalid([labels[k] for k in lp.argmax(-1)])
        path = [labels[k] for k in viterbi(lp, start_ok, trans_ok)]
        assert not count_invalid(path)
        assert len(path) == len(lp)
    assert raw_invalid > 50  # the raw argmax often is invalid: the constraint does real work


def _best_allowed_path_by_enumeration(lp: np.ndarray, labels: list[str]) -> float:
    import itertools
    return max(sum(lp[i, k] for i, k in enumerate(path)) for path in itertools.product(range(len(labels)), repeat=len(lp))
               if not count_invalid([labels[k] for k in path]))


def test_viterbi_finds_the_best_allowed_path_whether_or_not_the_argmax_is_allowed():
    # viterbi returns the per-word argmax at once when it obeys the constraints (the fast path): both ways must give
    # the best allowed path, checked against every path of short sentences over 5 tags
    labels = bio_labels({"PER", "LOC"})
    start_ok, trans_ok = allowed_transitions(labels)
    rng = np.random.default_rng(1)
    took = {True: 0, False: 0}
    for _ in range(120):
        lp = np.log(rng.dirichlet(np.ones(len(labels)) * 0.5, size=rng.integers(1, 5)))
        argmax_ok = not count_invalid([labels[k] for k in lp.argmax(-1)])
        took[argmax_ok] += 1
        path = viterbi(lp, start_ok, trans_ok)
        assert allowed(np.array(path), start_ok, trans_ok) and not count_invalid([labels[k] for k in path])
        assert sum(lp[i, k] for i, k in enumerate(path)) == pytest.approx(_best_allowed_path_by_enumeration(lp, labels))
        if argmax_ok:
            assert path == lp.argmax(-1).tolist()
    assert min(took.values()) > 20  # both ways were exercised


def _ner_config(tmp_path, tiny_model, scheme="bio"):
    return {"task": "ner", "output_dir": str(tmp_path / "runs"), "run_name": "ner",
            "data": {"train": str(write_conll(tmp_path / "train.conll", toy_ner(150, 1), scheme)),
                     "dev": str(write_conll(tmp_path / "dev.conll", toy_ner(30, 2), scheme)),
                     "test": str(write_conll(tmp_path / "test.conll", toy_ner(30, 3), scheme)), "max_length": 10},
            "model": {"name": tiny_model},
            "train": {"epochs": 8, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "progress": "none", "seed": 1}}


def test_ner_trains_saves_and_predicts_spans(tmp_path, tiny_model, capsys):
    cfg = _ner_config(tmp_path, tiny_model, scheme="bioes")
    run = lmtune.train(cfg)
    m = run.metrics["test"]
    assert m["f1"] >= 0.8, m
    assert m["words_dropped"] == 0 and m["sentences_windowed"] > 0  # max_length 10 forces windows
    report = (run.run_dir / "report.md").read_text()
    assert ("| PER |" in report or "| PER (weakest) |" in report) and "Sentences cut into windows" in report
    assert report.count("(weakest)") == 2  # one type marked on dev, one on test
    pred = json.loads((run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()[0])
    assert all(t == "O" or t[0] in "BIES" for t in pred["tags"])  # written back in the user's scheme
    plain = AutoModelForTokenClassification.from_pretrained(run.run_dir / "model")
    assert set(plain.config.id2label.values()) == set(bio_labels({"PER", "LOC"}))
    text = "then john mary left paris today"
    assert main(["predict", str(run.run_dir), "--text", text]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    ents = {(e["text"], e["label"]) for e in row["entities"]}
    assert ("john mary", "PER") in ents and ("paris", "LOC") in ents
    for e in row["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert lmtune.load(run.run_dir).predict([text])[0]["entities"] == row["entities"]


def test_ner_trains_with_word_level_adversarial_training_on_windowed_sentences(tmp_path, tiny_model):
    cfg = copy.deepcopy(_ner_config(tmp_path, tiny_model))
    cfg["adversarial"] = {"method": "typo", "candidates": 2, "rate": 0.3}
    cfg["train"]["epochs"] = 4
    run = lmtune.train(cfg)
    assert run.metrics["train"]["adversarial"]["forward_only_passes_per_step"] == 2
    assert run.metrics["test"]["sentences_windowed"] > 0 and run.metrics["test"]["f1"] >= 0.6, run.metrics["test"]


def test_ner_calibration_keeps_the_tags_and_abstention_withholds_low_scoring_entities(tmp_path, tiny_model):
    cfg = copy.deepcopy(_ner_config(tmp_path, tiny_model))
    cfg["abstain"] = {"target": "precision", "value": 0.9}
    run = lmtune.train(cfg)
    task, m = run.task, run.metrics["test"]
    assert task.temperature != 1.0 and task.calibration["dev_ece_after"] <= task.calibration["dev_ece_before"]
    assert 0 <= m["ece"] <= 1 and len(m["ece_noise"]) == 2 and m["reliability"]
    report = (run.run_dir / "report.md").read_text()
    assert "### Calibration" in report and "### Abstention" in report and (run.run_dir / "reliability.png").is_file()
    # temperature scaling never changes the decoded tags, only the scores
    enc = run.encode(task.read_file(cfg["data"]["test"], run.config, run.labels))
    outs = run.outputs(enc)
    raw, cal = (task.decode(outs, enc, run.labels, task.word_log_probs(outs, enc, t))[0] for t in (1.0, task.temperature))
    assert [t for t, _ in raw] == [t for t, _ in cal]
    assert any(not np.allclose(a, b) for (_, a), (_, b) in zip(raw, cal))
    # the threshold met its target on dev, and splits every prediction's entities by their score
    a = task.abstention
    assert a["met"] and a["dev_precision"] >= 0.9 and m["abstention"]["threshold"] == task.threshold
    rows = run.predict_examples(enc.examples)
    assert sum(len(r["abstained_entities"]) for r in rows) > 0 or a["dev_coverage"] == 1.0
    for r in rows:
        assert all(e["score"] >= task.threshold for e in r["entities"])
        assert all(e["score"] < task.threshold for e in r["abstained_entities"])
    assert lmtune.load(run.run_dir).predict_examples(enc.examples) == rows  # temperature and threshold are saved


def test_ner_metric_choice_is_checked(tmp_path, tiny_model):
    cfg = copy.deepcopy(_ner_config(tmp_path, tiny_model))
    cfg["train"]["metric"] = "accuracy"
    with pytest.raises(InputError, match="not a metric of the ner task"):
        lmtune.train(cfg)
    assert build_config(cfg).task == "ner"


@pytest.mark.slow
def test_ner_on_the_packaged_minilm_with_a_chinese_mixed_span_file(tmp_path):
    """The packaged backbone end to end, with JSONL span input (English + a Chinese place name)."""
    rows = []
    for toks, tags in toy_ner(300, 7):
        text, ents = "", []
        for t, g in zip(toks, tags):
            if g == "B-LOC" and len(rows) % 3 == 0:
                t = "北京"
            start = len(text)
            text += t + " "
            if g != "O":
                if g.startswith("B-"):
                    ents.append({"start": start, "end": start + len(t), "label": g[2:]})
                else:
                    ents[-1]["end"] = start + len(t)
        rows.append(json.dumps({"text": text.strip(), "entities": ents}, ensure_ascii=False))
    data = tmp_path / "spans.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run = lmtune.train({"task": "ner", "output_dir": str(tmp_path / "runs"), "data": {"train": str(data), "max_length": 32},
                        "train": {"epochs": 3, "progress": "none"}})
    assert run.metrics["test"]["f1"] > 0.6 and run.metrics["test"]["words_dropped"] == 0
    text = "then anna omar left 北京 today"
    out = run.predict([text])[0]
    assert out["entities"], out
    for e in out["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and e["label"] in ("PER", "LOC")


def test_ner_class_weights_are_per_tag_and_enter_the_loss(tmp_path):
    from types import SimpleNamespace
    train = tmp_path / "imb.conll"
    train.write_text("".join("anna O\nsmiles O\ntoday O\n\n" if i % 4 else "anna B-PER\nsmiles O\ntoday O\n\n" for i in range(40)))
    task = NerTask()
    splits = task.read(build_config({"task": "ner", "data": {"train": str(train)}, "train": {"class_weights": "auto", "focal_gamma": 1.0}}))
    w = splits.info["class_weights"]
    assert w["B-PER"] > 5 * w["O"] and w["I-PER"] == max(w.values())  # I-PER never occurs: the largest weight, not inf
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[splits.labels.index("O"), splits.labels.index("B-PER")]])
    out = SimpleNamespace(logits=logits)
    ce = torch.nn.functional.cross_entropy(out.logits.view(-1, 3), labels.view(-1), reduction="none")
    weights = torch.tensor([w[splits.labels[k]] for k in labels.view(-1)])
    assert task.loss(out, {"labels": labels}).item() == pytest.approx((ce * weights * (1 - torch.exp(-ce))).sum().item(), rel=1e-5)


def test_ner_label_noise_search_flags_sentences_with_flipped_tags(tmp_path, tiny_model):
    sents = toy_ner(150, 1)
    planted = []
    for i, (_toks, tags) in enumerate(sents):  # every 10th sentence with a place: that place tagged as a person
        if i % 10 == 0 and "B-LOC" in tags:
            j = tags.index("B-LOC")
            tags[j] = "B-PER"
            planted.append(i)
    cfg = copy.deepcopy(_ner_config(tmp_path, tiny_model))
    cfg["data"]["train"] = str(write_conll(tmp_path / "noisy.conll", sents))
    cfg["data"]["label_noise_folds"] = 3
    run = lmtune.train(cfg)
    rows = [json.loads(x) for x in (run.run_dir / "label_noise.jsonl").read_text().splitlines()]
    lines = {int(r["source"].rsplit(":", 1)[1]): r for r in rows}
    # the sentence sources are file:line of their first token; map planted sentence numbers the same way
    starts, line = [], 3  # after "-DOCSTART-" and a blank line
    for toks, _ in sents:
        starts.append(line)
        line += len(toks) + 1
    hits = [i for i in planted if starts[i] in lines]
    assert len(planted) >= 8 and len(hits) >= 0.6 * len(planted), (planted, sorted(lines))
    assert sum(1 for r in rows if (r["label"], r["suggested"]) == ("B-PER", "B-LOC")) >= len(hits) // 2
    ranking = json.loads((run.run_dir / "label_noise.json").read_text())["ranking"]  # worst label quality first
    position = {int(i): k for k, i in enumerate(ranking)}
    mean_rank = np.mean([position[i] for i in planted]) / len(sents)  # train is the file, in order (dev is given)
    assert mean_rank < 0.3, mean_rank  # the planted sentences rank near the top (random: 0.5)
    audit = json.loads((run.run_dir / "audit.json").read_text())
    assert any(f["check"] == "label_noise" for f in audit)
