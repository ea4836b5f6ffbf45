"""Applications built on lmtune's public API, measured against their baselines in the same process.

retrieval: SQuAD v1.1 dev (the train file is missing), articles split as in bench/qa.py (seeded shuffle:
  30% test articles, a tenth of the rest dev, the other train articles' questions, a seeded sample of
  --train). Queries: questions; corpus: every paragraph of the test articles; a question's relevant
  document is its own paragraph. lmtune: task retrieval on the packaged all-MiniLM-L6-v2 (in-batch + one
  BM25 hard negative per question, max_length 256 as the checkpoint's sentence-transformers config).
  Peers: the same MiniLM un-tuned (mean pooling + normalize, what sentence-transformers runs for it,
  written with transformers here) and BM25 (rank-bm25 BM25Okapi on lowercased words). recall@5 of all three.
recommend: ../shared/data/amazon_scientific (Industrial & Scientific 5-core, the shipped leave-last-out
  split) through `lmtune.apps.recommend`: a two-tower (shared-weight) bi-encoder trained on item -> next
  item pairs of the training part (--rec-max-length 64 tokens per item, in-batch negatives with log-q
  correction, lmtune's default learning rate), early stopping on the valid targets. The user tower is the recency-weighted mean
  of the history items' embeddings; decay and the weight of a log-popularity term are chosen on valid.
  Test: each user's history before the last item ranks all 1,585 items; items already in the history are
  excluded (so the 25 test targets that repeat an earlier purchase count as misses for every system).
  Peers: popularity (interaction counts of the histories) and BM25 (history text as the query over the
  item texts, its number of history items chosen on valid), same exclusion. NDCG@10. Also printed: the
  model without the popularity term, and the un-tuned MiniLM under the same user tower and settings search
  (what the fine-tuning adds).
assistant: ../shared/data/clinc150 (data_full.json). Intent run: classification on train + oos_train (an
  explicit oos class), packaged MiniLM, --assistant-epochs, abstention on the Mahalanobis score with
  target accuracy_loss 0.015 chosen on val + oos_val. FAQ: one answer per intent, generated from its
  name ("Here is how we can help with <intent words>."). Routing accuracy on test + oos_test: an
  in-scope message is right when it gets its intent's answer, an out-of-scope one when it is handed
  off. Latency: `lmtune assistant serve` in its own process, 16 concurrent aiohttp clients sending
  --chat-requests test messages to /v1/chat one at a time; p50/p99 over all requests.

Last line JSON: {"retrieval": {"recall5": R, "recall5_untuned": R, "recall5_bm25": R},
                 "assistant": {"routing_acc": A, "p99_ms": T}, "recommend": {"ndcg10": N, "ndcg10_popularity": N, "ndcg10_bm25": N}}
Usage: python bench/apps.py [--only retrieval,assistant,recommend] [--train 3000] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.config import DEFAULT_MODEL  # noqa: E402
from lmtune.models import quiet_transformers, resolve_model  # noqa: E402
from lmtune.tasks.retrieval import ranking_metrics  # noqa: E402

SEED, MAX_LEN = 42, 256


def squad_split(n_train: int) -> tuple[list, list, list]:
    """(question, paragraph) rows of the train, dev and test articles, split as bench/qa.py splits them."""
    from bench.qa import articles, split
    parts = split(articles([SHARED / "squad" / "dev-v1.1.json"]), n_train)
    return tuple([(q["question"], q["context"]) for q in rows] for rows in parts)


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@torch.inference_mode()
def untuned_embed(model_path: str, texts: list[str], batch: int = 32, max_length: int = MAX_LEN) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 pipeline (Transformer 256 tokens, mean pooling, Normalize)."""
    from transformers import AutoModel, AutoTokenizer
    with quiet_transformers():
        tok, model = AutoTokenizer.from_pretrained(model_path), AutoModel.from_pretrained(model_path).eval()
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    return out


def bm25_scores(corpus: list[str], queries: list[str]) -> np.ndarray:
    from rank_bm25 import BM25Okapi

    from lmtune.bm25 import tokenize
    bm25 = BM25Okapi([tokenize(d) for d in corpus])
    return np.stack([bm25.get_scores(tokenize(q)) for q in queries])


