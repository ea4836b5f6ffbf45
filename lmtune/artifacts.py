"""The run directory's layout: the one module that names its files and reads and writes the model
metadata (lmtune.json) and the task state saved beside a model (model/, export/, a merged folder).

    RUN_DIR/config.yaml  splits.json  audit.json  train.log  history.jsonl  metrics.json  report.md
            checkpoints/  model/ (lmtune.json, task_state.safetensors, weights, tokenizer, README.md: the model card)
            predictions/{dev,test}.jsonl  export/ (the same metadata + ONNX files)
            gguf/ (model.QUANT.gguf and gguf.json: their own folder, which an ONNX export rebuilding export/ leaves alone)
            drift_reference.safetensors (dev embeddings and scores for the serve drift monitor)
            running.json ({pid, host} while a process trains the run)
            events.jsonl (history.jsonl's rows, appended as training makes them: what live charts follow)
            mlflow_run.json (the MLflow run a tracked run logged to, where `lmtune export` adds its ONNX files)
            results.json and the analyses' NAME.json; label_noise.json(l), generation.json, index/
            active.json, active_curve.png, active/ (the labeling loop: batches, grown train files, retrain configs)
            pseudo_labels.jsonl and selftrain/round-N/ (data.unlabeled: self-training's pseudo-labels and rounds)

It also owns the run directory's lifecycle: a new one (new_run_dir), the one --resume continues
(resolve_run_dir), and the one all processes of a launch share (shared_run_dir); and model_meta builds
the lmtune.json dict wherever a model folder is written.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.errors import InputError
from lmtune.io import write_json

if TYPE_CHECKING:
    from lmtune.config import Config

log = logging.getLogger("lmtune")

META = "lmtune.json"
TASK_ARRAYS = "task_state.safetensors"  # task state too big for lmtune.json (e.g. the Mahalanobis scorer)


class RunDir:
    """Paths of a run directory's files (nothing is created by naming them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    splits = property(lambda self: self.root / "splits.json")
    audit = property(lambda self: self.root / "audit.json")
    log = property(lambda self: self.root / "train.log")
    history = property(lambda self: self.root / "history.jsonl")
    events = property(lambda self: self.root / "events.jsonl")  # history rows appended while training (live charts)
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.md")
    checkpoints = property(lambda self: self.root / "checkpoints")
    model = property(lambda self: self.root / "model")
    export = property(lambda self: self.root / "export")
    card = property(lambda self: self.root / "model" / "README.md")  # the Hub model card
    running_marker = property(lambda self: self.root / "running.json")  # {pid, host} while a process trains it
    pointer = property(lambda self: self.root / "checkpoints" / "pointer.json")  # the last checkpoint: a run to resume
    model_meta = property(lambda self: self.root / "model" / META)
    export_meta = property(lambda self: self.root / "export" / META)
    export_report = property(lambda self: self.root / "export" / "export.json")
    gguf = property(lambda self: self.root / "gguf")  # lmtune export --format gguf's files (export/ is the ONNX export's, rebuilt whole)
    gguf_report = property(lambda self: self.root / "gguf" / "gguf.json")  # {quantize: file, size, verification}
    results = property(lambda self: self.root / "results.json")
    label_noise = property(lambda self: self.root / "label_noise.json")  # the search's result, cached for resume
    label_noise_rows = property(lambda self: self.root / "label_noise.jsonl")  # the flagged training rows
    fewshot = property(lambda self: self.root / "fewshot.json")  # the few-shot stage's decision and figures, kept for resume
    generation = property(lambda self: self.root / "generation.json")
    index = property(lambda self: self.root / "index")
    pretrain = property(lambda self: self.root / "pretrain.json")
    pseudo_labels = property(lambda self: self.root / "pseudo_labels.jsonl")  # self-training: each pseudo-label, its round
    selftrain = property(lambda self: self.root / "selftrain")  # self-training: one run folder per round (round-N/)
    mlflow_run = property(lambda self: self.root / "mlflow_run.json")  # {tracking_uri (masked), run_id}: where export logs
    active = property(lambda self: self.root / "active.json")  # the labeling loop's record (lmtune.active)
    active_dir = property(lambda self: self.root / "active")  # its batches, labels, grown train files, retrain configs
    active_curve = property(lambda self: self.root / "active_curve.png")  # labels vs the dev metric over the loop's runs

    def predictions(self, split: str) -> Path:
        return self.root / "predictions" / f"{split}.jsonl"

    def analysis(self, name: str) -> Path:
        """A run analysis's own file (drift, fairness, explain, robustness, ensemble, soup): NAME.json."""
        return self.root / f"{name}.json"

    def finished(self) -> bool:
        """Training wrote the model's metadata last, so its presence means the run finished."""
        return self.model_meta.is_file()

    def running(self) -> bool:
        """A live process on this machine is training the run: its marker names a pid that exists here.
        A marker left by a killed process (or one from another machine) does not count."""
        try:
            marker = json.loads(self.running_marker.read_text())
        except (OSError, ValueError):
            return False
        pid = marker.get("pid") if isinstance(marker, dict) else None
        if not isinstance(pid, int) or marker.get("host") != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by another user
            pass
        return True

    @contextmanager
    def mark_running(self) -> Iterator[None]:
        """running.json for as long as this process trains the run (removed however training ends)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.running_marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        try:
            yield
        finally:
            self.running_marker.unlink(missing_ok=True)

    def read_metrics(self) -> dict:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


def write_meta(folder: Path, meta: dict) -> None:
    """lmtune.json; its config with credentials masked (`lmtune push` uploads this file)."""
    from lmtune.redact import redact
    write_json(folder / META, {**meta, "config": redact(meta["config"])} if "config" in meta else meta)


def update_task_state(folder: Path, task: Any) -> None:
    """Rewrite only the task state in a model folder's lmtune.json (a new abstention threshold)."""
    meta = read_meta(folder)
    meta["task_state"] = task.state()
    write_meta(folder, meta)


