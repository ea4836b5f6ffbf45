"""The embedded documents a retrieval run ranks queries against, saved in RUN/index/:
documents.jsonl ({"text", "id"?} per line) and embeddings.safetensors (unit-length float32 rows).

Search is an exact dot product with numpy: for the corpora this tool targets (FAQ answers, a few
hundred thousand passages at most) one matrix product per batch of queries is milliseconds to
a second on CPU and needs no approximate index to tune.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmtune.errors import InputError
from lmtune.io import atomic_dir

FOLDER = "index"


@dataclass
class Index:
    texts: list[str]
    ids: list[str] | None
    embeddings: np.ndarray  # [documents, hidden], unit rows

    def search(self, queries: np.ndarray, k: int = 10, exclude: list[set[int]] | None = None) -> list[list[tuple[int, float]]]:
        """The k best (document index, cosine) per query row, best first; `exclude` drops documents per query
        (e.g. the items a user already has)."""
        scores = np.asarray(queries, dtype=np.float32) @ self.embeddings.T
        if exclude:
            for i, skip in enumerate(exclude):
                if skip:
                    scores[i, list(skip)] = -np.inf
        k = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(int(j), float(scores[i, j])) for j in row if np.isfinite(scores[i, j])] for i, row in enumerate(top)]

    def rows(self, hits: list[tuple[int, float]]) -> list[dict]:
        return [{"document": self.texts[j], "score": round(s, 6), **({"id": self.ids[j]} if self.ids else {})} for j, s in hits]

    def save(self, run_dir: Path) -> None:
        from safetensors.numpy import save_file
        with atomic_dir(run_dir / FOLDER) as tmp:
            save_file({"embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32)}, tmp / "embeddings.safetensors")
            with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
                for i, t in enumerate(self.texts):
                    f.write(json.dumps({"text": t, **({"id": self.ids[i]} if self.ids else {})}, ensure_ascii=False) + "\n")


def load_index(run_dir: Path) -> Index | None:
    folder = Path(run_dir) / FOLDER
    if not (folder / "embeddings.safetensors").is_file():
        return None
    from safetensors.numpy import load_file
    emb = load_file(folder / "embeddings.safetensors")["embeddings"]
    rows = [json.loads(line) for line in (folder / "documents.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if len(rows) != len(emb):
        raise InputError(f"{folder}: {len(rows)} documents but {len(emb)} embeddings; rebuild it with `lmtune search RUN --corpus FILE`.")
    ids = [str(r["id"]) for r in rows] if rows and "id" in rows[0] else None
    return Index([r["text"] for r in rows], ids, emb)
