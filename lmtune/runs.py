"""Run directories as a list and side by side: `lmtune runs [DIR]` and `lmtune compare RUN_A RUN_B`.

Everything is read from what a run wrote (config.yaml, results.json, metrics.json, checkpoints/),
so it works on runs from earlier versions and on runs that never finished.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lmtune.artifacts import RunDir
from lmtune.errors import InputError


def status(rd: RunDir) -> str:
    """finished, stopped early, diverged, running (a live process on this machine trains it), or
    interrupted (no final model: killed or crashed)."""
    if not rd.finished():
        return "running" if rd.running() else "interrupted"
    reason = rd.read_metrics().get("train", {}).get("stop_reason", "")
    if reason.startswith("non-finite"):
        return "diverged"
    return "stopped early" if reason.startswith("early stopping") else "finished"


# libyaml's safe loader when PyYAML was built with it: ~20x faster, which the dashboard's runs page needs
# (200 runs: 1.2 s of pure-Python YAML parsing before)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _config(rd: RunDir) -> dict:
    return yaml.load(rd.config.read_text(), Loader=_LOADER) or {} if rd.config.is_file() else {}


def summary(rd: RunDir) -> dict:
    cfg = _config(rd)
    metrics = rd.read_metrics()
    split = "test" if metrics.get("test") else "dev"
    headline = {k: metrics[split][k] for k in metrics.get("headline", []) if k != "loss" and k in metrics.get(split, {})}
    when = datetime.fromtimestamp(rd.config.stat().st_mtime if rd.config.is_file() else rd.root.stat().st_mtime, timezone.utc)
    data = cfg.get("data", {}) or {}
    return {"run": rd.root.name, "path": str(rd.root), "task": cfg.get("task", "?"), "model": cfg.get("model", {}).get("name", "?"),
            "data": str(data.get("train") or data.get("hub") or ""), "date": when.strftime("%Y-%m-%d %H:%M"), "status": status(rd),
            "split": split if headline else "", "metrics": headline, "duration_s": metrics.get("train", {}).get("train_seconds")}


def list_runs(root: str | Path) -> list[dict]:
    """Every run directory (one holding a config.yaml) directly under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder. Give the output_dir of your runs (default: runs).")
    found = [RunDir(p) for p in root.iterdir() if (p / "config.yaml").is_file()]
    return sorted((summary(rd) for rd in found), key=lambda r: r["date"])


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs found"
    lines = [f"{'run':<28} {'task':<14} {'status':<13} {'date':<16} {'model':<40} metrics"]
    for r in rows:
        shown = " ".join(f"{r['split']} {k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
        lines.append(f"{r['run']:<28} {r['task']:<14} {r['status']:<13} {r['date']:<16} {r['model'][-40:]:<40} {shown}")
    return "\n".join(lines)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "hub_split_map":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(a: str | Path, b: str | Path) -> dict:
    """Config keys that differ, and every shared numeric metric of dev and test with b - a."""
    ra, rb = RunDir(a), RunDir(b)
    for rd in (ra, rb):
        if not rd.config.is_file():
            raise InputError(f"{rd.root}: not a run directory (no config.yaml).")
    ca, cb = _flat(_config(ra)), _flat(_config(rb))
    config = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    ma, mb = ra.read_metrics(), rb.read_metrics()
    metrics = {}
    for split in ("dev", "test"):
        for k, va in ma.get(split, {}).items():
            vb = mb.get(split, {}).get(k)
            if isinstance(va, float) and isinstance(vb, float) and math.isfinite(va) and math.isfinite(vb):
                metrics[f"{split}.{k}"] = {"a": va, "b": vb, "b_minus_a": vb - va}
    return {"a": str(ra.root), "b": str(rb.root), "status": [status(ra), status(rb)], "config": config, "metrics": metrics}


def format_compare(c: dict) -> str:
    lines = [f"A: {c['a']} ({c['status'][0]})", f"B: {c['b']} ({c['status'][1]})", "", "config differences:"]
    lines += [f"  {k}: {json.dumps(va)} -> {json.dumps(vb)}" for k, (va, vb) in c["config"].items()] or ["  none"]
    lines += ["", f"{'metric':<32} {'A':>10} {'B':>10} {'B - A':>10}"]
    lines += [f"{k:<32} {m['a']:>10.4f} {m['b']:>10.4f} {m['b_minus_a']:>+10.4f}" for k, m in c["metrics"].items()]
    return "\n".join(lines)
