"""Crash-safe checkpoints: full training state in step folders, pointed to by one small file.

Layout: checkpoints/step-000120/{model.safetensors, optimizer.pt, scheduler.pt, rng.pt + host_rng.json (every
process's random state, by rank), state.json}
and checkpoints/pointer.json = {"last": "step-000120", "best": "step-000080"}.
A new checkpoint is written under a temp name, renamed into place, and only then does the pointer
(replaced atomically) name it; a crash at any moment leaves the previous pointer and its folders intact.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmtune.io import atomic_dir, write_json

log = logging.getLogger("lmtune")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    finished: bool = False
    stop_reason: str = ""
    eval_seconds: float = 0.0  # time spent in dev evaluation inside the loop
    checkpoint_seconds: float = 0.0  # time spent writing checkpoints
    history: list = field(default_factory=list)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Checkpoints:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.pointer_file = self.root / "pointer.json"

    def pointer(self) -> dict:
        if self.pointer_file.is_file():
            return json.loads(self.pointer_file.read_text())
        return {}

    def path(self, which: str) -> Path | None:
        name = self.pointer().get(which)
        return self.root / name if name else None

    def save(self, model, optimizer, scheduler, state: TrainState, is_best: bool, rng_states: list[dict] | None = None,
             full_states: tuple[dict, dict] | None = None) -> Path:
        """rng_states: every process's random state, by rank (all_rng_states); this process's alone by default.
        full_states: a sharded run's gathered (model, optimizer) state dicts, written instead of the model's and optimizer's."""
        name = f"step-{state.step:06d}"
        target = self.root / name
        with atomic_dir(target) as tmp:
            if full_states:
                save_file({k: v.contiguous() for k, v in full_states[0].items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                save_model(model, str(tmp / "model.safetensors"))
            torch.save(full_states[1] if full_states else optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            ranks = rng_states or [rng_state()]
            torch.save({"ranks": [{"torch": r["torch"], "cuda": r.get("cuda", [])} for r in ranks]}, tmp / "rng.pt")
            (tmp / "host_rng.json").write_text(json.dumps(
                {"ranks": [{"numpy": _jsonable(r["numpy"]), "python": _jsonable(r["python"])} for r in ranks]}))
            (tmp / "state.json").write_text(json.dumps(asdict(state)))
        pointer = self.pointer()
        pointer["last"] = name
        if is_best or "best" not in pointer:
            pointer["best"] = name
        write_json(self.pointer_file, pointer)
        self._prune(set(pointer.values()))
        return target

    def _prune(self, keep: set[str]) -> None:
        for d in self.root.glob("step-*"):
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def load_weights(self, model, which: str = "best") -> None:
        path = self.path(which)
        load_model(model, str(path / "model.safetensors"))

    def load_state(self, model, optimizer, scheduler, rank: int = 0, sharded: bool = False) -> TrainState:
        """Restore everything for an exact resume: weights, optimizer, schedule, this process's RNGs
        (each rank its own: dropout and sampling draw differently per rank), counters. sharded: an
        FSDP model, which takes the full states and keeps its shards."""
        path = self.path("last")
        if sharded:
            from lmtune.training import fsdp
            fsdp.load_full_states(model, optimizer, load_file(str(path / "model.safetensors")),
                                  torch.load(path / "optimizer.pt", weights_only=True))
        else:
            load_model(model, str(path / "model.safetensors"))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        devices = torch.load(path / "rng.pt", weights_only=True)
        hosts = json.loads((path / "host_rng.json").read_text())
        devices, hosts = devices.get("ranks", [devices]), hosts.get("ranks", [hosts])  # checkpoints before per-rank states
        if rank >= len(devices):
            log.warning("resume: the checkpoint holds random states for %d process(es); process %d starts from "
                        "process 0's (same weights and data order; dropout masks differ from an uninterrupted run)",
                        len(devices), rank)
            rank = 0
        torch.set_rng_state(devices[rank]["torch"])
        if devices[rank].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(devices[rank]["cuda"])
        np.random.set_state(_unjson(hosts[rank]["numpy"]))
        random.setstate(_unjson(hosts[rank]["python"]))
        return TrainState(**json.loads((path / "state.json").read_text()))


def all_rng_states(accelerator) -> list[dict]:
    """Every process's random state, by rank (a collective: all processes call it at the same point)."""
    state = rng_state()
    if accelerator.num_processes == 1:
        return [state]
    states: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(states, state)
    return states


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__nd__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _unjson(x):
    if isinstance(x, dict) and "__nd__" in x:
        return np.array(x["__nd__"], dtype=x["dtype"])
    if isinstance(x, list):
        return tuple(_unjson(v) for v in x)
    return x
