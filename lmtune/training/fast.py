"""The training loop's fast path: train.compile, length_buckets, sync_free, prefetch (fused AdamW is
in optim.py; the recorded whole step, train.step_graphs, in step_graphs.py). Each piece keeps the
optimisation the same: the same examples form each batch, the loss is normalised by the same counts,
padding is masked and its labels ignored.

Written here rather than taken from the HF Trainer because the Trainer's defaults are what make a
small-batch fine-tune slow on a GPU: it pads to each batch's longest (a new shape almost every batch,
for which CUDA graphs would record a new graph), reads the loss back every step (the host waits for
the device) and collates on the thread that launches the kernels.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmtune.config import TrainConfig

log = logging.getLogger("lmtune")

FIRST_BUCKET = 16
READ_EVERY = 50  # sync_free: steps between two reads of the losses kept on the device


@dataclass(frozen=True)
class FastPath:
    compile_mode: str | None  # None: eager
    buckets: tuple[int, ...]  # static batch widths; () = each batch as wide as its longest example
    sync_free: bool
    prefetch: bool
    step_graphs: bool = False  # the whole optimizer step recorded per bucket (step_graphs.py)


def _on(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def bucket_widths(longest: int) -> tuple[int, ...]:
    """16, 32, 64, ... doubling up to the longest training example (the last bucket is the longest
    itself, rounded up to a multiple of 8, so it pads no further than it must)."""
    out, w = [], FIRST_BUCKET
    while w < longest:
        out.append(w)
        w *= 2
    out.append(max(FIRST_BUCKET, -(-longest // 8) * 8))
    return tuple(out)


def resolve(cfg: TrainConfig, device: torch.device, longest: int, pad_values: dict | None,
            no_compile: str | None = None, no_step_graphs: str | None = None) -> FastPath:
    """The pieces that apply here. `no_compile`: why this run cannot be compiled (hooks that change
    the forward pass), or None; `no_step_graphs`: why its steps cannot be recorded whole (several
    processes, accumulation, fp16), or None. Each piece switched off for a reason is said once."""
    cuda = device.type == "cuda"
    graphs = _step_graphs(cfg, cuda, no_compile or no_step_graphs)
    # auto with step graphs: no compile. On the H200 it made a CoNLL epoch 2.36 s instead of 3.05 s but
    # cost 176 s on the first one, which a fine-tune of a few epochs never earns back
    mode = (None if graphs else "reduce-overhead" if cuda else None) if cfg.compile == "auto" else (
        None if cfg.compile == "off" else cfg.compile)
    if mode and no_compile:
        log.info("fast path: train.compile off: %s", no_compile)
        mode = None
    if mode == "reduce-overhead" and (graphs or not cuda):
        log.info("fast path: train.compile runs in default mode: %s", "the step graphs record the whole step"
                 if graphs else "CUDA graphs need a GPU")
        mode = "default"
    buckets: tuple[int, ...] = ()
    if _on(cfg.length_buckets, mode is not None or graphs):
        if pad_values is None:
            log.info("fast path: length buckets off: this task's batches cannot be padded further without changing its loss")
        else:
            buckets = bucket_widths(longest)
    if not buckets and (graphs or mode == "reduce-overhead"):  # a CUDA graph per distinct batch width would pile up
        if mode == "reduce-overhead" or (graphs and cfg.compile == "auto"):  # auto compiles what it cannot record
            mode = "default"
        log.info("fast path: no length buckets, so no CUDA graphs%s", "; train.compile runs in default mode" if mode else "")
        graphs = False
    sync_free = _on(cfg.sync_free, cuda)
    if graphs and not sync_free:
        log.info("fast path: train.step_graphs off: train.sync_free off checks each loss on the host before its update")
        graphs = False
    return FastPath(mode, buckets, sync_free, _on(cfg.prefetch, cuda), graphs)


def _step_graphs(cfg: TrainConfig, cuda: bool, why_not: str | None) -> bool:
    wanted = (cuda and cfg.compile != "reduce-overhead") if cfg.step_graphs == "auto" else cfg.step_graphs == "on"
    if wanted and why_not:
        log.info("fast path: train.step_graphs off: %s", why_not)
        return False
    if wanted and not cuda:
        log.info("fast path: CUDA graphs need a GPU: each step runs through the step graphs' static buffers without one")
    return wanted


def pad_to_bucket(batch: dict[str, torch.Tensor], buckets: tuple[int, ...], pad_values: dict[str, int]) -> dict[str, torch.Tensor]:
    """Right-pad every sequence key of a collated batch to the smallest bucket that holds it."""
    width = batch["input_ids"].shape[1]
    target = next((b for b in buckets if b >= width), width)
    if target == width:
        return batch
    out = dict(batch)
    for key, value in pad_values.items():
        t = batch.get(key)
        if t is not None and t.dim() >= 2 and t.shape[1] == width:
            out[key] = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, target - width), value=value)
    return out


def compile_model(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """A compiled view of the whole model for training steps; it shares the parameters, and the eager
    module still evaluates, saves and exports. One compile with dynamic shapes serves every bucket;
    under reduce-overhead each bucket shape gets its own CUDA graph (recorded, not recompiled).
    Whole-model rather than per-layer: on the H200, with each layer compiled alone a BERT-base step
    took 45 ms (19.9 s per CoNLL epoch); one whole-model graph with CUDA graphs took 13.8 ms, and the
    whole step recorded (step_graphs.py) 5.4 ms with this compile, 6.9 ms without."""
    if fast.compile_mode is None:
        return model
    return torch.compile(model, mode=fast.compile_mode, dynamic=True)


_DONE = object()


class Prefetcher:
    """Collates the coming micro-batches in a background thread, in order, and starts their copy to
    the device (through pinned memory on CUDA), `depth` optimizer steps ahead. Iterating it yields
    one list of device batches per step; an error in the thread is raised in the caller's."""

    def __init__(self, steps: list[list[list[int]]], make: Callable[[list[int]], dict], depth: int = 4) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(steps, make), daemon=True)
        self._thread.start()

    def _run(self, steps, make) -> None:
        try:
            for micro in steps:
                item = [make(idx) for idx in micro]
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._q.put(e)

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            self._q.put(_DONE)  # stays exhausted
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, pin: bool) -> dict[str, torch.Tensor]:
    if pin:  # pinned host memory lets the copy run asynchronously with the step in flight
        return {k: t.pin_memory().to(device, non_blocking=True) for k, t in batch.items()}
    return {k: t.to(device) for k, t in batch.items()}


