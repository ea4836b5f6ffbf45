"""The recipe's optional stages: each runs only where its `applies` predicate (in recipe.STAGES) holds."""
from __future__ import annotations

import dataclasses
import json
import logging

from lmtune import continual, selftrain
from lmtune.config import Config
from lmtune.errors import InputError
from lmtune.io import write_json, write_jsonl
from lmtune.noise import find_label_issues, out_of_fold_probs
from lmtune.recipe.context import Context
from lmtune.recipe.stages import sample
from lmtune.registry import trackers as tracker_registry
from lmtune.tasks.base import GENERATE, INDEX, encode_examples
from lmtune.training.loop import predict_outputs

log = logging.getLogger("lmtune")


def label_noise(ctx: Context) -> None:
    """Confident-learning search over train (cached in the run dir, so a resumed run does not redo it);
    with data.drop_label_noise the flagged rows leave train."""
    cfg, splits, rd = ctx.cfg, ctx.splits, ctx.rd
    if rd.label_noise.is_file():
        noise = json.loads(rd.label_noise.read_text())
    else:
        probs = out_of_fold_probs(cfg, ctx.task, splits.train, splits.labels, cfg.data.label_noise_folds, ctx.accelerator)
        noise = find_label_issues(splits.train, splits.labels, probs)
        if ctx.main:
            write_jsonl(rd.label_noise_rows, noise["flagged"])
            write_json(rd.label_noise, noise)
        log.info("label noise: %d of %d training rows flagged (label_noise.jsonl)", len(noise["flagged"]), len(splits.train))
    ctx.inputs.noise = noise
    if noise and cfg.data.drop_label_noise:
        drop = {r["index"] for r in noise["flagged"]}
        ctx.inputs.splits = dataclasses.replace(splits, train=[ex for i, ex in enumerate(splits.train) if i not in drop],
                                                info={**splits.info, "dropped_label_noise": len(drop)})
        log.info("label noise: dropped %d flagged rows from train (%d left)", len(drop), len(ctx.splits.train))


def warm_start(ctx: Context) -> None:
    """A continued run: the old run's weights in the freshly built model, its head rows kept per label."""
    from lmtune.inference import load
    prev, labels = ctx.inputs.previous, ctx.splits.labels
    continual.load_previous(prev, load)
    ctx.built.head = continual.warm_start(ctx.built.model, prev, labels)
    log.info("continual: started from %s (%d labels kept, %d new)", prev.run_dir,
             len(set(prev.labels) & set(labels)), len(set(labels) - set(prev.labels)))


def read_unlabeled(ctx: Context) -> None:
    """data.unlabeled: its texts read first, so a bad file fails before the run writes anything (lmtune.selftrain)."""
    selftrain.read_unlabeled(ctx)


def self_train(ctx: Context, student_stages: tuple) -> None:
    """data.unlabeled: self-training rounds on the restored, calibrated model, each student trained by
    `student_stages` (the recipe's own, build to restore); the best model takes the run's place (lmtune.selftrain)."""
    selftrain.self_train(ctx, student_stages)


def tracker_names(cfg: Config) -> list[str]:
    """train.trackers, plus tensorboard when the older train.tensorboard switch is on."""
    return list(dict.fromkeys([*cfg.train.trackers, *(["tensorboard"] if cfg.train.tensorboard else [])]))


def resolved_config(ctx: Context) -> Config:
    """The run's config with what adapt resolved filled in: the learning rates and the early-stopping
    metric actually used (a config that leaves train.lr unset would otherwise be tracked as None)."""
    from lmtune.config import build_config
    d = ctx.cfg.to_dict()
    lrs = ctx.built.lrs
    d["train"] = {**d["train"], "lr": lrs.lr, "head_lr": lrs.head_lr, "metric": lrs.metric}
    return build_config(d)


def start_trackers(ctx: Context) -> None:
    """The main process's trackers open their runs, log the resolved config and the data inputs; they
    see every step from fit on."""
    cfg = resolved_config(ctx)
    ctx.trackers = [tracker_registry.get(name)(ctx.rd.root, cfg) for name in tracker_names(ctx.cfg)]
    for tracker in ctx.trackers:  # a Tracker (lmtune.tracking): its inputs() does nothing unless overridden
        tracker.inputs(ctx.splits)


def finish_trackers(ctx: Context) -> None:
    """Final metrics and the rendered files (report, plots, model card), then the runs are closed."""
    from lmtune import results
    rd = ctx.rd
    files = [rd.report, *sorted(rd.root.glob("*.png")), *([rd.card] if rd.card.is_file() else [])]
    document = results.read(rd.root)
    for tracker in ctx.trackers:
        tracker.finish(document, files)
    for tracker in ctx.trackers:
        tracker.close()
    ctx.trackers = []


