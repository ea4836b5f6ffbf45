"""Drift: does new data (a file, or live traffic in `lmtune serve`) differ from what the model was
trained on, and how?

Four views, each with its own test: label shift (chi-squared on the label counts), input shift
(MMD between the fine-tuned encoder's mean-pooled embeddings, permutation p-value; a domain
classifier's cross-validated AUC as the effect size), confidence shift (top-probability and
abstention rates, Mann-Whitney U) and vocabulary/length shift (unseen words, unknown tokens,
truncation, length). `lmtune drift RUN_DIR --data FILE` writes RUN_DIR/drift.json and a report
section; the serve monitor keeps a rolling window of request embeddings and confidences against the
reference training saves beside the model (RUN_DIR/drift_reference.safetensors: dev embeddings and scores).
"""
from __future__ import annotations

import collections
import functools
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.errors import InputError
from lmtune.tasks.base import encode_examples
from lmtune.training.batching import eval_batches
from lmtune.training.loop import inputs

log = logging.getLogger("lmtune")

REFERENCE = "drift_reference.safetensors"
REFERENCE_SIZE = 500  # dev examples whose embeddings and scores are saved with the model
_WORD = re.compile(r"[\u4e00-\u9fff]|\w+", re.UNICODE)  # a CJK character or a run of word characters

ADVICE = {
    "label_shift": "The label mix differs from training: check whether the new data covers new classes or a new "
                   "population; recalibrate abstention on recent labeled data, or continue training (--from) with it.",
    "input_shift": "The inputs look different to the model: label a sample of the new data and evaluate on it; if accuracy "
                   "dropped, continue fine-tuning from this run (lmtune train CONFIG --from RUN_DIR) with replay.",
    "confidence_shift": "The model is less sure (or abstains more) on the new data: expect lower accuracy; review abstained "
                        "inputs for new intents or topics.",
    "vocabulary_shift": "Many words never seen in training (or much longer texts): consider domain-adaptive pretraining "
                        "(lmtune pretrain) on unlabeled new text, or raise data.max_length if truncation grew.",
}


# ---- embeddings ------------------------------------------------------------------------------
@torch.inference_mode()
def embed(model: Any, task: Any, tokenizer: Any, cfg: Any, labels: list[str], examples: list) -> np.ndarray:
    """Mean-pooled last hidden state of the (fine-tuned) encoder, one row per example (a windowed
    example's windows averaged). Needs the torch model: an ONNX session exports logits only."""
    if not isinstance(model, torch.nn.Module):
        raise InputError("drift: the input-shift test needs the run's torch model; use the torch backend.")
    enc = encode_examples(task, examples, tokenizer, cfg, labels)
    collate = functools.partial(task.collate, tokenizer=tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pooled: list = [None] * len(enc.features)
    for idx in eval_batches(enc.lengths, 1024, 32):
        batch = {k: t.to(device) for k, t in collate([enc.features[i] for i in idx]).items()}
        states = getattr(model(**inputs(batch), output_hidden_states=True), "hidden_states", None)
        if not states:
            raise InputError("drift: this model returns no hidden states, so its inputs cannot be embedded for the "
                             "input-shift test.")
        hidden = states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        hidden = hidden[:, -mask.shape[1]:]  # prompt tuning prepends virtual tokens the mask does not cover
        vecs = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
        for i, v in zip(idx, vecs):
            pooled[i] = v
    model.train(was_training)
    per_example = enc.windows()
    index = {id(f): k for k, f in enumerate(enc.features)}
    return np.stack([np.mean([pooled[index[id(f)]] for f in fs], 0) for fs in per_example]).astype(np.float32)


# ---- tests -----------------------------------------------------------------------------------
def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 500, seed: int = 0) -> dict:
    """Two-sample test on embeddings: squared MMD with a Gaussian kernel (bandwidth: the median
    pairwise distance), p-value by permutation. Written here because the permutations vectorise into
    one matrix product (all of them at once), which keeps a 2,000-point test to a second on CPU."""
    z = np.concatenate([x, y]).astype(np.float64)
    n, m = len(x), len(y)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / bandwidth)
    rng = np.random.default_rng(seed)
    signs = np.empty((len(z), permutations + 1))
    signs[:, 0] = np.r_[np.full(n, 1 / n), np.full(m, -1 / m)]
    for j in range(1, permutations + 1):
        signs[:, j] = rng.permutation(signs[:, 0])
    stats = ((k @ signs) * signs).sum(0)  # s^T K s: the (biased) squared MMD of each labelling
    p = (1 + int((stats[1:] >= stats[0]).sum())) / (1 + permutations)
    return {"mmd2": float(stats[0]), "p_value": p, "permutations": permutations, "bandwidth": bandwidth}


