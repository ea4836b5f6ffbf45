"""The training loop. It knows batches, losses and metrics, never a task: the task hands it
`collate`, `loss`, `num_items` and an `evaluate` callable."""
from __future__ import annotations

import functools
import logging
import math
from contextlib import nullcontext
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from lmtune.config import TrainConfig
from lmtune.training import fsdp
from lmtune.training.batching import epoch_batches, eval_batches
from lmtune.training.checkpoint import Checkpoints, TrainState, all_rng_states
from lmtune.training.fast import FastPath, Prefetcher, StepLog, compile_model, pad_to_bucket, to_device
from lmtune.training.fast import resolve as resolve_fast
from lmtune.training.optim import build_optimizer, build_scheduler
from lmtune.training.progress import Progress
from lmtune.training.step_graphs import StepGraphs

log = logging.getLogger("lmtune")


@dataclass
class LoopTask:
    """The task's pieces the loop uses (see tasks/base.py)."""
    collate: Callable[[list[dict]], dict]
    loss: Callable  # (outputs, batch) -> summed loss
    num_items: Callable[[list[dict]], int]
    evaluate: Callable[[torch.nn.Module], dict] | None  # model -> dev metrics; None: no dev, no checkpoints
    adversary: Any = None  # a registered adversary: its step(...) replaces plain_step (extra passes per micro-batch)
    pad_values: dict[str, int] | None = None  # batch keys with a sequence dimension -> pad value (Task.pad_values)
    # (batch_size, seed, epoch, group_by_length) -> the epoch's batches of feature indices (Task.train_batches: a
    # multi-task run puts one task in each batch); None: epoch_batches over the features' lengths
    batches: Callable[[int, int, int, bool], list[list[int]]] | None = None


def plain_step(model, batch: dict, loss_fn: Callable, backward: Callable[[torch.Tensor], None],
               no_sync: Callable = nullcontext, items: list[dict] | None = None) -> torch.Tensor:
    """One micro-batch's forward and backward; an adversary's `step` (same signature) replaces it."""
    loss = loss_fn(model, batch)
    backward(loss)
    return loss


LOWER_IS_BETTER = ("loss", "mae", "rmse", "hamming_loss")  # error metrics; every other metric is a score


def is_better(metric: str, new: float, old: float | None) -> bool:
    return old is None or (new < old if metric in LOWER_IS_BETTER else new > old)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n_train / cfg.batch_size)


