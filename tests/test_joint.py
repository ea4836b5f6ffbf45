"""Task joint (issue 49, item 1): one encoder, an intent head and a slot head, trained together on rows that
carry both label columns, or on a JointBERT folder (seq.in / seq.out / label); predict, serve and the ONNX
export give both outputs from one forward pass."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.export.onnx import export_run
from lmtune.serve.app import ServeSettings, create_app
from lmtune.tasks.joint import read_jointbert
from tests.fuzz import fuzz_openapi

CITIES = ["paris", "rome", "berlin", "madrid", "oslo", "vienna"]
DAYS = ["monday", "tuesday", "friday", "sunday"]
SONGS = ["yesterday", "imagine", "halo", "believer"]
ARTISTS = ["adele", "queen", "muse", "abba"]
KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def utterance(intent: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """Words and BIO tags of one utterance: each intent has its own slots, whose words come from its own lists."""
    if intent == "book_flight":
        parts = [("book", "O"), ("a", "O"), ("flight", "O"), ("from", "O"), (rng.choice(CITIES), "B-fromloc"),
                 ("to", "O"), (rng.choice(CITIES), "B-toloc")]
    elif intent == "get_weather":
        parts = [("weather", "O"), ("in", "O"), (rng.choice(CITIES), "B-city"), ("on", "O"), (rng.choice(DAYS), "B-date")]
    else:
        parts = [("play", "O"), (rng.choice(SONGS), "B-song"), ("by", "O"), (rng.choice(ARTISTS), "B-artist")]
    if rng.random() < 0.5:
        parts.insert(0, (rng.choice(["please", "now", "hey"]), "O"))
    return [w for w, _ in parts], [t for _, t in parts]


INTENTS = ("book_flight", "get_weather", "play_music")


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        intent = INTENTS[i % 3]
        tokens, tags = utterance(intent, rng)
        out.append({"tokens": tokens, "tags": tags, "intent": intent})
    return out


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def write_folder(folder: Path, items: list[dict]) -> str:
    """The JointBERT layout: seq.in, seq.out (each line ending with a space, as SNIPS's do) and label."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seq.in").write_text("".join(" ".join(r["tokens"]) + "\n" for r in items))
    (folder / "seq.out").write_text("".join(" ".join(r["tags"]) + " \n" for r in items))
    (folder / "label").write_text("".join(r["intent"] + "\n" for r in items))
    return str(folder)


def config(d: Path, model: str, train: str, dev: str | None = None, test: str | None = None, **extra) -> dict:
    data = {"train": train, "max_length": 32, **({"dev": dev} if dev else {}), **({"test": test} if test else {})}
    return {"task": "joint", "output_dir": str(d / "runs"), "run_name": "joint", "data": data, "model": {"name": model},
            "train": {"epochs": 8, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "progress": "none", "seed": 1}, **extra}


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_model) -> lmtune.Run:
    d = tmp_path_factory.mktemp("joint")
    cfg = config(d, tiny_model, write_jsonl(d / "train.jsonl", rows(96, 1)), write_jsonl(d / "dev.jsonl", rows(30, 2)),
                 write_jsonl(d / "test.jsonl", rows(30, 3)))
    return lmtune.train(cfg)