def domain_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Cross-validated AUC of a logistic regression telling the two samples apart (0.5: no difference)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    z, side = np.concatenate([x, y]), np.r_[np.zeros(len(x)), np.ones(len(y))]
    # shuffled folds: files are often sorted (by label, by date), and unshuffled folds would then test
    # on groups of texts the classifier never saw, which pushes the AUC below 0.5
    folds = StratifiedKFold(max(2, min(5, len(x), len(y))), shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(max_iter=1000, C=1.0), z, side, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(side, p))


def label_shift(ref: list, new: list, alpha: float) -> dict | None:
    """Chi-squared test of the label counts (None when either side has no labels)."""
    from scipy.stats import chi2_contingency
    ref, new = [x for x in ref if x is not None], [x for x in new if x is not None]
    if not ref or not new:
        return None
    names = sorted(set(ref) | set(new))
    table = np.array([[ref.count(a) for a in names], [new.count(a) for a in names]])
    chi2, p, dof, _ = chi2_contingency(table)
    known = set(ref)
    top = sorted(names, key=lambda a: -abs(table[1][names.index(a)] / len(new) - table[0][names.index(a)] / len(ref)))[:5]
    return {"p_value": float(p), "chi2": float(chi2), "dof": int(dof), "shifted": bool(p < alpha),
            "unseen_labels": sorted(set(new) - known), "unseen_label_share": sum(x not in known for x in new) / len(new),
            "largest_changes": {a: {"train_share": round(table[0][names.index(a)] / len(ref), 4),
                                    "new_share": round(table[1][names.index(a)] / len(new), 4)} for a in top}}


def confidence_shift(ref_rows: list[dict], new_rows: list[dict], alpha: float) -> dict:
    from scipy.stats import mannwhitneyu
    r, n = np.array([x["score"] for x in ref_rows]), np.array([x["score"] for x in new_rows])
    p = float(mannwhitneyu(r, n, alternative="greater").pvalue) if len(r) and len(n) else 1.0
    ra = float(np.mean([bool(x.get("abstained")) for x in ref_rows])) if ref_rows else 0.0
    na = float(np.mean([bool(x.get("abstained")) for x in new_rows])) if new_rows else 0.0
    return {"mean_confidence_reference": float(r.mean()) if len(r) else None, "mean_confidence_new": float(n.mean()) if len(n) else None,
            "abstain_rate_reference": ra, "abstain_rate_new": na, "p_value": p,
            "shifted": bool(p < alpha and n.mean() < r.mean() - 0.02)}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def vocabulary_shift(train: list, dev: list, new: list, tokenizer: Any, max_length: int) -> dict:
    """Share of word tokens never seen in train (new data vs the run's dev split as what normal looks
    like), unknown-token and truncation rates, and mean length in tokens."""
    vocab = {w for ex in train for w in words(_text(ex))}

    def stats(examples: list) -> dict:
        ws = [w for ex in examples for w in words(_text(ex))]
        ids = tokenizer([_text(ex) for ex in examples], add_special_tokens=True)["input_ids"]
        unk = tokenizer.unk_token_id
        tokens = sum(len(x) for x in ids)
        return {"unseen_word_rate": sum(w not in vocab for w in ws) / max(len(ws), 1),
                "unknown_token_rate": (sum(t == unk for x in ids for t in x) / max(tokens, 1)) if unk is not None else 0.0,
                "truncation_rate": sum(len(x) > max_length for x in ids) / max(len(ids), 1),
                "mean_tokens": tokens / max(len(ids), 1)}
    ref, cur, trained = stats(dev), stats(new), stats(_sample(train, len(new), 0))
    ratio = cur["mean_tokens"] / max(trained["mean_tokens"], 1e-9)
    shifted = (cur["unseen_word_rate"] > 2 * ref["unseen_word_rate"] + 0.02
               or cur["truncation_rate"] > trained["truncation_rate"] + 0.05 or not 0.67 < ratio < 1.5)
    return {"reference": ref, "train": trained, "new": cur, "length_ratio": ratio, "shifted": bool(shifted)}


def _scored(task: Any) -> bool:
    """Whether each prediction carries one confidence ("score" among the fields the task declares)."""
    return "score" in task.response_fields()


def _text(ex: Any) -> str:
    return ex.text + (" " + ex.text_pair if getattr(ex, "text_pair", None) else "")


def _sample(items: list, k: int, seed: int) -> list:
    if len(items) <= k:
        return list(items)
    idx = np.random.default_rng(seed).choice(len(items), k, replace=False)
    return [items[i] for i in sorted(idx)]