def search_decoding(ctx: Context) -> None:
    """A generating task's decoding settings, searched on a seeded sample of dev (main process)."""
    g, seed = ctx.cfg.generate, ctx.cfg.train.seed
    dev = sample(ctx.splits.dev, g.search_examples, seed)
    found = ctx.task.fit_decoding(ctx.built.model, ctx.built.tokenizer, dev, ctx.accelerator.device, seed, g.search_trials,
                                  ctx.cfg.train.progress)
    log.info("decoding chosen on %d dev examples: %s", len(dev), ", ".join(f"{k} {v}" for k, v in found["chosen"].items()) or "greedy")


def build_index(ctx: Context) -> None:
    """A retrieval run's documents embedded with the final model, saved in RUN/index/ (main process)."""
    from lmtune.inference import build_index as embed_index
    rows = ctx.task.corpus(ctx.cfg, ctx.splits)
    index = embed_index(ctx.task, ctx.built.model, ctx.built.tokenizer, ctx.cfg, rows, ctx.accelerator.device)
    index.save(ctx.rd.root)
    ctx.task.set_index(index)
    log.info("index: %d documents embedded into %s", len(rows), ctx.rd.index)


def measure_slices(ctx: Context) -> None:
    """data.slice_columns: per-slice metrics of the slice split's predictions (main process)."""
    from lmtune.fairness import slice_metrics
    split, values = ctx.inputs.slice_values
    ctx.outcome.slices = {"split": split, **slice_metrics(ctx.outcome.preds[split], values, seed=ctx.cfg.train.seed)}


def measure_forgetting(ctx: Context) -> None:
    """A continued run: its metric on the old run's test split, next to the old model's."""
    prev, built, data = ctx.inputs.previous, ctx.built, ctx.data
    enc = encode_examples(ctx.task, prev.old_test, built.tokenizer, ctx.cfg, ctx.splits.labels)
    out = predict_outputs(built.model, enc.features, data.collate, ctx.task.unbatch, ctx.accelerator.device, "eval old test",
                          ctx.cfg.train.progress)
    metric = built.lrs.metric
    result = ctx.outcome.continual = continual.forgetting(prev, ctx.task.evaluate(out, enc, ctx.splits.labels), metric)
    if "forgetting" in result:
        log.info("continual: old test %s %.4f -> %.4f (forgetting %.4f)", metric, result["before"], result["after"],
                 result["forgetting"])


def drift_reference(ctx: Context) -> None:
    """What `lmtune serve` compares live traffic with; a model that cannot be embedded serves without it."""
    from lmtune.drift import reference_arrays
    try:
        ctx.outcome.drift_reference = reference_arrays(ctx.built.model, ctx.task, ctx.built.tokenizer, ctx.cfg,
                                                       ctx.splits.labels, ctx.splits.dev, ctx.outcome.preds["dev"])
    except InputError as e:
        log.info("no drift reference saved (%s)", e)


def attack(ctx: Context) -> None:
    """attack.methods: the finished run's robustness report (robustness.json, report.md)."""
    cfg, run = ctx.cfg, ctx.run
    result = run.attack(cfg.attack.data) if cfg.attack.data else run.attack_examples(ctx.splits.dev)
    for name, a in result["attacks"].items():
        if "skipped" not in a:
            log.info("attack %s: %s %.4f (clean %.4f)%s", name, result["metric"], a[result["metric"]],
                     result["clean"][result["metric"]], f", success rate {a['success_rate']:.1%}" if "success_rate" in a else "")


# when each optional stage applies (recipe.STAGES pairs them with their stage)
def wants_label_noise(ctx: Context) -> bool:
    return ctx.cfg.data.label_noise_folds > 0


def has_unlabeled(ctx: Context) -> bool:
    return bool(ctx.cfg.data.unlabeled)


def continues_a_run(ctx: Context) -> bool:
    return ctx.inputs.previous is not None


def has_trackers(ctx: Context) -> bool:
    return ctx.main and bool(tracker_names(ctx.cfg))


def tracking(ctx: Context) -> bool:
    return bool(ctx.trackers)


def wants_decoding_search(ctx: Context) -> bool:
    return bool(ctx.task.supports(GENERATE) and ctx.main and ctx.cfg.generate.search_trials and ctx.splits.dev)


def has_index(ctx: Context) -> bool:
    return bool(ctx.task.supports(INDEX) and ctx.main)


def has_slices(ctx: Context) -> bool:
    return bool(ctx.inputs.slice_values and ctx.main)


def has_old_test(ctx: Context) -> bool:
    return bool(ctx.inputs.previous and ctx.inputs.previous.old_test)


def can_reference_drift(ctx: Context) -> bool:
    return bool(ctx.main and ctx.splits.dev and "dev" in ctx.outcome.preds)


def wants_attack(ctx: Context) -> bool:
    return bool(ctx.cfg.attack.methods and ctx.main)
