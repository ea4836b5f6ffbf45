"""The recipe's core stages, in the order they run: record, build, prepare_data, adapt, audit, fit,
restore, evaluate, save. Each reads the context's earlier parts and fills its own; each can be called
on its own (tests/test_recipe.py)."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

from transformers import set_seed

from lmtune.data.splits import resample_indices
from lmtune.io import atomic_dir, atomic_path, write_json, write_jsonl, write_text
from lmtune.models import count_parameters, freeze, quiet_transformers, resolve_model
from lmtune.noise import finding as noise_finding
from lmtune.peft import apply_peft, base_fingerprint, is_peft, save_adapter, step_hooks, wrap_loss
from lmtune.peft import finalize as finalize_peft
from lmtune.recipe.context import Built, Context, Data, Fit, Outcome
from lmtune.registry import adversaries
from lmtune.robust.adversarial import AdversaryInputs
from lmtune.robust.augment import augment
from lmtune.robust.text import Synonyms
from lmtune.artifacts import model_meta, save_task_arrays, write_meta
from lmtune.fold import folded
from lmtune.tasks.base import EXAMPLE_LABELS, GENERATE, Encoded, encode_examples
from lmtune.training import fsdp
from lmtune.training.checkpoint import Checkpoints
from lmtune.training.live import LiveEvents
from lmtune.training.loop import LoopTask, total_steps, train_loop
from lmtune.training.memory import PeakMemory
from lmtune.training.optim import resolve_learning_rates

log = logging.getLogger("lmtune")


def record(ctx: Context) -> None:
    """The slice columns (read now, so a missing column fails before training), config.yaml and splits.json."""
    cfg, splits = ctx.cfg, ctx.splits
    if cfg.data.slice_columns:
        from lmtune.fairness import slices_of
        ctx.task.require(EXAMPLE_LABELS, "data.slice_columns")
        split = "test" if splits.test else "dev"
        ctx.inputs.slice_values = (split, slices_of(cfg, getattr(splits, split), cfg.data.slice_columns))
    if ctx.main and not ctx.inputs.resume:
        write_text(ctx.rd.config, cfg.to_yaml())
        write_json(ctx.rd.splits, splits.info)


def build(ctx: Context) -> None:
    """The backbone and the task's head (seeded), with its frozen parts."""
    cfg = ctx.cfg
    set_seed(cfg.train.seed)
    model, tokenizer = ctx.task.build_model(cfg, ctx.splits.labels)
    freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_layers)
    ctx.built = Built(model, tokenizer)


def prepare_data(ctx: Context) -> None:
    """Re-sampling, augmentation and the adversary's synonym table (both from the built model's
    embeddings, before PEFT wraps it), then every split encoded and the training features assembled."""
    cfg, task, splits, built = ctx.cfg, ctx.task, ctx.splits, ctx.built
    resampled = (resample_indices([ex.label for ex in splits.train], cfg.data.resample, cfg.train.seed)
                 if cfg.data.resample != "none" else None)
    # augmented rows come from train only, after the split: dev and test never see them
    extra = augment(splits.train, cfg.augment, built.model, built.tokenizer) if cfg.augment.methods else []
    synonyms = (Synonyms(cfg.adversarial.synonyms, built.model, built.tokenizer)
                if adversaries.meta(cfg.adversarial.method, "needs_synonyms") else None)
    encoded = {name: encode_examples(task, exs, built.tokenizer, cfg, splits.labels)
               for name, exs in (("train", splits.train), ("dev", splits.dev), ("test", splits.test)) if exs}
    for name, enc in encoded.items():
        if enc.stats["truncated"]:
            log.warning("%s: %d of %d examples are longer than max_length %d and were truncated",
                        name, enc.stats["truncated"], enc.stats["examples"], cfg.data.max_length)
    train = encoded["train"]
    features = train.features
    if resampled is not None:  # an example's features (a long text's windows) travel together
        groups = train.windows()
        features = [f for i in resampled for f in groups[i]]
        log.info("re-sampled train (%s): %d -> %d examples", cfg.data.resample, len(train.examples), len(resampled))
    train_features = task.train_features(Encoded(features, train.examples))
    augmented = encode_examples(task, extra, built.tokenizer, cfg, splits.labels) if extra else None
    if augmented is not None:
        train_features = train_features + task.train_features(augmented)
    ctx.data = Data(encoded, train_features, len(resampled if resampled is not None else splits.train) + len(extra),
                    functools.partial(task.collate, tokenizer=built.tokenizer), augmented, resampled, synonyms)