# ---- the check -------------------------------------------------------------------------------
def check(run: Any, new_file: str, alpha: float = 0.05, max_examples: int = 1000, permutations: int = 500,
          seed: int = 0) -> dict:
    """Compare NEW_FILE with the run's data (re-read from its recorded sources). The embedding and
    confidence tests use the dev split as the reference: the model never trained on it, like new data,
    while its own training examples look different to it (memorised) even when nothing drifted."""
    cfg, task = run.config, run.task
    new = task.read_file(str(new_file), cfg, None, require_label=False)  # new labels are findings, not errors
    splits = task.read(cfg)
    ref = _sample(splits.dev, max_examples, seed)
    cur = _sample(new, max_examples, seed + 1)
    x = embed(run.model, task, run.tokenizer, cfg, run.labels, ref)
    y = embed(run.model, task, run.tokenizer, cfg, run.labels, cur)
    mmd = mmd_test(x, y, permutations, seed)
    result: dict = {"reference": {"source": str(cfg.data.dev or cfg.data.train), "split": "dev", "examples": len(splits.dev),
                                  "train_examples": len(splits.train), "sampled": len(ref)},
                    "new": {"source": str(new_file), "examples": len(new), "sampled": len(cur)}, "alpha": alpha,
                    "input_shift": {**mmd, "test": "mmd", "domain_auc": domain_auc(x, y, seed), "shifted": mmd["p_value"] < alpha}}
    labels = label_shift([ex.label for ex in splits.train], [ex.label for ex in new], alpha)
    if labels is not None:
        result["label_shift"] = labels
    if _scored(task):
        result["confidence_shift"] = confidence_shift(run.predict_examples(ref), run.predict_examples(cur), alpha)
    result["vocabulary_shift"] = vocabulary_shift(splits.train, ref, cur, run.tokenizer, cfg.data.max_length)
    result["findings"] = _findings(result)
    result["shifted"] = bool(result["findings"])
    return result


def _findings(r: dict) -> list[dict]:
    out = []
    if r.get("label_shift", {}).get("shifted"):
        ls = r["label_shift"]
        extra = f"; {len(ls['unseen_labels'])} label(s) never seen in training" if ls["unseen_labels"] else ""
        out.append({"kind": "label_shift", "evidence": f"chi-squared p = {ls['p_value']:.3g}{extra}"})
    if r["input_shift"]["shifted"]:
        i = r["input_shift"]
        out.append({"kind": "input_shift", "evidence": f"MMD permutation p = {i['p_value']:.3g}, domain classifier AUC "
                                                       f"{i['domain_auc']:.3f}"})
    c = r.get("confidence_shift")
    if c and c["shifted"]:
        out.append({"kind": "confidence_shift", "evidence": f"mean confidence {c['mean_confidence_reference']:.3f} -> "
                                                            f"{c['mean_confidence_new']:.3f}, abstention "
                                                            f"{c['abstain_rate_reference']:.1%} -> {c['abstain_rate_new']:.1%}"})
    v = r["vocabulary_shift"]
    if v["shifted"]:
        out.append({"kind": "vocabulary_shift", "evidence": f"unseen words {v['reference']['unseen_word_rate']:.1%} (dev) -> "
                                                            f"{v['new']['unseen_word_rate']:.1%}, mean tokens "
                                                            f"{v['train']['mean_tokens']:.1f} (train) -> {v['new']['mean_tokens']:.1f}, "
                                                            f"truncated {v['train']['truncation_rate']:.1%} -> "
                                                            f"{v['new']['truncation_rate']:.1%}"})
    return [{**f, "advice": ADVICE[f["kind"]]} for f in out]


# ---- the serving monitor -------------------------------------------------------------------------
def reference_arrays(model: Any, task: Any, tokenizer: Any, cfg: Any, labels: list[str], dev: list,
                     dev_rows: list[dict]) -> dict[str, np.ndarray]:
    """What the serve monitor compares live traffic with: a seeded sample of dev's embeddings, and
    dev's scores and abstentions (tasks with a top-class probability)."""
    sample = _sample(list(range(len(dev))), REFERENCE_SIZE, 0)
    out = {"embeddings": embed(model, task, tokenizer, cfg, labels, [dev[i] for i in sample])}
    if _scored(task):
        out["scores"] = np.array([r["score"] for r in dev_rows], dtype=np.float32)
        out["abstained"] = np.array([bool(r.get("abstained")) for r in dev_rows], dtype=np.float32)
    return out


