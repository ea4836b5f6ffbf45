"""Robustness: adversarial training steps, attacks (budget, protected words, determinism), augmentation."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification, MarianConfig, MarianMTModel

import lmtune
from lmtune.cli import main
from lmtune.config import AdversarialConfig, AttackConfig, AugmentConfig
from lmtune.data.ner_readers import NerExample
from lmtune.data.readers import Example
from lmtune.robust.adversarial import EmbeddingAdversary, WordAdversary, example_losses
from lmtune.training.loop import plain_step
from lmtune.robust.attack import perturb, run_attacks
from lmtune.robust.augment import augment, backtranslate, edit, translate
from lmtune.robust.text import Synonyms, split_words, typo
from lmtune.tasks.classification import ClassificationTask
from lmtune.tasks.ner import NerTask

SENTENCES = ["I did not enjoy the terrible movie with Paris Hilton in 2019 at all",
             "the food was wonderful and the service quite excellent",
             "never again will I book this dreadful hotel for 3 nights",
             "a charming and funny story about ordinary people"]


@pytest.fixture(scope="module")
def tiny_bert(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2), tok


def _batch(tok, texts, labels):
    b = dict(tok(texts, return_tensors="pt", padding=True))
    b["labels"] = torch.tensor(labels)
    return b


def _loss(m, b):
    out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum")


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_adversarial_step_raises_the_loss_and_leaves_the_embeddings_untouched(tiny_bert, method):
    model, tok = tiny_bert
    model.eval()  # no dropout: losses are comparable pass to pass
    b = _batch(tok, SENTENCES, [0, 1, 0, 1])
    emb_before = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        logits_before = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.clone()
    model.zero_grad()
    plain_step(model, b, _loss, lambda lo: lo.backward())
    plain_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    adv = EmbeddingAdversary(AdversarialConfig(method=method, epsilon=1.0, alpha=0.3, steps=3), seed=0)
    clean = adv.step(model, b, _loss, lambda lo: lo.backward())
    losses = adv.last_losses
    assert len(losses) == {"fgm": 2, "pgd": 4, "freelb": 3}[method] == adv.passes
    assert all(later > losses[0] for later in losses[1:])  # each perturbation ascends the loss
    if method in ("pgd", "freelb"):
        assert losses[-1] > losses[1]  # further steps go further up
    if method != "freelb":
        assert abs(float(clean.detach()) - float(_loss(model, b).detach())) < 1e-4
    adv_grad = [p.grad for p in model.parameters()]
    assert any(not torch.allclose(a, p) for a, p in zip(adv_grad, plain_grad))
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # nothing to restore: never edited
    with torch.no_grad():
        logits_after = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(logits_after, logits_before)  # the perturbation hook is gone


def test_pgd_perturbation_stays_inside_the_epsilon_ball(tiny_bert):
    model, tok = tiny_bert
    b = _batch(tok, SENTENCES, [0, 1, 0, 1])
    adv = EmbeddingAdversary(AdversarialConfig(method="pgd", epsilon=0.5, alpha=0.4, steps=4), seed=0)
    seen = []
    original = adv._forward
    adv._forward = lambda m, bb, lf, d: (seen.append(None if d is None else d.detach().clone()), original(m, bb, lf, d))[1]
    adv.step(model, b, _loss, lambda lo: lo.backward())
    mask = b["attention_mask"].unsqueeze(-1).float()
    norms = [(d * mask).flatten(1).norm(dim=1) for d in seen if d is not None]
    assert len(norms) == 4 and all((n <= 0.5 + 1e-5).all() for n in norms)
    assert (norms[-1] > 0.45).all()  # 4 steps of 0.4 reach the bound
    assert all(float((d * (1 - mask)).abs().sum()) == 0 for d in seen if d is not None)  # padding never perturbed


def test_adversarial_training_works_with_frozen_embeddings_and_grad_accumulation(tiny_config, pretrained_tiny):
    cfg = {**tiny_config, "adversarial": {"method": "pgd", "epsilon": 0.1, "alpha": 0.05, "steps": 2},
           "model": {"name": pretrained_tiny, "freeze_embeddings": True},
           "train": {**tiny_config["train"], "grad_accum": 2}}
    run = lmtune.train(cfg)
    assert run.metrics["dev"]["accuracy"] >= 0.9
    assert run.metrics["train"]["adversarial"]["forward_backward_passes_per_step"] == 3
    assert run.metrics["train"]["seconds_per_step"] > 0


def test_fgm_with_lora(tiny_config, pretrained_tiny):
    cfg = {**tiny_config, "model": {"name": pretrained_tiny}, "peft": {"method": "lora"},
           "adversarial": {"method": "fgm", "epsilon": 0.1}, "train": {**tiny_config["train"], "lr": 1e-2, "epochs": 4}}
    run = lmtune.train(cfg)
    assert run.metrics["dev"]["accuracy"] >= 0.8
    assert run.metrics["train"]["adversarial"]["method"] == "fgm"


def _word_adversary(tok, task, examples, labels, method="typo", candidates=4, max_length=32, seed=0, synonyms=None):
    enc = task.encode(examples, tok, max_length, labels)
    sources = [(ex, w) for ex, ws in zip(enc.examples, enc.windows()) for w in range(len(ws))]
    encode = lambda exs: task.encode(exs, tok, max_length, labels)  # noqa: E731
    collate = lambda fs: task.collate(fs, tok)  # noqa: E731
    cfg = AdversarialConfig(method=method, rate=0.3, candidates=candidates)
    return WordAdversary(cfg, enc.features, sources, encode, collate, synonyms, seed), enc, collate


def test_word_adversary_trains_on_the_hardest_typo_version_next_to_the_clean_example(tiny_bert):
    model, tok = tiny_bert
    task = ClassificationTask()
    examples = [Example(t, lab, f"f:{i}") for i, (t, lab) in enumerate(zip(SENTENCES, ["neg", "pos", "neg", "pos"]))]
    adv, enc, collate = _word_adversary(tok, task, examples, ["neg", "pos"])
    items = enc.features
    batch = collate(items)
    variants = adv._variants(items)  # what the step will draw: the same seed and step count
    assert adv._variants(items) == variants  # deterministic
    model.eval()
    with torch.no_grad():
        losses = torch.stack([example_losses(model(**{k: v for k, v in collate([v[c] for v in variants]).items() if k != "labels"}),
                                             collate([v[c] for v in variants])) for c in range(4)], 1)
    expected = [v[int(j)] for v, j in zip(variants, losses.argmax(1))]
    for f, vs in zip(items, variants):  # every candidate changed the text, none touched a protected word
        assert all(v["input_ids"] != f["input_ids"] for v in vs)
    model.zero_grad()
    clean = adv.step(model, batch, _loss, lambda lo: lo.backward(), items=items)
    assert adv.last_chosen == expected  # the worst of the 4, per example
    with torch.no_grad():  # at least as hard as any fixed pick
        assert adv.last_losses[1] >= float(_loss(model, collate([v[0] for v in variants]))) - 1e-5
    assert abs(float(clean) - float(_loss(model, batch))) < 1e-5
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (_loss(model, batch) + _loss(model, collate(expected))).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(got, model.parameters()))
    assert adv._variants(items) != variants  # the next step draws fresh versions
    assert model.training is False  # the mode it was called in is kept


def test_word_adversary_keeps_ner_labels_on_their_words(tiny_bert):
    _, tok = tiny_bert
    task = NerTask()
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    long = NerExample(_ner_example().tokens * 3, _ner_example().tags * 3, "f:2")
    adv, enc, _ = _word_adversary(tok, task, [_ner_example(), long], labels, max_length=24)
    assert len(enc.windows()[1]) > 1  # the long sentence is windowed
    variants = adv._variants(enc.features)
    for f, vs in zip(enc.features, variants):
        gold = [labels.index(t) for t in enc.examples[f["example"]].tags]
        for v in vs:  # typos keep the words and their tags: a window's labels are a run of the sentence's tags
            got = [x for x in v["labels"] if x != -100]
            assert got and any(gold[i:i + len(got)] == got for i in range(len(gold)))
    changed = [v["input_ids"] != f["input_ids"] for f, vs in zip(enc.features, variants) for v in vs]
    assert sum(changed) >= len(changed) - 1  # nearly every candidate is a perturbed version, windows included


def test_synonym_adversary_draws_the_attacks_synonym_versions(tiny_bert):
    model, tok = tiny_bert
    syn = Synonyms("auto", model, tok)
    task = ClassificationTask()
    examples = [Example(t, "pos", f"f:{i}") for i, t in enumerate(SENTENCES)]
    adv, enc, _ = _word_adversary(tok, task, examples, ["neg", "pos"], method="synonym", synonyms=syn)
    variants = adv._variants(enc.features)
    for k, ex in enumerate(examples):  # the attack's own synonym perturbation (protected words kept), seeded per example and step
        rng = random.Random(f"0:synonym:{k}:0")
        for c in range(4):
            new, changed = perturb(ex, "synonym", 0.3, syn, rng)
            assert changed and new.text != ex.text
            assert variants[k][c]["input_ids"] == task.encode([new], tok, 32, ["neg", "pos"]).features[0]["input_ids"]
            assert [x for _, x in _protected_words(new)] == [x for _, x in _protected_words(ex)]


def test_typo_adversarial_training_end_to_end_with_grad_accumulation(tiny_config):
    cfg = {**tiny_config, "adversarial": {"method": "typo", "candidates": 3},
           "train": {**tiny_config["train"], "grad_accum": 2}}
    run = lmtune.train(cfg)
    a = run.metrics["train"]["adversarial"]
    assert a["method"] == "typo" and a["forward_backward_passes_per_step"] == 2 and a["forward_only_passes_per_step"] == 3
    assert run.metrics["dev"]["accuracy"] >= 0.9
    with pytest.raises(lmtune.errors.InputError, match="candidates"):
        lmtune.train({**cfg, "adversarial": {"method": "typo", "candidates": 0}})


def _protected_words(ex):
    w = split_words(ex)
    return [(k, x) for k, (x, p) in enumerate(zip(w.words, w.protected)) if p]


@pytest.mark.parametrize("method", ["typo", "synonym"])
def test_random_attacks_keep_to_budget_protected_words_and_seed(tiny_bert, method):
    model, tok = tiny_bert
    syn = Synonyms("auto", model, tok)
    for i, text in enumerate(SENTENCES):
        ex = Example(text, "pos", f"f:{i}")
        new, n = perturb(ex, method, 0.2, syn, random.Random(f"1:{i}"))
        again, _ = perturb(ex, method, 0.2, syn, random.Random(f"1:{i}"))
        assert new.text == again.text  # deterministic under a seed
        before, after = text.split(), new.text.split()
        assert len(before) == len(after)
        changed = [k for k, (a, b) in enumerate(zip(before, after)) if a != b]
        assert 1 <= len(changed) == n <= max(1, math.floor(0.2 * len(before)))
        for k, word in _protected_words(ex):  # 'not', 'never', 'Paris', 'Hilton', '2019', '3'
            assert after[k] == word
    assert {"not", "Paris", "2019"} <= {w for _, w in _protected_words(Example(SENTENCES[0], None, ""))}


def test_typo_edits_one_character_and_keeps_punctuation():
    rng = random.Random(0)
    for _ in range(50):
        t = typo("wonderful!", rng)
        assert t.endswith("!") and t != "wonderful!" and abs(len(t) - len("wonderful!")) <= 1
    assert typo("电影", random.Random(1)) != "电影"


def test_chinese_text_is_segmented_and_negations_protected(tiny_bert):
    model, tok = tiny_bert
    ex = Example("这部电影不好看，但是演员很好", "neg", "f:1")
    w = split_words(ex)
    assert "不" in w.words and w.protected[w.words.index("不")]
    assert any(len(x) > 1 for x in w.words)  # words, not just characters (jieba)
    new, n = perturb(ex, "typo", 0.3, Synonyms("embedding", model, tok), random.Random(0))
    assert new.text != ex.text and "不" in new.text and n >= 1


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_model):
    from tests.conftest import toy_rows, write_csv
    d = tmp_path_factory.mktemp("attack")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(96 if k == "train" else 48, i))) for i, k in enumerate(("train", "dev", "test"), 1)}
    run = lmtune.train({"output_dir": str(d / "runs"), "run_name": "r", "data": {**data, "max_length": 32}, "model": {"name": tiny_model},
                        "train": {"epochs": 10, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}})
    return run, data


def test_search_attack_flips_predictions_within_budget_and_is_deterministic(toy_run):
    run, data = toy_run
    examples = run.task.read_file(data["dev"], run.config, run.labels, require_label=True)
    cfg = AttackConfig(methods=["search"], budget=0.1)
    r1 = run_attacks(run, examples, cfg)
    r2 = run_attacks(run, examples, cfg)
    s = r1["attacks"]["search"]
    assert s == r2["attacks"]["search"]
    assert s["success_rate"] > 0.2  # the toy task hangs on one keyword: a typo in it flips the label
    for e in s["examples"]:
        before, after = e["original"].split(), e["adversarial"].split()
        assert sum(a != b for a, b in zip(before, after)) == e["words_changed"] <= max(1, math.floor(0.1 * len(before)))
        assert e["prediction"] != e["gold"]
    assert s["accuracy"] == pytest.approx(r1["clean"]["accuracy"] - s["flipped"] / len(examples))


def test_attack_command_writes_robustness_json_and_report(toy_run, capsys):
    run, data = toy_run
    assert main(["attack", str(run.run_dir), "--data", data["test"], "--methods", "typo,synonym,search", "--max-examples", "20"]) == 0
    r = json.loads((run.run_dir / "robustness.json").read_text())
    assert r["n"] == 20 and set(r["attacks"]) == {"typo", "synonym", "search"}
    assert r["attacks"]["typo"]["accuracy"] <= r["clean"]["accuracy"] + 1e-9
    report = (run.run_dir / "report.md").read_text()
    assert report.count("## Robustness") == 1 and "| search |" in report
    assert main(["attack", str(run.run_dir), "--methods", "typo,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def _ner_example():
    toks = ["John", "Smith", "visited", "the", "lovely", "old", "city", "of", "New", "York", "yesterday", "morning"]
    tags = ["B-PER", "I-PER", "O", "O", "O", "O", "O", "O", "B-LOC", "I-LOC", "O", "O"]
    return NerExample(toks, tags, "f:1")


@pytest.mark.parametrize("method", ["synonym", "insert", "swap", "delete", "typo"])
def test_augmentation_keeps_ner_tags_aligned_and_entities_intact(tiny_bert, method):
    model, tok = tiny_bert
    syn = Synonyms("auto", model, tok)
    ex = _ner_example()
    for seed in range(10):
        new = edit(ex, method, 0.3, syn, random.Random(seed))
        assert new is not None and len(new.tokens) == len(new.tags)
        ents = [(t, g) for t, g in zip(new.tokens, new.tags) if g != "O"]
        assert ents == [(t, g) for t, g in zip(ex.tokens, ex.tags) if g != "O"]
        for prev, cur in zip(["O", *new.tags], new.tags):  # still valid BIO: no I- after O or another type
            assert not cur.startswith("I-") or prev[2:] == cur[2:]
    assert edit(ex, method, 0.3, syn, random.Random(0)).tokens != ex.tokens


def test_augmented_rows_are_added_to_train_only(tiny_config):
    cfg = {**tiny_config, "augment": {"methods": ["synonym", "swap", "delete", "typo"], "multiplier": 2},
           "train": {**tiny_config["train"], "epochs": 2}}
    run = lmtune.train(cfg)
    assert run.metrics["dev"]["n"] == 32 and run.metrics["test"]["n"] == 32
    log = (run.run_dir / "train.log").read_text()
    added = int(log.split("augmentation: ")[1].split(" new")[0])
    assert 150 <= added <= 192  # 2 per row, less the rows with nothing to edit
    assert run.metrics["train"]["steps"] == 2 * math.ceil((96 + added) / 8)
    with pytest.raises(lmtune.errors.InputError, match="backtranslate"):
        augment([_ner_example()], AugmentConfig(methods=["backtranslate"]))


def test_backtranslation_runs_end_to_end_with_a_tiny_random_marian(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = MarianConfig(vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    for name in ("to", "back"):
        MarianMTModel(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    texts = ["the food was wonderful", "a charming story"]
    out = translate(texts, str(tmp_path / "to"))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    examples = [Example(t, lab, f"f:{i}") for i, (t, lab) in enumerate(zip(texts, ["pos", "neg"]))]
    rows = backtranslate([(ex, None) for ex in examples],
                         AugmentConfig(translate_to=str(tmp_path / "to"), translate_back=str(tmp_path / "back")))
    source = {ex.source: ex for ex in examples}
    assert len(rows) <= 2
    for r in rows:  # the label travels with its row; unchanged or empty round trips are dropped
        assert r.label == source[r.source].label and r.text.strip() and r.text != source[r.source].text


def test_mlm_substitution_with_a_tiny_masked_lm(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    examples = [Example(s, "pos" if i % 2 else "neg", f"f:{i}") for i, s in enumerate(SENTENCES)]
    rows = augment(examples, AugmentConfig(methods=["mlm"], mlm_model=str(tmp_path / "mlm"), prob=0.2))
    assert len(rows) == len(examples)
    for r in rows:
        ex = examples[int(r.source[2:])]
        assert r.label == ex.label and r.text != ex.text
        for _, word in _protected_words(ex):
            assert word in r.text.split()