def micro_batches(global_batch: list[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This process's shard of a global batch, split into its micro-batches."""
    mine = global_batch[rank::world]
    return [mine[i::grad_accum] for i in range(grad_accum) if mine[i::grad_accum]]


def train_loop(model, features: list[dict], task: LoopTask, cfg: TrainConfig, ckpt: Checkpoints | None,
               accelerator: Accelerator, resume: bool = False, callbacks: tuple = (), step_hooks: tuple = ()) -> TrainState:
    """callbacks(state) run after each step; step_hooks(model, step) run after optimizer.step(), while
    gradients still exist (AdaLoRA's rank allocation)."""
    steps = total_steps(cfg, len(features))
    model, optimizer, scheduler, sharded = _prepare(model, cfg, accelerator, steps)
    state = (ckpt.load_state(accelerator.unwrap_model(model), optimizer, scheduler, accelerator.process_index, sharded)
             if resume and ckpt else TrainState())
    lengths = [f["length"] for f in features]
    rank, world = accelerator.process_index, accelerator.num_processes
    eval_every = cfg.eval_every or math.ceil(len(features) / cfg.batch_size)
    progress = Progress(steps, cfg.progress, "train", start=state.step, enabled=accelerator.is_main_process)
    fast = resolve_fast(cfg, accelerator.device, max(lengths), task.pad_values,
                        "FSDP shards the model" if sharded else
                        "hooks change the forward pass" if task.adversary is not None or step_hooks else None,
                        _no_step_graphs(cfg, accelerator))
    stepper = compile_model(model, fast)  # the eager `model` still evaluates and saves
    clip = _clipper(model, accelerator)
    loss_fn = functools.partial(_model_loss, task)
    graphs = StepGraphs(stepper, optimizer, loss_fn, accelerator.backward,
                        (lambda: clip(cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else None, accelerator.autocast,
                        accelerator.device) if fast.step_graphs else None
    log_rows = StepLog(fast.sync_free)
    make_batch = functools.partial(_device_batch, features, task, fast, accelerator.device)
    model.train()
    while state.step < steps and not state.finished:
        batches = (task.batches or functools.partial(epoch_batches, lengths))(cfg.batch_size, cfg.seed, state.epoch,
                                                                             cfg.group_by_length)
        # every process sees the whole global batch, takes its shard, and normalizes the summed
        # loss by the global item count: exact for any micro-batch split and process count
        todo = [micro_batches(b, rank, world, cfg.grad_accum) for b in batches[state.batch_in_epoch:]]
        feed = Prefetcher(todo, make_batch) if fast.prefetch else ([make_batch(i) for i in m] for m in todo)
        for global_batch, micro, device_batches in zip(batches[state.batch_in_epoch:], todo, feed):
            t0 = time.perf_counter()
            scale = world / task.num_items([features[i] for i in global_batch])
            if graphs is not None:  # forward, backward and update: one recorded graph per bucket (needs sync_free)
                loss_sum, grad_norm = graphs.step(device_batches[0], scale)
                scheduler.step()
            else:
                loss_sum = _forward_backward(model, stepper, micro, device_batches, features, task, loss_fn, scale, accelerator)
                if world > 1:  # every rank must see the same (global) loss: the NaN stop below is taken by all or none
                    loss_sum = accelerator.reduce(loss_sum, "sum")
                if not fast.sync_free and not torch.isfinite(loss_sum):  # diverged: skip this update, keep a good checkpoint, stop
                    optimizer.zero_grad(set_to_none=True)
                    state.history.append({"step": state.step + 1, "epoch": state.epoch, "train_loss": float(loss_sum)})
                    _stop_diverged(state, f"non-finite loss at step {state.step + 1}")
                    if task.evaluate is not None and ckpt.path("last") is None:  # nothing saved yet: the weights before this step are still finite
                        _evaluate_and_checkpoint(model, optimizer, scheduler, task, cfg, ckpt, accelerator, state, steps)
                    break
                grad_norm = _update(model, optimizer, scheduler, clip, cfg.max_grad_norm, step_hooks, accelerator, state.step)
            state.step += 1
            state.batch_in_epoch += 1
            log_rows.add({"step": state.step, "epoch": state.epoch + state.batch_in_epoch / len(batches), "scale": scale / world,
                          "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}, loss_sum, grad_norm, state.history)
            end_of_epoch = state.batch_in_epoch == len(batches)
            due = state.step % eval_every == 0 or state.step == steps or (end_of_epoch and not cfg.eval_every)
            if log_rows.due(state.step) or due or state.step >= steps:
                if not log_rows.flush(state.history):  # sync_free: a step's loss was not finite since the last read
                    _stop_diverged(state, f"non-finite loss by step {state.step}")
                    break
                progress.update(state.step, loss=state.history[-1]["train_loss"])
            if due and task.evaluate is not None:
                _evaluate_and_checkpoint(model, optimizer, scheduler, task, cfg, ckpt, accelerator, state, steps)
            for cb in callbacks:
                cb(state)
            if state.finished or state.step >= steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
        if fast.prefetch:
            feed.close()
    log_rows.flush(state.history)
    progress.close()
    if not state.finished:
        state.finished, state.stop_reason = True, state.stop_reason or f"reached {steps} steps"
    return state


def _no_step_graphs(cfg: TrainConfig, accelerator: Accelerator) -> str | None:
    """Why this run's steps cannot each be recorded as one CUDA graph, or None."""
    if accelerator.num_processes > 1:
        return "several processes (their gradients are reduced between backward and update)"
    if cfg.grad_accum > 1:
        return "gradient accumulation (several backward passes per update)"
    if accelerator.scaler is not None:
        return "fp16 loss scaling checks the gradients on the host before each update"
    return None


def _prepare(model, cfg: TrainConfig, accelerator: Accelerator, steps: int) -> tuple:
    """FSDP sharding where asked (before the optimizer, which then holds each process's shards), the
    optimizer and schedule, and accelerate's wrapping: (model, optimizer, scheduler, sharded)."""
    sharded = fsdp.wanted(cfg, accelerator.num_processes)
    if cfg.fsdp == "on" and not sharded:
        log.warning("train.fsdp on: one process has nothing to shard with; training unsharded (launch several "
                    "processes with torchrun or accelerate launch)")
    if sharded:
        fsdp.shard(model)
        log.info("FSDP: the model is sharded over %d processes", accelerator.num_processes)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)  # stepped by us once per optimizer step
    if sharded:
        return model, accelerator.prepare(optimizer), scheduler, True
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, False


def _model_loss(task: LoopTask, model, batch: dict) -> torch.Tensor:
    """The task's summed loss of the model's outputs on a batch (the model sees no targets)."""
    return task.loss(model(**inputs(batch)), batch)


def _forward_backward(model, stepper, micro: list[list[int]], device_batches: list[dict], features: list[dict],
                      task: LoopTask, loss_fn: Callable, scale: float, accelerator: Accelerator) -> torch.Tensor:
    """One step's micro-batches through `stepper` (the model, or its compiled view), gradients
    accumulated (synced on the last micro-batch only); the summed loss, on the device."""
    loss_sum = torch.zeros((), device=accelerator.device)
    step_fn = task.adversary.step if task.adversary is not None else plain_step
    for k, (idx, batch) in enumerate(zip(micro, device_batches)):
        sync = accelerator.no_sync(model) if k < len(micro) - 1 else nullcontext()
        with sync, accelerator.autocast():
            loss = step_fn(stepper, batch, loss_fn,
                           lambda lo, s=scale: accelerator.backward(lo * s), lambda: accelerator.no_sync(model),
                           [features[i] for i in idx])
        loss_sum += loss.detach()
    return loss_sum


def _update(model, optimizer, scheduler, clip: Callable, max_grad_norm: float, step_hooks: tuple, accelerator: Accelerator,
            step: int) -> torch.Tensor | None:
    """Clip, optimizer step, step hooks (while gradients exist), schedule, zero the gradients; the
    gradient norm before clipping (on the device), or None without clipping."""
    grad_norm = fsdp.plain(clip(max_grad_norm)) if max_grad_norm > 0 else None
    optimizer.step()
    for hook in step_hooks:
        hook(accelerator.unwrap_model(model), step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _clipper(model, accelerator: Accelerator) -> Callable[[float], torch.Tensor]:
    """Clips the gradient norm of the trainable parameters, listed once: torch's clip directly (one
    foreach pass where the device has it), unless fp16 gradients must first be unscaled (accelerate's
    clip does that). On BERT's 199 weight tensors accelerate's wrapper took 0.95 ms of host time per
    clip on CPU, torch's 0.60."""
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator.scaler is not None:
        return lambda max_norm: accelerator.clip_grad_norm_(params, max_norm)
    return lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)


def _device_batch(features: list[dict], task: LoopTask, fast: FastPath, device: torch.device, idx: list[int]) -> dict:
    batch = task.collate([features[i] for i in idx])
    if fast.buckets:
        batch = pad_to_bucket(batch, fast.buckets, task.pad_values)
    return to_device(batch, device, pin=fast.prefetch and device.type == "cuda")


def _stop_diverged(state: TrainState, what: str) -> None:
    state.finished = True
    state.stop_reason = f"{what}: stopped; the last good checkpoint is restored (see the fit diagnosis in report.md)"
    log.warning(state.stop_reason)


def _evaluate_and_checkpoint(model, optimizer, scheduler, task: LoopTask, cfg: TrainConfig, ckpt: Checkpoints,
                             accelerator: Accelerator, state: TrainState, steps: int) -> None:
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if finite:
        t0 = time.perf_counter()
        model.eval()
        metrics = task.evaluate(accelerator.unwrap_model(model))  # each rank the whole dev set: no collectives
        model.train()
        state.eval_seconds += time.perf_counter() - t0
    if not finite or not math.isfinite(metrics.get("loss", 0.0)):  # never checkpoint a diverged model
        _stop_diverged(state, f"non-finite {'weights' if not finite else 'dev outputs'} at step {state.step}")
        state.history.append({"step": state.step, "train_loss": float("nan")})
        if ckpt.path("last") is None:
            from lmtune.errors import InputError
            raise InputError(f"training diverged at step {state.step}, before any good checkpoint: lower train.lr "
                             "(3-10x), raise train.warmup_ratio and keep train.max_grad_norm at 1.0.")
        return
    value = metrics[cfg.metric]
    improved = is_better(cfg.metric, value, state.best_metric)
    if improved:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
    else:
        state.bad_evals += 1
    state.history.append({"step": state.step, **{f"dev_{k}": v for k, v in metrics.items() if isinstance(v, float)}})
    log.info("step %d/%d  dev %s %.4f%s", state.step, steps, cfg.metric, value, "  (best)" if improved else "")
    if cfg.patience and state.bad_evals >= cfg.patience:
        state.finished = True
        state.stop_reason = f"early stopping: dev {cfg.metric} did not improve for {cfg.patience} evaluations"
        log.info(state.stop_reason)
    elif state.step >= steps:
        state.finished, state.stop_reason = True, f"reached {steps} steps"
    t0 = time.perf_counter()
    rng_states = all_rng_states(accelerator)  # every process takes part; the main one writes them all
    full = fsdp.full_states(model, optimizer) if fsdp.wanted(cfg, accelerator.num_processes) else None  # all gather
    if accelerator.is_main_process:  # saved once, by the main process
        ckpt.save(accelerator.unwrap_model(model), optimizer, scheduler, state, improved, rng_states, full)
    state.checkpoint_seconds += time.perf_counter() - t0
    accelerator.wait_for_everyone()


# read by the task's loss, never by the model (reference_logps: DPO's; soft_targets: a distilled student's, lmtune.distill)
TARGET_KEYS = frozenset({"labels", "reference_logps", "soft_targets"})


def inputs(batch: dict) -> dict:
    """Model inputs without the targets: the task computes the loss, so the model must not (it would
    cost a second loss and, for wrappers such as AdaLoRA, change what forward does)."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


@torch.inference_mode()
def predict_outputs(model, features: list[dict], collate: Callable, unbatch: Callable,
                    device: torch.device, desc: str = "predict", progress: str = "auto") -> list[np.ndarray]:
    """Per-example outputs in the original order; batches sorted by length under a token budget."""
    was_training = model.training
    model.eval()
    out: list = [None] * len(features)
    # on CPU, batches of ~1k tokens stay in cache: 1.3x the sentences/s of 8k-token batches (SST-2 dev,
    # MiniLM, torch and onnxruntime alike); a GPU wants the big ones
    budget = (8192, 256) if device.type == "cuda" else (1024, 32)
    batches = eval_batches([f["length"] for f in features], *budget)
    bar = Progress(len(batches), progress if len(batches) >= 20 else "none", desc)
    for n, idx in enumerate(batches, 1):
        batch = {k: t.to(device) for k, t in collate([features[i] for i in idx]).items()}
        for i, row in zip(idx, unbatch(model(**inputs(batch)), batch)):
            out[i] = row
        bar.update(n)
    bar.close()
    model.train(was_training)
    return out
