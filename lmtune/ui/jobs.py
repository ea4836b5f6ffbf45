"""Training started from the browser: each job is a child process (`python -m lmtune train`, or `export` /
`push` on a finished run), so the UI stays responsive and a crash of training cannot take it down; its
output goes to a log file that the page follows as server-sent events. And the cleaned copies of data
files the audit views export.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmtune.errors import InputError
from lmtune.io import atomic_path, write_json
from lmtune.config import path_keys
from lmtune.ui.confine import Confinement, PathRefused, run_name_ok

_PROGRESS = re.compile(r"^(?:train|step) (\d+)/(\d+)")  # progress lines, and each evaluation's line
_RUN_DIR = re.compile(r"^run dir: (.+)$")


@dataclass
class Job:
    id: str
    folder: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    stopped: bool = False
    kind: str = "train"  # train, export or push: the lmtune command the child runs
    run_dir: Path | None = None  # the run it trains (known before the child starts) or exports / pushes

    @property
    def log(self) -> Path:
        return self.folder / "train.out"

    def state(self) -> dict:
        code = self.proc.poll()
        status = "running" if code is None else "stopped" if self.stopped else "finished" if code == 0 else "failed"
        step = total = None
        run_dir = None
        for line in self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []:
            if m := _PROGRESS.match(line):
                step, total = int(m.group(1)), int(m.group(2))
            if m := _RUN_DIR.match(line):
                run_dir = m.group(1)
        if run_dir is None and self.kind != "train" and self.run_dir is not None:  # export / push: the run they act on
            run_dir = str(self.run_dir)
        return {"id": self.id, "kind": self.kind, "status": status, "exit_code": code, "step": step, "total": total,
                "run": Path(run_dir).name if run_dir else None, "seconds": round(time.time() - self.started, 1)}


class Jobs:
    def __init__(self, runs_dir: Path, workdir: Path, confine: Confinement | None = None) -> None:
        self.runs_dir, self.workdir, self.folder = runs_dir, workdir, workdir / ".lmtune-ui" / "jobs"
        self.confine = confine or Confinement.of(workdir)
        self.jobs: dict[str, Job] = {}

    def start(self, config_text: str) -> Job:
        """Check the edited config, then train it in a child process into the UI's runs folder.
        Every path it names must be inside the working directory or an allowed folder (PathRefused, 403):
        nothing is created or started before that is checked."""
        cfg = _mapping(config_text)
        job_id = uuid.uuid4().hex[:10]
        folder = self.folder / job_id
        # relative paths mean what they mean in the working directory (as the form and its file pickers
        # show them), not in the job's own folder: rebased there, and written out absolute for the child
        built = _built(cfg, self.workdir.resolve())
        if not run_name_ok(built.run_name):
            raise PathRefused("run_name", str(built.run_name), "a run name is one folder name inside the runs folder "
                                                               "(letters, digits, . _ -; no / or ..)")
        self.confine.check_config(built)
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(_with_rebased_paths(config_text, cfg, built), encoding="utf-8")
        cmd = [sys.executable, "-m", "lmtune", "train", str(folder / "config.yaml"), "--output_dir", str(self.runs_dir),
               "--train.progress", "lines"]
        if not built.run_name:
            cmd += ["--run_name", f"ui-{job_id}"]
        return self._spawn(job_id, folder, cmd, "train", self.runs_dir / (built.run_name or f"ui-{job_id}"))

    def start_command(self, kind: str, args: list[str], run_dir: Path) -> Job:
        """`lmtune KIND ARGS...` on a finished run (export, push) as a job, followed like a training job.
        The caller has checked every path in args against the confinement."""
        job_id = uuid.uuid4().hex[:10]
        folder = self.folder / job_id
        folder.mkdir(parents=True)
        return self._spawn(job_id, folder, [sys.executable, "-m", "lmtune", kind, *args], kind, run_dir)

    def _spawn(self, job_id: str, folder: Path, cmd: list[str], kind: str, run_dir: Path) -> Job:
        with open(folder / "train.out", "wb") as out:  # cwd: the other paths resolve as they were checked
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        job = Job(job_id, folder, proc, kind=kind, run_dir=run_dir)
        self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        return self.jobs[job_id]

    def stop(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job.proc.poll() is None:
            job.stopped = True
            os.killpg(job.proc.pid, signal.SIGINT)  # lmtune stops at a clean point: the last checkpoint stays intact
            try:
                job.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
        return job.state()

    def close(self) -> None:
        for job_id in list(self.jobs):
            self.stop(job_id)


def _mapping(config_text: str) -> dict:
    try:
        cfg = yaml.safe_load(config_text)
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise InputError(f"config: not valid YAML ({e}).") from None
    if not isinstance(cfg, dict):
        raise InputError("config: expected a mapping of config sections.")
    return cfg


def _with_rebased_paths(config_text: str, cfg: dict, built) -> str:
    """The job's YAML as typed, or, where it gives a relative file path that build_config rebased, the
    whole config with those keys set to the absolute paths that were checked (comments are then lost)."""
    import copy

    import yaml
    out, changed = copy.deepcopy(cfg), False
    for key in path_keys():
        section, _, leaf = key.rpartition(".")
        given = out.get(section, {}) if section else out
        if isinstance(given, dict) and given.get(leaf) not in (None, ""):
            resolved = getattr(getattr(built, section) if section else built, leaf)
            if resolved != given[leaf]:
                given[leaf], changed = resolved, True
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True) if changed else config_text


def _built(cfg: dict, folder: Path):
    """The Config the child will build; unknown keys and bad values are errors before anything starts."""
    from lmtune.config import build_config
    try:
        return build_config(cfg, base_dir=folder)
    except (TypeError, ValueError, AttributeError, RecursionError) as e:  # a value of a type no check expected
        raise InputError(f"config: a value has the wrong type or shape ({type(e).__name__}: {e}).") from None


# ---- cleaned copies of data files --------------------------------------------------------------
def clean_copy(path: Path, actions: list[dict], out_dir: Path, label_column: str = "label") -> dict:
    """A copy of a data file with rows dropped or relabeled (by line number, as lmtune's errors and audit
    name them); the original is never touched. Writes OUT_DIR/<name>.cleaned<ext> and a JSON log."""
    from lmtune.data.readers import detect_format, read_rows
    fmt = detect_format(path)
    rows = read_rows(path, fmt)
    by_line = {n: row for n, row in rows}
    drop, relabel = set(), {}
    for a in actions:
        line = int(a["line"])
        if line not in by_line:
            raise InputError(f"{path}: line {line}: no data row there.")
        if a["action"] == "drop":
            drop.add(line)
        elif a["action"] == "relabel":
            if not str(a.get("label", "")).strip():
                raise InputError(f"{path}: line {line}: relabel needs a label.")
            if label_column not in by_line[line]:
                raise InputError(f"{path}: line {line}: no column {label_column!r} to relabel; give the file's label column.")
            relabel[line] = str(a["label"]).strip()
        else:
            raise InputError(f"action {a['action']!r}: expected drop or relabel.")
    kept = []
    for n, row in rows:
        if n in drop:
            continue
        kept.append({**row, label_column: relabel[n]} if n in relabel else row)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.cleaned{path.suffix}"
    with atomic_path(target) as tmp:
        if fmt == "jsonl":
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        else:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(rows[0][1]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(kept)
            tmp.write_text(buf.getvalue(), encoding="utf-8")
    changes = {"source": str(path), "cleaned": str(target), "dropped": sorted(drop),
               "relabeled": {str(k): v for k, v in sorted(relabel.items())}, "rows_before": len(rows), "rows_after": len(kept),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(out_dir / f"{path.stem}.cleaned.log.json", changes)
    return changes