def adapt(ctx: Context) -> None:
    """PEFT over the built model (its schedule knows the number of training steps), then the learning rates
    (the task's own default, where it has one, before the PEFT method's), then what the task computes from
    the model before training (DPO's reference log-probs)."""
    cfg, task, built = ctx.cfg, ctx.task, ctx.built
    built.model = apply_peft(built.model, cfg.peft, task.peft_task_type, total_steps(cfg.train, ctx.data.train_size))
    built.trainable, built.total = count_parameters(built.model)
    train_cfg = cfg.train if cfg.train.lr is not None or task.default_lr(cfg) is None else \
        dataclasses.replace(cfg.train, lr=task.default_lr(cfg))
    built.lrs = dataclasses.replace(resolve_learning_rates(train_cfg, built.model, cfg.peft.method),
                                    metric=cfg.train.metric or task.headline[0])
    split_features = [f for enc in ctx.data.encoded.values() for f in enc.features]
    with ctx.accelerator.autocast():  # the reference log-probs in the precision the training's own are computed in
        task.before_fit(built.model, [*{id(f): f for f in (*ctx.data.train_features, *split_features)}.values()],
                        ctx.data.collate, ctx.accelerator.device)
    log.info("learning rates: encoder %.2g, head %.2g%s; trainable parameters %d of %d (%.2f%%)", built.lrs.lr,
             built.lrs.head_lr, " (defaults)" if cfg.train.lr is None else "", built.trainable, built.total,
             100 * built.trainable / built.total)


def audit_data(ctx: Context) -> None:
    splits, data = ctx.splits, ctx.data
    data.audit = ctx.task.audit(splits, {k: v.stats for k, v in data.encoded.items()}, ctx.cfg.data.max_length)
    if ctx.inputs.noise:
        data.audit.append(noise_finding(ctx.inputs.noise, len(splits.train) + splits.info.get("dropped_label_noise", 0)))
    if ctx.main:
        write_json(ctx.rd.audit, data.audit)
    for f in data.audit:
        if f["severity"] != "info":
            log.warning("data audit: %s (%s): %s. %s", f["check"], f["severity"], f["detail"], f["suggestion"])


def fit(ctx: Context) -> None:
    """The training loop, from the last checkpoint when resuming; dev is evaluated as the loop asks."""
    cfg, task, built, data = ctx.cfg, ctx.task, ctx.built, ctx.data

    def evaluate_dev(m) -> dict:
        return task.evaluate(ctx.outputs(m, "dev"), data.encoded["dev"], ctx.splits.labels)

    ckpt = Checkpoints(ctx.rd.checkpoints)
    last = ckpt.path("last") if ctx.inputs.resume else None
    resumed_from = json.loads((last / "state.json").read_text())["step"] if last else None
    t0 = time.perf_counter()
    adversary = None
    if cfg.adversarial.method != "none":
        extra = data.augmented if data.augmented is not None else []
        adversary = adversaries.get(cfg.adversarial.method).build(AdversaryInputs(
            cfg, task, built.tokenizer, ctx.splits.labels, data.encoded["train"], extra, data.train_features, data.collate,
            data.synonyms))
    loss = wrap_loss(task.loss, built.model, cfg.peft)
    if ctx.inputs.previous:
        from lmtune import continual
        loss = continual.l2sp_loss(loss, built.model, ctx.inputs.previous, cfg.continual.l2sp, built.head)
    loop_task = LoopTask(data.collate, loss, task.num_items, evaluate_dev, adversary, task.pad_values(built.tokenizer),
                         functools.partial(task.train_batches, data.train_features))
    live = (LiveEvents(ctx.rd.events),) if ctx.accelerator.is_main_process else ()  # the dashboard's live charts
    with PeakMemory() as peak_mem:
        state = train_loop(built.model, data.train_features, loop_task, built.lrs, ckpt, ctx.accelerator,
                           resume=bool(ctx.inputs.resume), callbacks=(*ctx.inputs.callbacks, *ctx.trackers, *live),
                           step_hooks=tuple(step_hooks(built.model, cfg.peft)))
    ctx.fit = Fit(ckpt, state, resumed_from, peak_mem, time.perf_counter() - t0, adversary)


def restore(ctx: Context) -> None:
    """The best checkpoint's weights, then the output controls fitted on them (temperature, scorer,
    threshold): dev is predicted once for those and for the metrics."""
    from lmtune.inference import fit_output_controls
    built = ctx.built
    if fsdp.wanted(ctx.cfg.train, ctx.accelerator.num_processes):  # the rest of the recipe runs on a plain model
        built.model = ctx.task.build_model(ctx.cfg, ctx.splits.labels)[0].to(ctx.accelerator.device)
    built.model = ctx.accelerator.unwrap_model(built.model)
    ctx.fit.ckpt.load_weights(built.model, "best")
    finalize_peft(built.model)
    built.model.eval()
    ctx.outcome = Outcome(ctx.final_outputs())
    fit_output_controls(ctx.task, ctx.cfg, ctx.outcome.outputs, ctx.data.encoded, ctx.splits.labels)