def bench_retrieval(ns: argparse.Namespace, work: Path) -> dict:
    tr, dv, te = squad_split(ns.train)
    corpus = list(dict.fromkeys(p for _, p in te))
    where = {p: i for i, p in enumerate(corpus)}
    queries: dict[str, set[int]] = {}
    for q, p in te:
        queries.setdefault(q, set()).add(where[p])
    qs, rel = list(queries), list(queries.values())
    model = resolve_model(DEFAULT_MODEL)
    t0 = time.perf_counter()
    bm = ranking_metrics(bm25_scores(corpus, qs), rel)
    t_bm25 = time.perf_counter() - t0
    t0 = time.perf_counter()
    untuned = ranking_metrics(untuned_embed(model, qs) @ untuned_embed(model, corpus).T, rel)
    t_untuned = time.perf_counter() - t0
    files = {k: write(work / f"squad_{k}.jsonl", [{"query": q, "document": p} for q, p in rows])
             for k, rows in (("train", tr), ("dev", dv), ("test", te))}
    run = train({"task": "retrieval", "output_dir": str(work / "runs"), "run_name": "retrieval", "model": {"name": model},
                 "data": {**files, "max_length": MAX_LEN},
                 "train": {"epochs": ns.epochs, "batch_size": ns.batch, "seed": SEED, "progress": "none",
                           **({"lr": ns.lr} if ns.lr else {})}})
    t0 = time.perf_counter()
    tuned = ranking_metrics(run.embed(qs) @ run.embed(corpus, documents=True).T, rel)
    t_tuned = time.perf_counter() - t0
    print(f"retrieval (SQuAD, {len(tr)} train questions, {len(qs)} test questions over {len(corpus)} test paragraphs): "
          f"recall@5 lmtune {tuned['recall_5']:.4f} | un-tuned MiniLM {untuned['recall_5']:.4f} "
          f"({100 * (tuned['recall_5'] - untuned['recall_5']):+.1f} points) | "
          f"BM25 {bm['recall_5']:.4f} ({100 * (tuned['recall_5'] - bm['recall_5']):+.1f} points); NDCG@10 {tuned['ndcg_10']:.4f} / "
          f"{untuned['ndcg_10']:.4f} / {bm['ndcg_10']:.4f}; train {run.metrics['train']['train_seconds']:.0f}s, test ranking "
          f"{t_tuned:.1f}s / {t_untuned:.1f}s / {t_bm25:.1f}s", flush=True)
    return {"recall5": round(tuned["recall_5"], 4), "recall5_untuned": round(untuned["recall_5"], 4), "recall5_bm25": round(bm["recall_5"], 4),
            "ndcg10": round(tuned["ndcg_10"], 4), "ndcg10_untuned": round(untuned["ndcg_10"], 4), "ndcg10_bm25": round(bm["ndcg_10"], 4)}


def clinc_files(work: Path) -> dict[str, str]:
    import csv
    data = json.loads((SHARED / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    out = {}
    for name, parts in (("train", ("train", "oos_train")), ("dev", ("val", "oos_val")), ("test", ("test", "oos_test"))):
        path = work / f"clinc_{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(row for part in parts for row in data[part])
        out[name] = str(path)
    intents = sorted({y for _, y in data["train"]})
    faq = work / "clinc_faq.csv"
    with open(faq, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["intent", "answer"])
        w.writerows((y, f"Here is how we can help with {y.replace('_', ' ')}.") for y in intents)
    out["faq"] = str(faq)
    return out


def chat_latency(config: Path, messages: list[str], n: int, clients: int = 16) -> dict:
    import asyncio
    import os
    import subprocess

    import aiohttp

    from bench.serve_load import free_port, wait_ready
    port, key = free_port(), "bench-key-0123456789abcdef"
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", "assistant", "serve", str(config), "--port", str(port)],
                            env={**os.environ, "LMTUNE_API_KEYS": key}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc, "/healthz")
        latencies, errors = [], 0
        counter = iter(range(n))

        async def run() -> float:
            nonlocal errors
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                             timeout=aiohttp.ClientTimeout(total=120)) as client:
                async def worker():
                    nonlocal errors
                    for i in counter:
                        t0 = time.perf_counter()
                        async with client.post(f"http://127.0.0.1:{port}/v1/chat", json={"message": messages[i % len(messages)]},
                                               headers={"Authorization": f"Bearer {key}"}) as r:
                            await r.read()
                            errors += r.status != 200
                        latencies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(clients)))
                return time.perf_counter() - t0
        wall = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(30)
    ms = 1000 * np.array(latencies)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "rps": round(n / wall, 1), "errors": errors}


