"""The first batch without a trained run: the pool's most representative rows (k-means on a sentence encoder's
embeddings, the row nearest each centroid) with zero-shot suggestions (the label whose name's embedding is most
cosine-similar to the text's). The encoder is the packaged MiniLM by default, a sentence-embedding model: its
mean-pooled, unit-length output is what it was trained to give (sentence-transformers' recipe for it)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lmtune.active.files import EXTENSIONS, write_batch
from lmtune.errors import InputError
from lmtune.io import write_json

ZERO_SHOT_TEMPERATURE = 0.05  # softmax over the cosines (SimCSE's and CLIP's scale): a ranking, not a calibrated probability


@torch.inference_mode()
def sentence_embeddings(model_name: str, texts: list[str], max_length: int = 128, batch: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states, normalised to unit length."""
    from transformers import AutoModel

    from lmtune.models import load_tokenizer, quiet_transformers, resolve_model
    with quiet_transformers():
        model = AutoModel.from_pretrained(resolve_model(model_name)).eval()
    tokenizer = load_tokenizer(model_name)
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def representatives(emb: np.ndarray, k: int, seed: int) -> list[tuple[int, float]]:
    """The row nearest each k-means centroid (scikit-learn's KMeans), and the share of the pool its cluster holds,
    largest cluster first."""
    from sklearn.cluster import KMeans
    k = min(k, len(emb))
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(emb)
    dist = km.transform(emb)
    sizes = np.bincount(km.labels_, minlength=k)
    picks, taken = [], set()
    for c in np.argsort(-sizes, kind="stable"):
        i = next(int(j) for j in np.argsort(dist[:, c], kind="stable") if int(j) not in taken)
        taken.add(i)
        picks.append((i, float(sizes[c] / len(emb))))
    return picks


def cold_start(source: str, pool: str | Path, batch: int, labels: list[str], fmt: str = "csv",
               out: str | Path | None = None, seed: int = 0) -> dict:
    """Write the first batch to label (default: beside the pool, POOL.cold-batch.EXT) and its record
    (OUT.active.json). source: a config file (its model.name and data columns) or a model name / folder."""
    from lmtune.config import DEFAULT_MODEL, load_config
    from lmtune.data.readers import read_examples
    if batch < 1:
        raise InputError(f"--batch {batch}: give the number of rows to label (1 or more).")
    if len(set(labels)) < 2:
        raise InputError("--labels: give two or more label names, comma-separated (label --cold suggests one of them).")
    text_column, pair_column, model = "text", None, source or DEFAULT_MODEL
    if source and source.endswith((".yaml", ".yml")):
        cfg = load_config(source)
        text_column, pair_column, model = cfg.data.text_column, cfg.data.text_pair_column, cfg.model.name
    examples = read_examples(str(pool), text_column, None, pair_column, require_label=False)
    pool = Path(pool)
    path = Path(out) if out else pool.with_name(f"{pool.stem}.cold-batch{EXTENSIONS[fmt]}")
    if path.exists():
        raise InputError(f"{path}: already exists; give another --out (label never overwrites a file).")
    emb = sentence_embeddings(model, [ex.text for ex in examples])
    cos = emb @ sentence_embeddings(model, labels).T
    probs = torch.softmax(torch.from_numpy(cos) / ZERO_SHOT_TEMPERATURE, -1).numpy()
    rows = []
    for rank, (i, share) in enumerate(representatives(emb, batch, seed), 1):
        ex, line = examples[i], examples[i].source.rpartition(":")[2]
        rows.append({"rank": rank, "line": int(line) if line.isdigit() else None, "source": ex.source, "text": ex.text,
                     "text_pair": ex.text_pair, "suggestion": labels[int(probs[i].argmax())],
                     "confidence": round(float(probs[i].max()), 6), "score": round(share, 6), "label": ""})
    files = write_batch(rows, path, fmt, labels, True, ",", f"zero-shot:{model}")
    record = {"cold": True, "model": model, "labels": labels, "strategy": "kmeans", "size": len(rows), "seed": seed,
              "pool": str(pool.resolve()), "pool_rows": len(examples), "file": str(path.resolve()),
              "files": [str(f.resolve()) for f in files], "format": fmt, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rows": rows}
    write_json(path.with_name(path.name + ".active.json"), record)
    return record


def to_train_file(labeled: str | Path, out: str | Path, labels: list[str] | None) -> int:
    """A labeled batch (ours or a Label Studio export) as a train file (text, label[, text_pair] CSV) to train a
    first run on; labels: the allowed ones (None: any). Returns the rows written."""
    import csv
    import io

    from lmtune.active.files import read_labeled
    from lmtune.io import write_text
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; give another --train-out (label never overwrites a file).")
    items, _ = read_labeled(labeled, labels, exclusive=True)
    pairs = any(it.text_pair is not None for it in items)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"] + (["text_pair"] if pairs else []))
    for it in items:
        w.writerow([it.text, it.labels[0]] + ([it.text_pair or ""] if pairs else []))
    write_text(out, buf.getvalue())
    return len(items)
