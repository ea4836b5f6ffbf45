"""Hyperparameter search: `lmtune tune CONFIG --trials N [--timeout S] [--soup]` on Optuna.

Each trial is an ordinary run directory (STUDY_DIR/trial-NNN) trained by `lmtune.train` with the
trial's values; the loop reports the dev metric at every evaluation (against the examples seen so
far, so trials with other batch sizes compare fairly) and the pruner stops unpromising trials there.
The study lives in Optuna's storage (a journal file, or a database for several machines): `lmtune
tune` started N times works on one study, each worker taking the next trial number, until N trials
are done or pruned. Results: STUDY_DIR/study.json (trials, best, parameter importance), study.md
with the optimisation history plot, best.yaml (the best trial's config).
"""
from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lmtune.artifacts import RunDir
from lmtune.config import Config, all_keys, build_config
from lmtune.errors import InputError
from lmtune.io import write_json, write_text
from lmtune.tasks import get_task
from lmtune.training.loop import LOWER_IS_BETTER

log = logging.getLogger("lmtune")
JOURNAL = "study.journal"
PEFT_WITH_RANK = ("lora", "adalora")


def default_space(cfg: Config) -> dict:
    """The usual search ranges, centred on lmtune's own defaults for the model's width."""
    from lmtune.models import load_config
    width = getattr(load_config(cfg.model.name, gguf=cfg.model.gguf_file), "hidden_size", 768) or 768
    lr = [3e-5, 3e-4, "log"] if width < 768 else [1e-5, 1e-4, "log"] if width == 768 else [5e-6, 5e-5, "log"]
    if cfg.peft.method != "none":
        from lmtune.peft import default_lr
        d = default_lr(cfg.peft.method)
        lr = [d / 5, d * 3, "log"]
    # No train.epochs: the number of passes is the resource the pruner hands out (Li et al. 2018,
    # Hyperband), not a value to search. Searched, it gives the pruner short-horizon bias: at its first
    # rung a 4-epoch trial is still warming up and decays slowly, so it loses to 1-epoch trials that end
    # worse (bench/search.py: the pruned study kept a 0.876 trial while the unpruned one found 0.903 at
    # 4 epochs). Every trial trains train.epochs; the pruner stops the unpromising ones early.
    space = {"train.lr": lr, "train.batch_size": {"choices": [16, 32]},
             "train.warmup_ratio": [0.0, 0.2], "train.weight_decay": [0.0, 0.1]}
    if cfg.peft.method in PEFT_WITH_RANK:
        space["peft.r"] = {"choices": [4, 8, 16]}
    return space


def _key(key: str) -> str:
    known = all_keys()
    if key in known:
        return key
    leaf = [k for k in known if k.split(".")[-1] == key]
    if len(leaf) != 1:
        raise InputError(f"tune.space: unknown config key '{key}'.")
    return leaf[0]


def check_space(space: dict) -> dict:
    """Normalise and validate a search space: dotted keys, one of the three value forms."""
    out = {}
    for key, spec in space.items():
        key = _key(key)
        if isinstance(spec, dict) and set(spec) == {"choices"} and isinstance(spec["choices"], list) and spec["choices"]:
            out[key] = spec
        elif (isinstance(spec, list) and len(spec) in (2, 3) and all(isinstance(x, (int, float)) for x in spec[:2])
              and spec[0] < spec[1] and (len(spec) == 2 or spec[2] == "log") and (len(spec) == 2 or spec[0] > 0)):
            out[key] = spec
        else:
            raise InputError(f"tune.space: {key}: {spec!r} is not [low, high], [low, high, log] (low > 0) or {{choices: [...]}}.")
    return out


def suggest(trial: Any, space: dict) -> dict:
    values = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif all(isinstance(x, int) for x in spec[:2]) and len(spec) == 2:
            values[key] = trial.suggest_int(key, spec[0], spec[1])
        else:
            values[key] = trial.suggest_float(key, float(spec[0]), float(spec[1]), log=len(spec) == 3)
    return values