class DriftMonitor:
    """A rolling window of live requests against the saved reference. observe() is called with each
    model call's texts and predictions (cheap: it queues the texts, never logs them); a worker thread
    embeds the queued texts a chunk at a time as they arrive, and tests the window once it has caught up
    (or every test_every_s while it cannot), so a /metrics scrape does no model work. Embedding at scrape
    time made one scrape after 200 requests take a second or more, and tested an unchanged window again."""

    def __init__(self, run: Any, reference: dict[str, np.ndarray], window: int = 200, min_texts: int = 50,
                 permutations: int = 200, chunk: int = 32, wait_s: float = 1.0, test_every_s: float = 1.0):
        self.run, self.ref = run, reference
        self.window, self.min_texts, self.permutations = window, min_texts, permutations
        self.chunk, self.wait_s, self.test_every_s = chunk, wait_s, test_every_s
        self.pending: collections.deque = collections.deque()  # texts to embed, at most `window` (older ones would leave it)
        self.vectors: collections.deque = collections.deque(maxlen=window)
        self.scores: collections.deque = collections.deque(maxlen=window)
        self.abstained: collections.deque = collections.deque(maxlen=window)
        self.lock = threading.Condition()
        self.observed = 0  # texts queued so far
        self.taken = 0  # of those, how many the worker has taken (or dropped as already out of the window)
        self.tested = 0  # of those, how many the last test covered
        self.pvalue = float("nan")
        self.closed = False
        self.worker: threading.Thread | None = None
        self.embeds = isinstance(run.model, torch.nn.Module)

    @classmethod
    def for_run(cls, run: Any, **kw) -> DriftMonitor | None:
        path = Path(run.run_dir) / REFERENCE
        if not path.is_file():
            log.info("drift monitor off: %s has no %s (trained before lmtune saved one)", run.run_dir, REFERENCE)
            return None
        from safetensors.numpy import load_file
        return cls(run, load_file(str(path)), **kw)

    def observe(self, texts: list, rows: list[dict]) -> None:
        with self.lock:
            if self.embeds and not self.closed:
                self.pending.extend(texts)
                self.observed += len(texts)
                while len(self.pending) > self.window:  # a worker this far behind: the oldest would leave the window
                    self.pending.popleft()
                    self.taken += 1
                if self.worker is None:
                    self.worker = threading.Thread(target=self._work, name="lmtune-drift", daemon=True)
                    self.worker.start()
                self.lock.notify_all()
            for r in rows:
                if "score" in r:
                    self.scores.append(float(r["score"]))
                self.abstained.append(bool(r.get("abstained")))

    def _work(self) -> None:
        """The worker: embed queued texts a chunk at a time; test the window when none are left (or when the
        last test is test_every_s old: a queue that never empties still moves the p-value)."""
        last_test = time.monotonic()
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                todo = [self.pending.popleft() for _ in range(min(self.chunk, len(self.pending)))]
                self.taken += len(todo)
                covered, drained = self.taken, not self.pending
            try:
                vectors = embed(self.run.model, self.run.task, self.run.tokenizer, self.run.config, self.run.labels,
                                self.run.task.from_texts(todo))
            except Exception as e:  # the type only: a message could quote a request's text
                log.error("drift monitor: embedding %d texts failed (%s); they are left out", len(todo), type(e).__name__)
                vectors = []
            with self.lock:
                self.vectors.extend(vectors)
                window = list(self.vectors)
            if not drained and time.monotonic() - last_test < self.test_every_s:
                continue
            p = float("nan")
            if len(window) >= self.min_texts:
                p = mmd_test(self.ref["embeddings"], np.stack(window), self.permutations)["p_value"]
            last_test = time.monotonic()
            with self.lock:
                self.pvalue, self.tested = p, max(self.tested, covered)
                self.lock.notify_all()

    def refresh(self) -> dict[str, float]:
        """Gauges: window size, abstention rate, mean confidence, and the MMD p-value once the window
        holds min_texts embedded requests (NaN before). Waits at most wait_s for the worker to cover the
        texts observed so far (it is idle or nearly so unless the server is saturated); past that, the last
        test's values: a saturated server's drift gauges lag rather than its scrapes."""
        with self.lock:
            observed = self.observed
            self.lock.wait_for(lambda: self.tested >= observed or self.closed, timeout=self.wait_s)
            p, embedded = self.pvalue, len(self.vectors)
            scores, abstained = list(self.scores), list(self.abstained)
        return {"pvalue": p, "window": float(embedded if self.embeds else len(abstained)),
                "abstain_rate": float(np.mean(abstained)) if abstained else float("nan"),
                "mean_confidence": float(np.mean(scores)) if scores else float("nan")}

    def close(self) -> None:
        """Stop the worker (the server is shutting down); texts still queued are dropped."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self.worker is not None:
            self.worker.join(timeout=10)