def evaluate(ctx: Context) -> None:
    """Metrics and predictions of dev and test (a generating task's test outputs generated and scored)."""
    if ctx.outcome is None:  # called without restore: the model as it is
        ctx.outcome = Outcome(ctx.final_outputs())
    out, encoded = ctx.outcome, ctx.data.encoded
    for split in ("dev", "test"):
        if split in encoded:
            outputs = out.outputs(split)
            out.split_metrics[split] = ctx.task.evaluate(outputs, encoded[split], ctx.splits.labels)
            out.preds[split] = ctx.task.predictions(outputs, encoded[split], ctx.splits.labels)
    if ctx.task.supports(GENERATE) and ctx.main:
        _generate_split(ctx, "test" if ctx.splits.test else "dev")


def _generate_split(ctx: Context, split: str) -> None:
    """A generating task's outputs on the test split (dev without one), scored against the references;
    the outputs are saved beside them as that split's predictions."""
    examples = sample(getattr(ctx.splits, split), ctx.cfg.generate.eval_examples, ctx.cfg.train.seed)
    generated = ctx.task.generate(ctx.built.model, ctx.built.tokenizer, examples, ctx.accelerator.device,
                                  progress=ctx.cfg.train.progress)
    scored = ctx.task.score_generations(examples, generated)
    scored.update(ctx.task.compare_unconstrained(ctx.built.model, ctx.built.tokenizer, examples, ctx.accelerator.device,
                                                 generated, ctx.cfg.train.progress))  # structured output: valid with and without
    ctx.outcome.split_metrics[split].update(scored)
    ctx.outcome.preds[split] = ctx.task.generation_rows(examples, generated)
    log.info("%s: generated %d outputs: ROUGE-L %.4f, repetition loops %.1f%%, hit max_new_tokens %.1f%%", split, len(examples),
             scored.get("rougeL", float("nan")), 100 * scored["repeat_share"], 100 * scored["truncated_share"])
    if "structured" in scored:
        s = scored["structured"]
        log.info("%s: outputs meeting generate.%s: %.1f%% constrained, %.1f%% unconstrained", split, s["constraint"],
                 100 * s["valid_constrained"], 100 * s["valid_unconstrained"])


def sample(examples: list, n: int, seed: int) -> list:
    """n examples drawn with a seed, in their order (all of them when n is 0 or covers them)."""
    if not n or n >= len(examples):
        return examples
    import random
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def _probe(ctx: Context) -> dict:
    """A few dev examples as model inputs, on the model's device: what a fold is checked on."""
    from lmtune.training.loop import inputs
    enc = ctx.data.encoded.get("dev") or ctx.data.encoded["train"]
    batch = ctx.data.collate(enc.features[:4])
    return {k: v.to(ctx.accelerator.device) for k, v in inputs(batch).items() if hasattr(v, "to")}


def save(ctx: Context) -> None:
    """model/ (weights or adapter, tokenizer, task state, lmtune.json), the drift reference and the
    predictions (main process)."""
    built = ctx.built
    if ctx.inputs.previous and is_peft(built.model):  # an adapter over the old run's weights: only the merged model stands alone
        from lmtune.peft import merge
        built.model = merge(built.model, ctx.cfg.peft.method)
    cfg, task, model = ctx.cfg, ctx.task, built.model
    extra = {}
    if is_peft(model):
        base_path = resolve_model(cfg.model.name)
        extra["base_model"] = {"name": cfg.model.name, "path": base_path, "sha256": base_fingerprint(base_path)}
        # a base inside the run (lmtune prefer's merged SFT model): load finds it there wherever the run is moved
        root, base = ctx.rd.root.resolve(), Path(base_path).resolve()
        if Path(base_path).is_dir() and base.is_relative_to(root):
            extra["base_model"]["in_run"] = base.relative_to(root).as_posix()
    # the temperature goes into the saved weights (lmtune.fold), so transformers.pipeline and an ONNX
    # export give lmtune's probabilities; the model in memory stays raw for the stages after this one
    with folded(model, task, _probe(ctx)) as layer, atomic_dir(ctx.rd.model) as tmp, quiet_transformers():
        if layer and task.calibration.get("applied"):  # a fold happened: a FOLD task, which keeps its calibration dict
            task.calibration["folded"] = layer  # report.md says so
        meta = model_meta(task, ctx.splits.labels, cfg, **extra)
        save_adapter(model, tmp) if is_peft(model) else model.save_pretrained(tmp)
        built.tokenizer.save_pretrained(tmp)
        save_task_arrays(task, tmp)
        write_meta(tmp, meta)
    if ctx.outcome.drift_reference:  # beside the model, not in it: it is monitoring data, not part of the artifact
        from safetensors.numpy import save as to_bytes

        from lmtune.drift import REFERENCE
        with atomic_path(ctx.rd.root / REFERENCE) as tmp_ref:  # bytes into the temp: it keeps the run's file mode
            tmp_ref.write_bytes(to_bytes(ctx.outcome.drift_reference))
    for split, rows in ctx.outcome.preds.items():
        write_jsonl(ctx.rd.predictions(split), rows)