class ReportToTrial:
    """A training-loop callback: each new dev evaluation goes to the trial, at the number of training
    examples seen; the pruner's verdict stops the run (optuna.TrialPruned out of lmtune.train)."""

    def __init__(self, trial: Any, metric: str, batch_size: int):
        self.trial, self.metric, self.batch_size, self.seen = trial, metric, batch_size, set()

    def __call__(self, state) -> None:
        import optuna
        for row in state.history[-3:]:
            value = row.get(f"dev_{self.metric}")
            if value is None or row["step"] in self.seen:
                continue
            self.seen.add(row["step"])
            self.trial.report(float(value), row["step"] * self.batch_size)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"dev {self.metric} {value:.4f} after {row['step'] * self.batch_size} examples")


def _pruner(name: str, n_train: int, max_epochs: int):
    import optuna
    half_epoch = max(1, n_train // 2)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=half_epoch, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=half_epoch, max_resource=max(half_epoch, n_train * max_epochs),
                                              reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=half_epoch - 1)
    return optuna.pruners.NopPruner()


def _storage(cfg: Config, study_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    url = cfg.tune.storage
    if url and "://" in url:
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    path = Path(url) if url else study_dir / JOURNAL
    return JournalStorage(JournalFileBackend(str(path)))


def study_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / (cfg.run_name or "study")


def tune(cfg: Config, trials: int, timeout: float | None = None, prune: bool = True, soup: bool = False,
         resume: bool = False) -> dict:
    """Run (or join) the study until `trials` trials are complete or pruned; returns the summary."""
    import optuna
    if trials < 1:
        raise InputError(f"tune: --trials must be at least 1, got {trials}.")
    task = get_task(cfg.task)
    splits = task.read(cfg)  # input errors before anything is written
    metric = cfg.train.metric or task.headline[0]
    space = check_space(cfg.tune.space or default_space(cfg))
    max_epochs = max([cfg.train.epochs] + [s[1] for k, s in space.items() if k == "train.epochs" and isinstance(s, list)])
    root = study_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=_storage(cfg, root), study_name=root.name, load_if_exists=True,
        direction="minimize" if metric in LOWER_IS_BETTER else "maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.startup_trials),
        pruner=_pruner(cfg.tune.pruner if prune else "none", len(splits.train), max_epochs))
    if resume:
        _requeue_interrupted(study, root)
    base = cfg.to_dict()
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        if _taken(study) >= trials:
            break
        trial = study.ask()
        if _taken(study, before=trial.number) >= trials:  # another worker took the last slot first
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        _run_trial(study, trial, base, space, metric, root, len(splits.train))
    return summarize(study, root, metric, soup)


def _taken(study, before: int | None = None) -> int:
    """Trials that count toward --trials: complete, pruned or running (lower-numbered, when `before`)."""
    from optuna.trial import TrialState
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if before is None or t.number < before)


def _run_trial(study, trial, base: dict, space: dict, metric: str, root: Path, n_train: int) -> None:
    import optuna

    from lmtune.api import train
    values = suggest(trial, space)
    d = copy.deepcopy(base)
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        (d[section] if section else d)[leaf] = value
    d.update(output_dir=str(root), run_name=f"trial-{trial.number:03d}")
    if not d["train"]["eval_every"]:  # two evaluations per epoch: a pruning decision every half epoch
        d["train"]["eval_every"] = max(1, math.ceil(math.ceil(n_train / d["train"]["batch_size"]) / 2))
    cfg = build_config(d)
    trial.set_user_attr("run_dir", str(root / cfg.run_name))
    log.info("tune: trial %d: %s", trial.number, ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in values.items()))
    t0 = time.perf_counter()
    try:
        run = train(cfg, callbacks=(ReportToTrial(trial, metric, cfg.train.batch_size),))
    except optuna.TrialPruned as e:
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        shutil.rmtree(RunDir(root / cfg.run_name).checkpoints, ignore_errors=True)  # a pruned trial is never resumed
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("tune: trial %d pruned (%s)", trial.number, e)
        return
    except Exception:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    test = run.metrics.get("test", {}).get(metric)
    if test is not None:
        trial.set_user_attr(f"test_{metric}", test)
    study.tell(trial, run.metrics["dev"][metric])
    log.info("tune: trial %d dev %s %.4f", trial.number, metric, run.metrics["dev"][metric])


