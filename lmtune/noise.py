"""Label-noise candidates by confident learning (cleanlab) on out-of-fold predicted probabilities.

Every training example gets class probabilities from a model that never saw it: train is cut into
k stratified folds, the run's own recipe fine-tunes a fresh model on k-1 of them, and that model
predicts the held-out fold. cleanlab's `find_label_issues` then flags the rows whose given label
the out-of-fold models find implausible (prune by noise rate), ranked by self-confidence (the
probability of the given label, lowest first). Costs k extra fine-tunings, so it is opt-in:
`lmtune audit CONFIG --label-noise` or `train.label_noise_folds` in a run.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
from transformers import set_seed

from lmtune.config import Config
from lmtune.errors import InputError
from lmtune.models import freeze
from lmtune.tasks.base import encode_examples
from lmtune.training.loop import LoopTask, predict_outputs, train_loop
from lmtune.training.optim import resolve_learning_rates

log = logging.getLogger("lmtune")


def out_of_fold_probs(cfg: Config, task, examples: list, labels: list[str], folds: int, accelerator) -> list:
    """Per example, probabilities from the fold model that did not train on it: a [classes] row
    (classification) or a [words, tags] array (NER), as task.example_probs gives them."""
    if folds < 2:
        raise InputError(f"label-noise search needs at least 2 folds, got {folds}.")
    gold = [getattr(ex, "label", "") for ex in examples]  # NER: one stratum, a seeded shuffle
    probs: list = [None] * len(examples)
    # fold f = the examples a stratified split puts in the f-th share; each class spread evenly
    order = np.random.default_rng(cfg.train.seed).permutation(len(examples))
    fold_of = np.zeros(len(examples), dtype=int)
    by_class: dict[str, list[int]] = {}
    for i in order:
        by_class.setdefault(gold[i], []).append(int(i))
    k = 0
    for idx in by_class.values():
        for i in idx:
            fold_of[i] = k % folds
            k += 1
    for f in range(folds):
        held = np.flatnonzero(fold_of == f)
        fit = np.flatnonzero(fold_of != f)
        log.info("label noise: fold %d/%d, training on %d, predicting %d", f + 1, folds, len(fit), len(held))
        outputs, enc = _fit_predict(cfg, task, [examples[i] for i in fit], [examples[i] for i in held], labels, accelerator)
        for i, row in zip(held, task.example_probs(outputs, enc, labels)):
            probs[i] = row
    return probs


def _fit_predict(cfg: Config, task, train: list, held: list, labels: list[str], accelerator) -> tuple[list[np.ndarray], object]:
    """The run's recipe (full fine-tuning, no dev, no checkpoints) on `train`; outputs on `held`
    and its encoding."""
    set_seed(cfg.train.seed)
    model, tokenizer = task.build_model(cfg, labels)
    freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_layers)
    lrs = resolve_learning_rates(dataclasses.replace(cfg.train, progress="none"), model, "none")
    enc = {name: encode_examples(task, exs, tokenizer, cfg, labels) for name, exs in (("fit", train), ("held", held))}
    collate = functools.partial(task.collate, tokenizer=tokenizer)
    train_loop(model, enc["fit"].features, LoopTask(collate, task.loss, task.num_items, None), lrs, None, accelerator)
    model = accelerator.unwrap_model(model).eval()
    return predict_outputs(model, enc["held"].features, collate, task.unbatch, accelerator.device, progress="none"), enc["held"]


def find_label_issues(examples: list, labels: list[str], probs: list) -> dict:
    """cleanlab's flagged rows plus a full ranking of every row by self-confidence (lowest first)."""
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    if examples and examples[0].labels_per_token:
        return _token_label_issues(examples, labels, probs)
    probs = np.stack(probs)
    index = {lab: i for i, lab in enumerate(labels)}
    given = np.array([index[ex.label] for ex in examples])
    flagged = cl_find(given, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    ranking = np.argsort(quality, kind="stable")
    rows = [{"index": int(i), "source": examples[i].source, "text": examples[i].text, "label": examples[i].label,
             "suggested": labels[int(probs[i].argmax())], "label_quality": round(float(quality[i]), 6)}
            for i in flagged]
    return {"flagged": rows, "ranking": ranking.tolist(), "quality": quality.tolist()}


def _token_label_issues(examples: list, labels: list[str], probs: list) -> dict:
    """NER: cleanlab's token-classification variant flags words whose given tag the out-of-fold
    models find implausible; a sentence is flagged when one of its words is (its row names the
    worst word), and sentences are ranked by cleanlab's sentence label-quality score."""
    from cleanlab.token_classification.filter import find_label_issues as cl_find
    from cleanlab.token_classification.rank import get_label_quality_scores

    index = {lab: i for i, lab in enumerate(labels)}
    given = [[index[t] for t in ex.tags] for ex in examples]
    issues = cl_find(given, probs, return_indices_ranked_by="self_confidence")  # [(sentence, word)], worst first
    quality, _ = get_label_quality_scores(given, probs)
    rows, seen = [], set()
    for i, j in issues:
        if i in seen:
            continue
        seen.add(i)
        ex = examples[i]
        rows.append({"index": int(i), "source": ex.source, "text": " ".join(ex.tokens), "word": ex.tokens[j],
                     "label": ex.tags[j], "suggested": labels[int(probs[i][j].argmax())],
                     "label_quality": round(float(quality[i]), 6)})
    return {"flagged": rows, "ranking": np.argsort(quality, kind="stable").tolist(), "quality": np.asarray(quality).tolist()}


def finding(result: dict, n: int) -> dict:
    """The audit finding (severity and advice) for a label-noise search over n training rows."""
    flagged = result["flagged"]
    share = len(flagged) / max(n, 1)
    severity = "critical" if share > 0.1 else "warning" if share > 0.02 else "info"
    return {"check": "label_noise", "severity": severity,
            "detail": f"{len(flagged)} of {n} training rows ({share:.1%}) look mislabeled to out-of-fold models "
                      "(confident learning)",
            "suggestion": "Review them (label_noise.jsonl lists each with the suggested label), fix or drop them; "
                          "data.drop_label_noise true drops them before training.",
            "examples": [f"{r['source']}: {repr(r['word']) + ' ' if 'word' in r else ''}'{r['label']}' -> '{r['suggested']}'"
                         for r in flagged[:5]]}
