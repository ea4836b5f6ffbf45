"""task retrieval: the bi-encoder loss and its masking, the ranking metrics, BM25 against rank-bm25,
a full run that learns a toy FAQ mapping, its index, `lmtune search` and predict."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, BertModel

import lmtune
from lmtune.bm25 import BM25, tokenize
from lmtune.cli import main
from lmtune.config import DEFAULT_MODEL, build_config
from lmtune.errors import InputError
from lmtune.models import resolve_model
from lmtune.tasks import get_task
from lmtune.tasks.retrieval import RetrievalExample, mine_negatives, ranking_metrics

# a query word maps to a document word it never appears with: lexical overlap cannot solve it, learning must
TOPICS = [("password", "credentials"), ("refund", "reimbursement"), ("delivery", "shipping"), ("invoice", "billing"),
          ("login", "signin"), ("cancel", "termination"), ("upgrade", "premium"), ("address", "location"),
          ("discount", "coupon"), ("warranty", "guarantee"), ("battery", "charging"), ("screen", "display")]
FILL = ["how", "do", "i", "my", "the", "can", "you", "help", "with", "please", "what", "is", "about", "a"]


def faq_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, d = TOPICS[i % len(TOPICS)]
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), q)
        out.append({"query": " ".join(words), "document": f"our answer on {d} for customers"})
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _cfg(tmp_path: Path, model: str, **extra) -> dict:
    data = {"train": _write(tmp_path / "train.jsonl", faq_rows(240, 1)), "dev": _write(tmp_path / "dev.jsonl", faq_rows(48, 2)),
            "test": _write(tmp_path / "test.jsonl", faq_rows(48, 3)), "max_length": 32}
    return {"task": "retrieval", "output_dir": str(tmp_path / "runs"), "run_name": "r", "data": data, "model": {"name": model},
            "train": {"epochs": 6, "batch_size": 8, "lr": 1e-3, "progress": "none", "seed": 1}, **extra}


def test_bm25_scores_equal_rank_bm25():
    from rank_bm25 import BM25Okapi
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    docs = [[rng.choice(words) for _ in range(rng.randint(1, 30))] for _ in range(300)]
    queries = [[rng.choice(words) for _ in range(rng.randint(1, 5))] for _ in range(40)] + [["w1", "w1", "unseen"]]
    ref = np.array([BM25Okapi(docs).get_scores(q) for q in queries])
    assert np.allclose(BM25(docs).scores(queries), ref, atol=1e-9)
    assert (BM25(docs).top(queries, 3)[:, 0] == ref.argmax(1)).mean() > 0.95  # ties may order differently
    assert tokenize("Hello, World 42 中文") == ["hello", "world", "42", "中", "文"]


def test_mined_negatives_are_never_relevant_to_their_query():
    train = [RetrievalExample("reset password", "password reset steps", "f:1"),
             RetrievalExample("reset password", "password help page", "f:2"),  # a second relevant document
             RetrievalExample("refund money", "refund policy money back", "f:3"),
             RetrievalExample("ship parcel", "parcel shipping times", "f:4")]
    assert mine_negatives(train, 1) == 4
    for ex in train:
        relevant = {e.label for e in train if e.text == ex.text}
        assert ex.negatives and not set(ex.negatives) & relevant
    assert train[0].negatives == ["refund policy money back"] or train[0].negatives[0] not in relevant


def test_ranking_metrics_by_hand():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9], [0.5, 0.9, 0.1]])
    m = ranking_metrics(scores, [{0}, {1}, {0, 1}])
    assert m["recall_1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["mrr_10"] == pytest.approx((1 + 0.5 + 1) / 3)
    ndcg_2 = (1 / np.log2(3)) / 1  # relevant at rank 2 of one relevant
    assert m["ndcg_10"] == pytest.approx((1 + ndcg_2 + 1) / 3)
    assert m["recall_5"] == 1.0


def test_loss_masks_a_shared_document_and_equals_the_cross_entropy_by_hand(tiny_encoder):
    task = get_task("retrieval")
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    model = BertModel.from_pretrained(tiny_encoder)
    examples = [RetrievalExample("reset my password", "password steps", "f:1", negatives=["refund rules"]),
                RetrievalExample("forgot password", "password steps", "f:2"),  # the same document as row 1
                RetrievalExample("money back", "refund rules", "f:3")]
    enc = task.encode(examples, tok, 32)
    assert task.collate(enc.features, tok)["labels"].shape == (3 + 2 + 1, 4)  # outside training a document is embedded once
    batch = task.collate(task.train_features(enc), tok)
    assert batch["labels"].shape == (3 + 3 + 1, 4)
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    losses = task.example_losses(out, batch)
    # by hand: rows 0-2 queries, 3-5 positives, 6 the negative (the same text as row 5's document)
    emb = F.normalize((out.last_hidden_state * batch["attention_mask"].unsqueeze(-1)).sum(1)
                      / batch["attention_mask"].sum(1, keepdim=True), dim=-1)
    s = 20 * emb[:3] @ emb[3:].T
    want = [F.cross_entropy(s[0, [0, 2, 3]].unsqueeze(0), torch.tensor([0])),  # its twin's copy (column 1) masked
            F.cross_entropy(s[1, [1, 2, 3]].unsqueeze(0), torch.tensor([0])),  # likewise column 0
            F.cross_entropy(s[2, [0, 1, 2]].unsqueeze(0), torch.tensor([2]))]  # the negative is its own document: masked
    assert torch.allclose(losses, torch.stack(want), atol=1e-5)
    assert task.loss(out, batch).item() == pytest.approx(losses.sum().item(), rel=1e-6)


def test_logq_correction_adds_minus_log_frequency_to_each_positive_column(tiny_encoder):
    """retrieval.logq_correction: a document that is the positive of 2 of 3 training queries gets -log(2/3)
    added to its in-batch logit, one that is positive once -log(1/3); mined negatives get nothing."""
    from lmtune.config import Config
    task = get_task("retrieval")
    cfg = Config(task="retrieval")
    cfg.retrieval.logq_correction, cfg.retrieval.hard_negatives = True, 0
    train = [RetrievalExample("reset my password", "password steps", "f:1", negatives=["refund rules"]),
             RetrievalExample("forgot password", "password steps", "f:2"),
             RetrievalExample("money back", "refund rules", "f:3")]
    counts = {"password steps": 2, "refund rules": 1}
    task._neg_log_q = {d: math.log(3 / n) for d, n in counts.items()}  # what read() sets from the train split
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    model = BertModel.from_pretrained(tiny_encoder)
    batch = task.collate(task.train_features(task.encode(train, tok, 32)), tok)
    assert batch["labels"][:, 3].tolist() == [0, 0, 0, round(1000 * math.log(1.5)), round(1000 * math.log(1.5)),
                                              round(1000 * math.log(3)), 0]
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    emb = F.normalize((out.last_hidden_state * batch["attention_mask"].unsqueeze(-1)).sum(1)
                      / batch["attention_mask"].sum(1, keepdim=True), dim=-1)
    s = 20 * emb[:3] @ emb[3:].T + torch.tensor([math.log(1.5), math.log(1.5), math.log(3), 0.0], dtype=emb.dtype)
    want = [F.cross_entropy(s[0, [0, 2, 3]].unsqueeze(0), torch.tensor([0])),
            F.cross_entropy(s[1, [1, 2, 3]].unsqueeze(0), torch.tensor([0])),
            F.cross_entropy(s[2, [0, 1, 2]].unsqueeze(0), torch.tensor([2]))]
    assert torch.allclose(task.example_losses(out, batch), torch.stack(want), atol=1e-3)  # -log q travels in 1/1000ths


def test_a_corpus_with_ids_keeps_two_items_that_share_a_text(tmp_path):
    from lmtune.config import Config
    from lmtune.tasks.retrieval import read_corpus
    f = tmp_path / "items.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [{"item_id": "a", "text": "red mug"}, {"item_id": "b", "text": "red mug"},
                                                       {"item_id": "a", "text": "blue mug"}]), encoding="utf-8")
    assert read_corpus(str(f), "text", "item_id", Config(task="retrieval")) == [{"text": "red mug", "id": "a"},
                                                                                   {"text": "red mug", "id": "b"}]
    assert read_corpus(str(f), "text", None, Config(task="retrieval")) == [{"text": "red mug"}, {"text": "blue mug"}]


def test_retrieval_run_learns_and_searches_its_index(tmp_path, tiny_encoder, capsys):
    untrained = get_task("retrieval")
    cfg = build_config(_cfg(tmp_path, tiny_encoder))
    splits = untrained.read(cfg)
    assert splits.info["hard_negatives"]["mined"] == 240
    run = lmtune.train(_cfg(tmp_path, tiny_encoder))
    m = run.metrics["test"]
    assert m["ndcg_10"] >= 0.9 and m["recall_1"] >= 0.8 and m["documents"] == 12 and m["n"] == 48
    assert run.metrics["dev"]["ndcg_10"] > run.metrics["dev"]["recall_1"] - 1e-9
    assert (run.run_dir / "index" / "documents.jsonl").is_file()
    hits = run.search(["what about my refund please", "the screen is dark"], k=3)
    assert hits[0][0]["document"] == "our answer on reimbursement for customers"
    assert hits[1][0]["document"] == "our answer on display for customers"
    assert len(hits[0]) == 3 and hits[0][0]["score"] >= hits[0][1]["score"]
    assert "### Retrieval" in (run.run_dir / "report.md").read_text()
    rows = [json.loads(x) for x in (run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert rows[0]["gold_rank"] >= 1 and rows[0]["results"][0]["document"]

    # reload: the same ranking from the saved model and index; predict ranks against the index
    again = lmtune.load(run.run_dir)
    assert again.search(["what about my refund please"], k=3)[0] == hits[0]
    assert again.predict(["please cancel it"])[0]["results"][0]["document"] == "our answer on termination for customers"

    # a new corpus with ids, through the CLI
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("doc_id,text\nA,our answer on coupon for customers\nB,our answer on shipping for customers\n", encoding="utf-8")
    again.config.retrieval.corpus_id_column = "doc_id"
    assert again.build_index(str(corpus)) == 2
    assert lmtune.load(run.run_dir).search("any discount for me", k=1)[0][0]["id"] == "A"
    assert main(["search", str(run.run_dir), "--query", "any discount for me", "--k", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["query"] == "any discount for me" and line["results"][0]["id"] == "A" and len(line["results"]) == 2


def test_lora_on_a_bare_encoder_trains_no_head(tmp_path, tiny_encoder):
    from lmtune.peft import head_modules
    assert head_modules(BertModel.from_pretrained(tiny_encoder)) == []
    run = lmtune.train(_cfg(tmp_path, tiny_encoder, peft={"method": "lora", "r": 4}))
    assert run.metrics["test"]["ndcg_10"] > 0
    assert lmtune.load(run.run_dir).search("refund please", k=1)[0]


def test_bad_inputs_are_line_numbered_errors(tmp_path, tiny_encoder):
    cfg = _cfg(tmp_path, tiny_encoder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "document": "b"}\n{"query": "c"}\n', encoding="utf-8")
    cfg["data"]["train"] = str(bad)
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: no column 'document'"):
        get_task("retrieval").read(build_config(cfg))
    negs = tmp_path / "negs.jsonl"
    negs.write_text('{"query": "a", "document": "b", "neg": "x"}\n{"query": "c", "document": "d", "neg": "[1, 2"}\n', encoding="utf-8")
    cfg = _cfg(tmp_path, tiny_encoder, retrieval={"negative_column": "neg"})
    cfg["data"]["train"] = str(negs)
    with pytest.raises(InputError, match=r"negs.jsonl: line 2: 'neg' starts with '\[' but is not a JSON list"):
        get_task("retrieval").read(build_config(cfg))
    cfg = _cfg(tmp_path, tiny_encoder, retrieval={"corpus": str(tmp_path / "missing.csv")})
    with pytest.raises(InputError):
        get_task("retrieval").read(build_config(cfg))
    assert main(["search", str(tmp_path), "--k", "2"]) == 2


def test_search_over_http(tmp_path, tiny_encoder, monkeypatch):
    from fastapi.testclient import TestClient

    from lmtune.serve.app import ServeSettings, create_app
    run = lmtune.train(_cfg(tmp_path, tiny_encoder))
    monkeypatch.setenv("LMTUNE_API_KEYS", "test-key-0123456789abcdef")
    with TestClient(create_app(ServeSettings(run_dir=str(run.run_dir), backend="torch"))) as c:
        assert c.post("/v1/predict", json={"texts": ["refund please"]}).status_code == 401
        r = c.post("/v1/predict", json={"texts": ["what about my refund please"]},
                   headers={"Authorization": "Bearer test-key-0123456789abcdef"})
    assert r.status_code == 200, r.text
    results = r.json()["predictions"][0]["results"]
    assert results[0]["document"] == "our answer on reimbursement for customers" and len(results) == 10


def test_a_bare_encoder_has_no_head_learning_rate(tiny_encoder):
    from lmtune.config import TrainConfig
    from lmtune.training.optim import param_groups
    groups = param_groups(BertModel.from_pretrained(tiny_encoder), TrainConfig(lr=1e-4, head_lr=1e-3))
    assert {g["lr"] for g in groups} == {1e-4}  # every weight is pretrained: none gets the head's 10x


PREFERRED = {f"our answer on {d} for customers" for _, d in TOPICS[:6]}  # what the test pair run learns to call relevant


def train_pair_run(tmp_path: Path, model: str) -> lmtune.Run:
    """A real pair run (classification on text_pair) with a preference a tiny random encoder learns in
    seconds: (query, document) is "1" when the document is one of the first six topics' answers,
    whatever the query. So a reranker built on it must lift those documents over the index's order."""
    rng = random.Random(4)
    docs = [f"our answer on {d} for customers" for _, d in TOPICS]

    def pair_rows(rows):
        return [{"a": r["query"], "b": doc, "relevant": "1" if doc in PREFERRED else "0"}
                for r in rows for doc in rng.sample(docs, 2)]
    return lmtune.train({"output_dir": str(tmp_path / "runs"), "run_name": "pairs", "model": {"name": model},
                         "data": {"train": _write(tmp_path / "ptrain.jsonl", pair_rows(faq_rows(240, 5))),
                                  "dev": _write(tmp_path / "pdev.jsonl", pair_rows(faq_rows(48, 6))),
                                  "test": _write(tmp_path / "ptest.jsonl", pair_rows(faq_rows(48, 7))),
                                  "text_column": "a", "text_pair_column": "b", "label_column": "relevant", "max_length": 32},
                         "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "head_lr": 3e-3, "progress": "none", "seed": 1}})


def test_a_pair_run_reranks_the_index_candidates(tmp_path, tiny_encoder, capsys):
    """Retrieve then rerank: the index proposes its 12 best, a pair run re-orders them. The result is
    the same candidates in the pair run's own order (its probabilities, sorted), so the documents it
    prefers come first whatever the index said; the CLI and the errors say the same."""
    run = lmtune.train(_cfg(tmp_path, tiny_encoder))
    pairs = train_pair_run(tmp_path, tiny_encoder)
    assert pairs.metrics["test"]["accuracy"] >= 0.95
    queries = [r["query"] for r in faq_rows(24, 3)]
    plain = run.search(queries, k=12)
    reranked = run.search(queries, k=6, reranker=pairs, depth=12)
    assert any(r["document"] not in PREFERRED for hits in plain for r in hits[:6])
    for q, before, after in zip(queries, plain, reranked):
        assert len(after) == 6 and {r["document"] for r in after} <= {r["document"] for r in before}
        assert {r["document"] for r in after} == PREFERRED  # the pair run's six preferred, out of the index's twelve
        probs = [p["probabilities"]["1"] for p in pairs.predict([(q, r["document"]) for r in after])]
        assert [r["rerank_score"] for r in after] == pytest.approx(probs, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
        assert all("score" in r for r in after)  # the bi-encoder's score is kept
    assert pairs.relevance([]) == []

    assert main(["search", str(run.run_dir), "--query", queries[0], "--k", "2", "--reranker", str(pairs.run_dir),
                 "--rerank-depth", "12"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["results"]) == 2 and all(r["document"] in PREFERRED for r in line["results"])
    with pytest.raises(InputError, match="does not support rerank"):
        run.search(queries[:1], reranker=run)
    with pytest.raises(InputError, match="is not one of the pair run's labels"):
        run.search(queries[:1], reranker=pairs, rerank_label="yes")