def test_one_model_learns_both_and_reports_each_sub_task(joint_run, capsys):
    m = joint_run.metrics["test"]
    assert {"sentence_accuracy", "intent_accuracy", "slot_f1", "slot_exact_match", "loss"} <= set(m)
    assert m["sentence_accuracy"] <= min(m["intent_accuracy"], m["slot_exact_match"]) + 1e-9
    assert m["sentence_accuracy"] >= 0.8 and m["slot_f1"] >= 0.8, m  # the words decide the slots: learnable
    assert joint_run.metrics["metric"] == "sentence_accuracy"  # what chose the checkpoint
    assert "per_class" in m["intent"] and "per_type" in m["slots"]
    report = (joint_run.run_dir / "report.md").read_text()
    for section in ("## Intent and slots", "## Intent", "## Slots", "### Intent: Per-class results (test)",
                    "### Slots: Entities by type (test)"):
        assert section in report, section
    # each sub-task's plots under its own name (both would write reliability.png), every link resolving
    for png in ("intent_confusion_matrix_test.png", "intent_reliability.png", "slots_reliability.png"):
        assert f"]({png})" in report and (joint_run.run_dir / png).is_file(), png
    card = (joint_run.run_dir / "model" / "README.md").read_text()
    assert "lmtune.load" in card and "pipeline(" not in card  # no transformers pipeline reads the two heads
    written = [json.loads(line) for line in (joint_run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(written) == 30 and all({"intent", "score", "slots", "tags", "gold_intent", "gold_tags"} <= set(r) for r in written)

    text = "book a flight from paris to rome"
    assert main(["predict", str(joint_run.run_dir), "--text", text, "--text", "play halo by adele"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["intent"] for r in out] == ["book_flight", "play_music"]
    assert abs(sum(out[0]["intent_probabilities"].values()) - 1) < 1e-3 and 0 < out[0]["score"] <= 1
    assert {(s["text"], s["label"]) for s in out[0]["slots"]} == {("paris", "fromloc"), ("rome", "toloc")}
    assert all(text[s["start"]:s["end"]] == s["text"] for s in out[0]["slots"])
    loaded = lmtune.load(joint_run.run_dir)
    assert loaded.predict([text])[0]["slots"] == out[0]["slots"]


def test_a_jointbert_folder_is_read_and_a_broken_one_refused_with_file_and_line(tmp_path, tiny_model, capsys):
    root = tmp_path / "snips"
    for name, seed in (("train", 1), ("valid", 2), ("test", 3)):
        write_folder(root / name, rows(12, seed))
    seq_out = root / "train" / "seq.out"
    seq_out.write_text(seq_out.read_text().replace("B-", "I-", 1))  # a stray I- start: repaired as NER repairs it
    cfg = lmtune.config.build_config(config(tmp_path, tiny_model, str(root)))
    from lmtune.tasks import get_task
    task = get_task("joint")
    splits = task.read(cfg)  # data.train at the root: train/, valid/ and test/ are the splits
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (12, 12, 12)
    ex = splits.train[0]
    assert ex.label == rows(12, 1)[0]["intent"] and ex.tags == rows(12, 1)[0]["tags"]  # seq.out's trailing space ignored
    assert splits.labels[:3] == list(INTENTS) and "B-fromloc" in splits.labels
    assert splits.info["tag_scheme_repairs"]["count"] == 1 and task.slots.repairs[0].startswith(f"{seq_out}: line 1:")
    assert read_jointbert(root / "test") == rows(12, 3)  # the rows a bench writes single-task files from

    bad = write_folder(tmp_path / "bad", rows(6, 4))
    (Path(bad) / "label").write_text("book_flight\n" * 5)  # one line short
    assert main(["train", "--task", "joint", "--data.train", bad, "--model.name", tiny_model,
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert f"error: {bad}/label: line 6: 5 lines, but seq.in has 6" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
    items = rows(6, 4)
    write_folder(Path(bad), items)
    lines = (Path(bad) / "seq.out").read_text().splitlines()
    lines[2] = "O " + lines[2]  # one tag too many on line 3
    (Path(bad) / "seq.out").write_text("\n".join(lines) + "\n")
    assert main(["train", "--task", "joint", "--data.train", bad, "--model.name", tiny_model,
                 "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}/seq.out: line 3: {len(items[2]['tags']) + 1} tags for {len(items[2]['tokens'])} words" in err


def test_a_row_file_with_a_wrong_tag_count_names_its_line(tmp_path, tiny_model, capsys):
    items = rows(6, 5)
    items[3]["tags"] = items[3]["tags"][:-1]
    train = write_jsonl(tmp_path / "train.jsonl", items)
    assert main(["train", "--task", "joint", "--data.train", train, "--model.name", tiny_model,
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert f"error: {train}: line 4: {len(items[3]['tags'])} slot tags for {len(items[3]['tokens'])} words" in capsys.readouterr().err


def test_one_request_returns_intent_and_slots_and_the_schema_says_so(joint_run, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    def app():
        return create_app(ServeSettings(run_dir=str(joint_run.run_dir), backend="torch", max_texts=8, max_chars=200))
    with TestClient(app()) as c:
        assert c.post("/v1/predict", json={"texts": ["weather in oslo on friday"]}).status_code == 401
        r = c.post("/v1/predict", json={"texts": ["weather in oslo on friday"]}, headers=AUTH)
        schema = c.get("/openapi.json").json()
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert p["intent"] == "get_weather" and {(s["text"], s["label"]) for s in p["slots"]} == {("oslo", "city"), ("friday", "date")}
    assert p["tags"] == ["O", "O", "B-city", "O", "B-date"]
    fields = schema["components"]["schemas"]["Prediction"]["properties"]
    assert {"intent", "score", "intent_probabilities", "slots", "tags"} <= set(fields)
    calls = [code for _, code in fuzz_openapi(app(), (AUTH, {}), 10, {"/v1/predict"})]
    assert 200 in calls and 401 in calls


def test_the_onnx_export_has_both_outputs_and_matches_pytorch(joint_run):
    report = export_run(joint_run.run_dir, quantize="int8", sample=16)
    assert set(report["onnx_int8"]["dev"]) == set(report["pytorch"]["dev"])  # verified the same way
    r = report["onnx_fp32"]
    assert r["max_abs_logit_diff"] < 1e-4, r
    assert r["dev"] == pytest.approx(report["pytorch"]["dev"], abs=1e-6)
    import onnx
    graph = onnx.load(str(joint_run.run_dir / "export" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["intent_logits", "slot_logits"]
    onnx_run = lmtune.load(joint_run.run_dir, backend="onnx")
    text = ["book a flight from oslo to vienna"]
    assert onnx_run.predict(text)[0]["intent"] == joint_run.predict(text)[0]["intent"]
    assert onnx_run.predict(text)[0]["tags"] == joint_run.predict(text)[0]["tags"]


def test_evaluate_and_predict_read_a_jointbert_folder(joint_run, tmp_path, capsys):
    folder = write_folder(tmp_path / "valid", rows(9, 7))
    m = joint_run.evaluate(folder)
    assert m["n"] == 9 and m["sentence_accuracy"] <= min(m["intent_accuracy"], m["slot_exact_match"]) + 1e-9
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    (unlabeled / "seq.in").write_text("play imagine by queen\nweather in rome on monday\n")  # no seq.out, no label
    assert main(["predict", str(joint_run.run_dir), "--input", str(unlabeled)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["tags"]) for r in out] == [4, 5] and all("intent" in r and "gold_intent" not in r for r in out)


def test_the_intent_head_abstains_on_a_threshold_chosen_on_dev(joint_run, tmp_path):
    dev = write_jsonl(tmp_path / "dev.jsonl", rows(30, 2))
    found = joint_run.tune_abstention(dev, "coverage", 0.5)  # answer only the surest half
    assert found["threshold"] is not None
    preds = joint_run.predict([" ".join(r["tokens"]) for r in rows(12, 8)])
    held = [p for p in preds if p.get("abstained")]
    assert held and all(p["intent"] == "abstain" and p["top_intent"] in INTENTS and "slots" in p for p in held)
    joint_run.task.intent.threshold = None  # the module's run is shared: predictions without abstention again


def test_lora_trains_the_joint_model_and_its_adapter_loads_with_both_heads(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, write_jsonl(tmp_path / "train.jsonl", rows(24, 1)),
                 write_jsonl(tmp_path / "dev.jsonl", rows(9, 2)), peft={"method": "lora"})
    cfg["train"].update(epochs=1, lr=None, head_lr=None)
    run = lmtune.train(cfg)
    assert (run.run_dir / "model" / "adapter_model.safetensors").is_file()
    from safetensors import safe_open
    with safe_open(str(run.run_dir / "model" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any("intent_classifier" in k for k in saved) and any("slot_classifier" in k for k in saved)
    texts = ["play halo by adele", "book a flight from rome to oslo"]
    assert lmtune.load(run.run_dir).predict(texts) == run.predict(texts)


def test_labels_train_never_had_are_refused_or_counted_wrong(joint_run, tmp_path):
    items = rows(6, 9)
    items[1]["intent"] = "cancel_flight"  # an intent train never had (ATIS's test set has such rows)
    items[2]["tags"] = [t if t == "O" else "B-airline" for t in items[2]["tags"]]  # and a slot type
    path = write_jsonl(tmp_path / "unseen.jsonl", items)
    with pytest.raises(lmtune.InputError, match=rf"{path}: line 2: intent 'cancel_flight' never appears in the training"):
        joint_run.evaluate(path)
    with pytest.raises(lmtune.InputError, match=rf"{path}: line 3: entity type 'airline' \(tag 'B-airline'\) never appears"):
        joint_run.evaluate(write_jsonl(tmp_path / "unseen.jsonl", [items[0], items[0], items[2]]))
    path = write_jsonl(tmp_path / "unseen.jsonl", items)
    joint_run.config.joint.unseen_labels = "count_wrong"
    try:
        m = joint_run.evaluate(path)
    finally:
        joint_run.config.joint.unseen_labels = "error"
    assert m["n"] == 6 and m["intent_accuracy"] <= 5 / 6 and m["slot_exact_match"] <= 5 / 6
    assert m["sentence_accuracy"] <= 4 / 6 and m["slot_recall"] < 1.0  # the unseen slots count as missed
    assert m["intent"]["n"] == 6  # classification's own figures leave the unseen intent out of its accuracy


def test_the_targets_pad_to_a_length_bucket_without_changing_the_loss(joint_run):
    """The GPU fast path pads each batch to a length bucket (pad_values): the [batch, tokens, 2] targets must pad
    along the tokens like the inputs, and the padded batch must give the same loss."""
    import torch

    from lmtune.tasks.base import encode_examples
    from lmtune.training.fast import pad_to_bucket
    from lmtune.training.loop import inputs
    task, tok = joint_run.task, joint_run.tokenizer
    examples = task.read_file(str(joint_run.config.data.dev), joint_run.config, joint_run.labels)[:4]
    batch = task.collate(encode_examples(task, examples, tok, joint_run.config, joint_run.labels).features, tok)
    width = batch["input_ids"].shape[1]
    padded = pad_to_bucket(batch, (width + 5,), task.pad_values(tok))
    assert padded["labels"].shape == (4, width + 5, 2) and (padded["labels"][:, width:] == -100).all()
    model = joint_run.model.eval()
    with torch.no_grad():
        before = task.loss(model(**inputs(batch)), batch)
        after = task.loss(model(**inputs(padded)), padded)
    assert float(before) > 0 and abs(float(before) - float(after)) < 1e-4


def test_the_word_slot_loss_weighs_every_word_alike_and_the_default_every_utterance():
    import math
    from types import SimpleNamespace

    import torch

    from lmtune.tasks.base import Encoded
    from lmtune.tasks.joint import JointTask
    task = JointTask()
    slot = torch.tensor([[0, -100, -100, -100], [1, 2, 0, -100]])  # one labeled word, then three
    labels = torch.stack([slot, torch.where(slot != -100, 0, -100)], -1)
    labels[:, :, 1] = torch.tensor([[0] * 4, [1] * 4])  # each utterance's intent on every token
    out = SimpleNamespace(intent_logits=torch.zeros(2, 3), slot_logits=torch.zeros(2, 4, 5))  # uniform: CE = log(classes)
    per_utterance = task.example_losses(out, {"labels": labels})
    assert per_utterance.tolist() == pytest.approx([math.log(3) + math.log(5)] * 2)  # each utterance's words averaged
    feats = [{"labels": [0, -100, -100]}, {"labels": [1, 2, 0]}]
    assert task.train_features(Encoded(feats, [], {})) == feats and task.words_per_utterance == 2.0  # (1 + 3) / 2
    task.slot_loss = "word"
    per_word = task.example_losses(out, {"labels": labels})
    assert per_word.tolist() == pytest.approx([math.log(3) + math.log(5) / 2, math.log(3) + 3 * math.log(5) / 2])
    assert JointTask().state()["slot_loss"] == "utterance"  # the default is unchanged until dev says otherwise