def _requeue_interrupted(study, root: Path) -> None:
    """--resume: trials left running by a stopped worker fail, and their values are queued again (their
    unfinished run directories, lmtune's own output, are removed first)."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        shutil.rmtree(root / f"trial-{t.number:03d}", ignore_errors=True)
        study.enqueue_trial(t.params, skip_if_exists=False)
        log.info("tune --resume: trial %d was interrupted; its values are queued again", t.number)


def summarize(study, root: Path, metric: str, soup: bool = False) -> dict:
    """study.json, study.md (+ optimisation history plot) and best.yaml, from the study's trials."""
    from optuna.trial import TrialState
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            last = max(t.intermediate_values) if t.intermediate_values else None
            rows.append({"number": t.number, "state": t.state.name.lower(), "params": t.params,
                         "dev": t.value if t.state == TrialState.COMPLETE else t.intermediate_values.get(last),
                         "examples_seen": last, "seconds": t.user_attrs.get("seconds"), "run_dir": t.user_attrs.get("run_dir"),
                         **({"test": t.user_attrs[f"test_{metric}"]} if f"test_{metric}" in t.user_attrs else {})})
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        raise InputError(f"tune: no trial of {root} has finished yet.")
    best = study.best_trial
    result = {"metric": metric, "direction": study.direction.name.lower(), "trials": rows,
              "best": next(r for r in rows if r["number"] == best.number),
              "pruned": sum(r["state"] == "pruned" for r in rows), "complete": len(complete),
              "seconds": sum(r["seconds"] or 0 for r in rows)}
    result["importance"] = _importance(study) if len(complete) >= 3 else {}
    if soup:
        from lmtune.search.combine import soup as make_soup
        result["soup"] = make_soup([r["run_dir"] for r in complete], root / "soup", greedy=True)
    best_cfg = yaml.safe_load(RunDir(result["best"]["run_dir"]).config.read_text())
    best_cfg["run_name"] = None
    write_text(root / "best.yaml", yaml.safe_dump(best_cfg, sort_keys=False))
    write_json(root / "study.json", result)
    _history_plot(rows, metric, root / "history.png")
    write_text(root / "study.md", render(result))
    return result


def _importance(study) -> dict:
    import optuna
    try:
        return {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as e:  # e.g. every trial had the same values
        log.info("tune: no parameter importance (%s)", e)
        return {}


def _history_plot(rows: list[dict], metric: str, path: Path) -> None:
    from lmtune.evaluate import plots
    done = sorted((r for r in rows if r["dev"] is not None), key=lambda r: r["number"])
    plots.optimization_history([r["number"] for r in done], [r["dev"] for r in done], [r["state"] for r in done], metric, path)


def render(result: dict) -> str:
    m, best = result["metric"], result["best"]
    lines = [f"# Hyperparameter search: {len(result['trials'])} trials ({result['complete']} complete, "
             f"{result['pruned']} pruned), {result['seconds'] / 60:.1f} min", "",
             f"Best: trial {best['number']}, dev {m} {best['dev']:.4f}"
             + (f", test {best['test']:.4f}" if "test" in best else "") + f" (`{best['run_dir']}`; config in best.yaml).", "",
             "![optimisation history](history.png)", ""]
    if result.get("importance"):
        lines += ["## Parameter importance (fANOVA)", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["importance"].items()]
        lines.append("")
    keys = sorted({k for r in result["trials"] for k in r["params"]})
    lines += ["## Trials", "", f"| trial | state | dev {m} | {' | '.join(keys)} | seconds |", "|---" * (len(keys) + 4) + "|"]
    for r in sorted(result["trials"], key=lambda r: r["number"]):
        vals = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        dev = f"{r['dev']:.4f}" if r["dev"] is not None else "-"
        lines.append(f"| {r['number']} | {r['state']} | {dev} | {vals} | {r['seconds'] or 0:.0f} |")
    if result.get("soup"):
        s = result["soup"]
        lines += ["", "## Soup", "", f"{s['method']} soup of {len(s['members'])} trial(s): dev {m} {s['dev'][m]:.4f}"
                  + (f", test {s['test'][m]:.4f}" if s.get("test") else "") + f" (`{s['run_dir']}`)."]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if not math.isnan(v) else "-"
    return "-" if v is None else str(v)
