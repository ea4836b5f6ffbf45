"""The recommendation app end to end: config, leave-last-out split, a two-tower run on a tiny encoder,
ranking with the history excluded, the baselines, recommend.json and `lmtune recommend rank`."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmtune.apps import recommend
from lmtune.cli import main
from lmtune.errors import InputError
from tests.test_retrieval import tiny_encoder  # noqa: F401  (the fixture)

# each theme's items are named with one of two words, so the text of a history (one word) and of the next item
# (often the other) do not always share a word: BM25 alone cannot rank them, a learned encoder can
THEMES = [("camera", "photo"), ("drill", "screwdriver"), ("flask", "beaker"), ("glove", "mitten"),
          ("cable", "wire"), ("lamp", "bulb")]


def _files(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    items = [{"item_id": f"{t}-{k}", "text": f"{rng.choice(words)} model {k}"} for t, words in enumerate(THEMES) for k in range(8)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    rows = ["user_id\titem_id"]
    for u in range(120):
        theme = u % len(THEMES)
        for k in rng.sample(range(8), 5):
            rows.append(f"u{u}\t{theme}-{k}")
    (tmp_path / "interactions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path / "items.jsonl", tmp_path / "interactions.tsv"


def test_leave_last_out_split():
    split = recommend.leave_last_out({"a": ["1", "2", "3", "4", "5"], "b": ["1", "2"], "c": ["7", "8", "9"]})
    assert split.test == {"a": (["1", "2", "3", "4"], "5"), "c": (["7", "8"], "9")}
    assert split.valid == [(["1", "2", "3"], "4"), (["7"], "8")]
    assert split.train == [(["1"], "2"), (["1", "2"], "3")]  # c has no training pair: its first item is never a target
    assert recommend.history_text(["1", "2", "3"], {"1": "a", "2": "b", "3": "c"}, 2) == "c | b"


def test_user_vector_weights_the_newest_items_first():
    emb = np.eye(4)
    ids = ["a", "b", "c", "d"]
    assert recommend.user_vectors([["a", "b", "c"]], emb, ids, 0.0, 20).tolist() == [[0, 0, 1, 0]]  # the newest alone
    assert np.allclose(recommend.user_vectors([["a", "b", "c"]], emb, ids, 1.0, 20), [[1 / 3, 1 / 3, 1 / 3, 0]])
    assert np.allclose(recommend.user_vectors([["a", "b", "c"]], emb, ids, 0.5, 2), [[0, 1 / 3, 2 / 3, 0]])  # n=2: a is cut


def test_choose_ranker_adds_popularity_only_when_valid_says_so():
    """Item embeddings that carry nothing (orthogonal), targets that are the popular items: the
    popularity weight chosen on valid is positive; a config that fixes the settings is obeyed."""
    ids = [str(i) for i in range(30)]
    emb = np.eye(30)
    rng = random.Random(0)
    valid = [([str(rng.randrange(20)) for _ in range(3)], str(rng.randrange(27, 30))) for _ in range(50)]
    log_count = np.log1p(np.array([100.0 if i >= 27 else 1.0 for i in range(30)]))  # the last ids: a tie-break never finds them
    cfg = recommend.RecommendConfig(items="x", interactions="y")
    ranker, score = recommend.choose_ranker(cfg, valid, emb, ids, log_count)
    assert ranker.popularity_weight > 0 and score > 0.5
    cfg.decay, cfg.popularity_weight = 0.3, 0.0
    fixed, fixed_score = recommend.choose_ranker(cfg, valid, emb, ids, log_count)
    assert (fixed.decay, fixed.popularity_weight) == (0.3, 0.0) and fixed_score < score


def test_recommend_fit_and_rank(tmp_path, tiny_encoder, capsys):  # noqa: F811
    items, inter = _files(tmp_path)
    conf = tmp_path / "rec.yaml"
    conf.write_text(yaml.safe_dump({
        "items": items.name, "interactions": inter.name, "history_items": 4, "output_dir": str(tmp_path / "runs"), "run_name": "rec",
        "lmtune": {"model": {"name": tiny_encoder}, "data": {"max_length": 32},
                   "train": {"epochs": 4, "batch_size": 16, "lr": 1e-3, "progress": "none", "seed": 1}}}), encoding="utf-8")
    assert main(["recommend", "fit", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "test model: ndcg_10" in out and "test bm25: ndcg_10" in out
    result = json.loads((tmp_path / "runs" / "rec" / "recommend.json").read_text())
    assert result["split"] == {"users": 120, "items": 48, "train_pairs": 240, "valid": 120, "test": 120,
                               "repeat_targets_unreachable": 0}
    t = result["test"]
    assert t["model"]["ndcg_10"] > t["popularity"]["ndcg_10"] + 0.2  # popularity knows no themes
    assert t["model_without_popularity"]["recall_10"] >= 0.8
    chosen = result["chosen_on_valid"]
    assert chosen["decay"] in recommend.DECAYS and chosen["popularity_weight"] in recommend.POPULARITY_WEIGHTS
    assert chosen["bm25_history_items"] in recommend.BM25_HISTORIES
    assert t["model"]["recall_10"] >= 0.8  # 8 items per theme, 4 in the history: the other 4 fill the top 10
    rows = [json.loads(x) for x in (tmp_path / "runs" / "rec" / "recommend_test.jsonl").read_text().splitlines()]
    seqs = recommend.read_sequences(recommend.load_config(conf), recommend.read_items(recommend.load_config(conf)))
    for r in rows:
        assert not set(r["top"]) & set(seqs[r["user"]][:-1])  # never an item the user already has

    assert main(["recommend", "rank", str(tmp_path / "runs" / "rec"), "--user", "u0", "--k", "3"]) == 0
    top = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(top) == 3 and all(r["item_id"].startswith("0-") for r in top)
    assert not {r["item_id"] for r in top} & set(seqs["u0"])
    by_history = recommend.rank(tmp_path / "runs" / "rec", history=["2-0", "2-1"], k=2)
    assert [r["item_id"][:2] for r in by_history] == ["2-", "2-"]
    assert by_history[0]["score"] >= by_history[1]["score"]


def test_recommend_bad_inputs(tmp_path):
    items, inter = _files(tmp_path)
    conf = tmp_path / "rec.yaml"
    conf.write_text(yaml.safe_dump({"items": items.name, "interactions": inter.name, "histroy_items": 3}), encoding="utf-8")
    with pytest.raises(InputError, match="unknown key"):
        recommend.load_config(conf)
    inter.write_text("user_id\titem_id\nu1\t0-1\nu1\tnope\n", encoding="utf-8")
    conf.write_text(yaml.safe_dump({"items": items.name, "interactions": inter.name}), encoding="utf-8")
    cfg = recommend.load_config(conf)
    with pytest.raises(InputError, match=r"interactions.tsv: line 3: item nope is not in"):
        recommend.read_sequences(cfg, recommend.read_items(cfg))
    assert main(["recommend", "rank", str(tmp_path), "--user", "u1"]) == 2