def bench_assistant(ns: argparse.Namespace, work: Path) -> dict:
    import yaml

    from lmtune.apps import assistant
    files = clinc_files(work)
    t0 = time.perf_counter()
    run = train({"output_dir": str(work / "runs"), "run_name": "intents", "model": {"name": resolve_model(DEFAULT_MODEL)},
                 "data": {"train": files["train"], "dev": files["dev"]},
                 "train": {"epochs": ns.assistant_epochs, "seed": SEED, "progress": "none"},
                 "abstain": {"oos_label": "oos", "score": "mahalanobis", "target": "accuracy_loss", "value": 0.015}})
    train_s = time.perf_counter() - t0
    config = work / "assistant.yaml"
    config.write_text(yaml.safe_dump({"intents": str(run.run_dir), "faq": files["faq"]}), encoding="utf-8")
    result = assistant.Assistant(assistant.load_config(config)).evaluate(files["test"])
    import csv
    with open(files["test"], newline="", encoding="utf-8") as fh:
        msgs = [row["text"] for row in csv.DictReader(fh)]
    lat = chat_latency(config, msgs, ns.chat_requests)
    print(f"assistant (CLINC150: {result['n']} test + oos_test messages; intent run {train_s:.0f}s): routing accuracy "
          f"{result['routing_accuracy']:.4f} (in-scope {result['in_scope_accuracy']:.4f}, out-of-scope handed off "
          f"{result['oos_handoff_recall']:.4f}; routes {result['routes']}) | /v1/chat, 16 concurrent clients, {ns.chat_requests} "
          f"requests: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, {lat['rps']} req/s, {lat['errors']} errors", flush=True)
    return {"routing_acc": round(result["routing_accuracy"], 4), "p99_ms": lat["p99_ms"], "p50_ms": lat["p50_ms"],
            "in_scope_acc": round(result["in_scope_accuracy"], 4), "oos_handoff": round(result["oos_handoff_recall"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="retrieval,assistant,recommend")
    ap.add_argument("--train", type=int, default=3000, help="SQuAD training questions (seeded sample)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--assistant-epochs", type=int, default=3)
    ap.add_argument("--chat-requests", type=int, default=1000)
    ap.add_argument("--rec-epochs", type=int, default=1)
    ap.add_argument("--rec-max-length", type=int, default=64, help="tokens of an item text")
    ap.add_argument("--history-items", type=int, default=20)
    ap.add_argument("--rec-lr", type=float, default=None, help="default: lmtune's (1e-4 for MiniLM's width)")
    ns = ap.parse_args()
    out: dict = {"retrieval": None, "assistant": None, "recommend": None}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.only.split(","):
            torch.manual_seed(SEED)
            out[name] = {"retrieval": bench_retrieval, "assistant": bench_assistant, "recommend": bench_recommend}[name](ns, Path(tmp))
    print(json.dumps(out))


def amazon_files(work: Path) -> tuple[Path, Path]:
    """The RecBole files as the app reads them: items.jsonl {item_id, text} and interactions.tsv
    (user_id, item_id) in each user's order (test history + test target = the whole sequence)."""
    d = SHARED / "amazon_scientific"
    asin = dict(line.split("\t") for line in (d / "Scientific.item2index").read_text(encoding="utf-8").splitlines())
    text = dict(line.split("\t", 1) for line in (d / "Scientific.text").read_text(encoding="utf-8").splitlines()[1:])
    items = work / "items.jsonl"
    write(items, [{"item_id": idx, "text": text[a].strip()} for a, idx in asin.items()])
    rows = ["user_id\titem_id"]
    for line in (d / "Scientific.test.inter").read_text(encoding="utf-8").splitlines()[1:]:
        user, hist, target = line.split("\t")
        rows += [f"{user}\t{i}" for i in (*hist.split(), target)]
    inter = work / "interactions.tsv"
    inter.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return items, inter


def bench_recommend(ns: argparse.Namespace, work: Path) -> dict:
    from lmtune.apps import recommend
    items, inter = amazon_files(work)
    cfg = recommend.RecommendConfig(items=str(items), interactions=str(inter), history_items=ns.history_items,
                                    output_dir=str(work / "runs"), run_name="recommend",
                                    lmtune={"model": {"name": resolve_model(DEFAULT_MODEL)}, "data": {"max_length": ns.rec_max_length},
                                            "train": {"epochs": ns.rec_epochs, "batch_size": ns.batch, "seed": SEED, "progress": "none",
                                                      **({"lr": ns.rec_lr} if ns.rec_lr else {})}})
    t0 = time.perf_counter()
    result = recommend.fit(cfg)
    train_s = time.perf_counter() - t0
    t, chosen = result["test"], result["chosen_on_valid"]
    best = max(t["popularity"]["ndcg_10"], t["bm25"]["ndcg_10"])
    untuned = untuned_recommend(cfg, ns.rec_max_length)
    print(f"recommend (Amazon Scientific, {result['split']['users']} users, {result['split']['items']} items, "
          f"{result['split']['train_pairs']} train pairs; {result['split']['repeat_targets_unreachable']} repeat targets excluded): NDCG@10 "
          f"lmtune {t['model']['ndcg_10']:.4f} | popularity {t['popularity']['ndcg_10']:.4f} | BM25 {t['bm25']['ndcg_10']:.4f} "
          f"({chosen['bm25_history_items']} history items, chosen on valid) | vs the better baseline "
          f"{100 * (t['model']['ndcg_10'] / best - 1):+.1f}% relative; recall@10 {t['model']['recall_10']:.4f} / "
          f"{t['popularity']['recall_10']:.4f} / {t['bm25']['recall_10']:.4f}; {train_s:.0f}s", flush=True)
    print(f"  chosen on valid: decay {chosen['decay']}, popularity weight {chosen['popularity_weight']} (valid NDCG@10 "
          f"{chosen['valid_ndcg_10']:.4f}); lmtune without the popularity term {t['model_without_popularity']['ndcg_10']:.4f}; "
          f"un-tuned MiniLM with the same user tower and settings search {untuned['ndcg_10']:.4f} "
          f"(decay {untuned['decay']}, popularity weight {untuned['popularity_weight']})", flush=True)
    return {"ndcg10": round(t["model"]["ndcg_10"], 4), "ndcg10_popularity": round(t["popularity"]["ndcg_10"], 4),
            "ndcg10_bm25": round(t["bm25"]["ndcg_10"], 4), "recall10": round(t["model"]["recall_10"], 4),
            "ndcg10_without_popularity": round(t["model_without_popularity"]["ndcg_10"], 4),
            "ndcg10_untuned": round(untuned["ndcg_10"], 4), "train_s": round(train_s, 1)}


def untuned_recommend(cfg, max_length: int) -> dict:
    """The pretrained MiniLM as the item tower, with the app's user tower and its valid-chosen settings: test NDCG@10."""
    from lmtune.apps import recommend
    items = recommend.read_items(cfg)
    split = recommend.leave_last_out(recommend.read_sequences(cfg, items))
    ids = list(items)
    emb = untuned_embed(resolve_model(DEFAULT_MODEL), [items[x] for x in ids], max_length=max_length).astype(np.float64)
    count = recommend.log_counts(split, ids)
    ranker, _ = recommend.choose_ranker(cfg, split.valid, emb, ids, count)
    hist, targets = zip(*split.test.values())
    top = recommend.top_items(ranker.scores(list(hist), emb, ids, count, cfg.history_items), ids, [set(h) for h in hist])
    return {**recommend.metrics_at(top, list(targets)), "decay": ranker.decay, "popularity_weight": ranker.popularity_weight}


if __name__ == "__main__":
    main()