def save_task_arrays(task: Any, folder: Path) -> None:
    arrays = task.arrays()
    if arrays:
        from safetensors.numpy import save_file
        save_file({k: v.copy() for k, v in arrays.items()}, folder / TASK_ARRAYS)


def restore_task_state(task: Any, meta: dict, folder: Path) -> None:
    """The task's saved state: small values from lmtune.json, arrays from safetensors."""
    task.set_state(meta.get("task_state", {}))
    if (folder / TASK_ARRAYS).is_file():
        from safetensors.numpy import load_file
        task.set_arrays(load_file(folder / TASK_ARRAYS))


def model_meta(task: Any, labels: list[str] | None = None, config: Config | None = None, *, saved: Path | None = None,
               refresh_state: bool = True, **extra: Any) -> dict:
    """The lmtune.json dict of a model folder, built here only. New (saved=None): the task's name, the
    labels, the config, the lmtune version and the task state. saved=FOLDER: that folder's metadata
    (an export, a soup or a merge of it), with the task state refreshed from `task` (refitted outputs)
    unless refresh_state is False. `extra` adds or replaces keys (base_model, ensemble, soup, ...)."""
    if saved is not None:
        meta = read_meta(saved)
        if refresh_state:
            meta["task_state"] = task.state()
    else:
        from lmtune import __version__
        meta = {"task": task.name, "labels": labels, "config": config.to_dict(), "lmtune_version": __version__,
                "task_state": task.state()}
    meta.update(extra)
    return meta


# ---- the run directory's lifecycle -----------------------------------------------------------------
def comparable(cfg: Config) -> dict:
    """The config as --resume compares it: what the run computes, not how it shows progress."""
    d = cfg.redacted_dict()  # config.yaml holds the masked form; compare like with like
    d["train"].pop("progress", None)
    return d


def new_run_dir(cfg: Config) -> Path:
    """output_dir/run_name, or a timestamp name made unique: two trainings started in the same
    second get -2, -3 ... (mkdir is the atomic claim, so they can never share a folder)."""
    if cfg.run_name:
        run_dir = Path(cfg.output_dir) / cfg.run_name
        if run_dir.exists():
            raise InputError(f"{run_dir}: run directory already exists. Pick another run_name, or add --resume "
                             "to continue it; lmtune never overwrites a run.")
        run_dir.mkdir(parents=True)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run_dir = Path(cfg.output_dir) / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise InputError(f"{cfg.output_dir}: cannot find a free run name for {stamp}; set run_name.")


def resolve_run_dir(cfg: Config, resume: bool | str | Path) -> Path:
    """The run directory: a new one (created here), or the unfinished run that --resume continues."""
    if not resume:
        return new_run_dir(cfg)
    run_dir = _resumed_run_dir(cfg, resume)
    rd = RunDir(run_dir)
    if not rd.pointer.is_file() or not rd.config.is_file():
        raise InputError(f"{run_dir}: no checkpoint to resume from.")
    import yaml

    from lmtune.config import build_config
    old = comparable(build_config(yaml.safe_load(rd.config.read_text())))
    new = comparable(cfg)
    diff = [f"{s}.{k}" for s in old for k in (old[s] if isinstance(old[s], dict) else [None])
            if (old[s].get(k) if k else old[s]) != (new[s].get(k) if k else new[s]) and s not in ("run_name", "output_dir")]
    if diff:
        raise InputError(f"--resume: the config differs from the one {run_dir} was started with "
                         f"({', '.join(diff)}). Resume with the same config.")
    return run_dir


def _resumed_run_dir(cfg: Config, resume: bool | str | Path) -> Path:
    """The run --resume names, or (resume=True) the newest unfinished run with a checkpoint under output_dir."""
    if resume is not True:
        run_dir = Path(resume)
        if RunDir(run_dir).finished():
            raise InputError(f"--resume: {run_dir} is a finished run (it has model/{META}); lmtune never rewrites it. "
                             "Start a new run without --resume.")
        return run_dir
    runs = [RunDir(c.parent.parent) for c in Path(cfg.output_dir).glob(f"*/{RunDir('.').pointer}")]
    if cfg.run_name:
        runs = [r for r in runs if r.root.name == cfg.run_name]
    unfinished = sorted((r for r in runs if not r.finished()), key=lambda r: r.pointer.stat().st_mtime)
    if not unfinished:
        done = f" ({len(runs)} run(s) there are finished)" if runs else ""
        raise InputError(f"--resume: no unfinished run with a checkpoint under {cfg.output_dir}/{done}. "
                         "Start without --resume, or give the run directory: --resume RUN_DIR.")
    log.info("--resume: continuing %s (the newest unfinished run with a checkpoint)", unfinished[-1].root)
    return unfinished[-1].root


def shared_run_dir(cfg: Config, resume: bool | str | Path) -> Path:
    """The main process picks (and creates) the run directory and tells the others, so that N
    processes of one `accelerate launch` / `torchrun` job share one run; an error reaches every rank."""
    from accelerate.utils import broadcast_object_list

    from lmtune.runtime import partial_state
    state = partial_state()
    decided: list = [None]
    if state.is_main_process:
        try:
            run_dir = resolve_run_dir(cfg, resume)
            decided[0] = ("ok", str(run_dir))
        except InputError as e:
            decided[0] = ("error", str(e))
    if state.num_processes > 1:
        broadcast_object_list(decided)
    kind, value = decided[0]
    if kind == "error":
        raise InputError(value)
    return Path(value)