class StepLog:
    """Each step's loss and gradient norm: read at once, or (sync_free) kept on the device and read
    every READ_EVERY steps and before evaluations, all in one transfer."""

    def __init__(self, sync_free: bool) -> None:
        self.sync_free = sync_free
        self._pending: list[tuple[dict, torch.Tensor, torch.Tensor | None]] = []

    def add(self, row: dict, loss: torch.Tensor, grad_norm: torch.Tensor | None, history: list) -> None:
        """row holds everything but train_loss (the loss summed over the step, times row["scale"])."""
        self._pending.append((row, torch.as_tensor(loss).detach(), grad_norm))
        if not self.sync_free:
            self.flush(history)

    def due(self, step: int) -> bool:
        return not self.sync_free or step % READ_EVERY == 0

    def flush(self, history: list) -> bool:
        """Move the kept rows into history; False when a step's loss was not finite."""
        if not self._pending:
            return True
        losses = torch.stack([loss.float().reshape(()) for _, loss, _ in self._pending]).tolist()
        norms = [g for _, _, g in self._pending]
        norm_values = torch.stack([g.float().reshape(()) for g in norms if g is not None]).tolist() if any(
            g is not None for g in norms) else []
        it = iter(norm_values)
        ok = True
        for (row, _, g), value in zip(self._pending, losses):
            scale = row.pop("scale")
            row["train_loss"] = value * scale
            if g is not None:
                row["grad_norm"] = next(it)
            ok = ok and value == value and abs(value) != float("inf")
            history.append(row)
        self._pending.clear()
        return ok
