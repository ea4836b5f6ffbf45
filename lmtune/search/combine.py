"""K-fold cross-validation, ensembles and model soups.

- cv: stratified (or grouped) K-fold over train + dev; each fold is an ordinary run whose dev split is
  its held-out fold; per-fold metrics, mean and standard deviation, out-of-fold predictions.
- ensemble: a run directory whose model averages its members' calibrated probabilities (weights
  uniform or fitted on dev), recalibrated and with abstention refitted when the members share a dev
  split none of them trained on (or one is given).
- soup: the weights of runs fine-tuned from the same base model averaged into one ordinary run
  (uniform, or greedy: a run joins only if it improves the soup's dev metric), at one model's cost.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from lmtune.artifacts import RunDir, model_meta, read_meta, save_task_arrays, write_meta
from lmtune.fold import fold_temperature, text_probe, unfold_temperature
from lmtune.inference import Run, fit_output_controls, load
from lmtune.recipe import train_splits
from lmtune.config import Config, build_config
from lmtune.errors import InputError
from lmtune.io import atomic_dir, write_json, write_jsonl, write_text
from lmtune.models import quiet_transformers
from lmtune.peft import is_adapter_dir
from lmtune.search.members import EnsembleModel
from lmtune.tasks import get_task
from lmtune.tasks.base import ENSEMBLE, EXAMPLE_LABELS, Splits
from lmtune.training.loop import LOWER_IS_BETTER

log = logging.getLogger("lmtune")


# ---- cross-validation ------------------------------------------------------------------------------
def _groups(cfg: Config, examples: list) -> list[str] | None:
    """data.group_column's value for each example, read from its source file (row numbers match)."""
    if not cfg.data.group_column:
        return None
    from lmtune.data.readers import column_values
    return column_values(examples, cfg.data.group_column, "data.group_column", cfg.data.format, cfg.data.encoding)


def fold_indices(labels: list[str], groups: list[str] | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    y = np.array(labels)
    if groups is not None:
        return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def cv(cfg: Config, folds: int, make_ensemble: bool = True, resume: bool = False) -> dict:
    """Train one run per fold under OUTPUT_DIR/RUN_NAME (default cv); write cv.json, cv.md, oof.jsonl.
    resume: continue a cv that stopped (same data, folds and config): finished folds are kept, a fold with a
    checkpoint resumes from it, a fold without one starts again."""
    task = get_task(cfg.task)
    task.require(EXAMPLE_LABELS, "cv")
    if folds < 2:
        raise InputError(f"cv: --folds must be at least 2, got {folds}.")
    splits = task.read(cfg)
    pool = splits.train + splits.dev
    labels = [ex.label for ex in pool]
    smallest = min(labels.count(x) for x in set(labels))
    if smallest < folds:
        log.warning("cv: a class has only %d examples for %d folds; some folds' dev splits lack it", smallest, folds)
    index = fold_indices(labels, _groups(cfg, pool), folds, cfg.train.seed)
    root = Path(cfg.output_dir) / (cfg.run_name or "cv")
    plan = {"folds": folds, "seed": cfg.train.seed, "examples": len(pool),
            "held_out": [[pool[i].source for i in held] for _, held in index]}
    fresh = _start_or_continue(root, plan, resume)
    try:
        result = _cv_folds(cfg, task, splits, pool, index, root, folds)
    except BaseException:
        # a new cv that fails before any fold wrote a run (a model that cannot load) leaves nothing behind
        if fresh and not any(p.is_dir() for p in root.glob("fold-*")):
            shutil.rmtree(root, ignore_errors=True)
        raise
    if make_ensemble:
        ens = root / "ensemble"
        if ens.exists() and not RunDir(ens).finished():
            shutil.rmtree(ens)  # a half-written ensemble from a stopped cv: made again from the folds
        result["ensemble"] = _ensemble_result(ens) if ens.exists() else ensemble([r["run_dir"] for r in result["folds"]], ens)
    write_json(root / "cv.json", result)
    write_text(root / "cv.md", render_cv(result))
    return result


CV_PLAN = "cv_plan.json"  # the folds a cv was started with: --resume continues only the same plan


def _start_or_continue(root: Path, plan: dict, resume: bool) -> bool:
    """Create the cv's folder with its plan (True), or check that --resume continues the same plan (False)."""
    if not root.exists():
        if resume:
            raise InputError(f"--resume: {root} does not exist, so there is no cv to continue. Start without --resume.")
        root.mkdir(parents=True)
        write_json(root / CV_PLAN, plan)
        return True
    if not resume:
        raise InputError(f"{root}: already exists; pick another run_name, or add --resume to continue the cv that "
                         "stopped there (lmtune never overwrites runs).")
    if (root / "cv.json").is_file():
        raise InputError(f"--resume: {root} is a finished cv (it has cv.json); lmtune never rewrites it.")
    try:
        old = json.loads((root / CV_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"--resume: {root} has no readable {CV_PLAN}, so lmtune cannot tell which folds it was "
                         "started with. Start a new cv under another run_name.") from None
    if old != plan:
        what = [k for k in plan if old.get(k) != plan[k]]
        raise InputError(f"--resume: {root} was started with other folds ({', '.join(what)} differ: the data, "
                         "--folds or train.seed changed). Resume with the same data and settings, or start a new cv.")
    return False


def _fold_run(cfg: Config, task, splits: Splits, fold_dir: Path) -> tuple[Path, dict]:
    """One fold's run directory and metrics: kept when it finished before, resumed from its checkpoint, or
    trained (again, where a stopped fold left no checkpoint)."""
    rd = RunDir(fold_dir)
    if rd.finished():
        log.info("cv: %s finished before; kept", fold_dir)
        return fold_dir, rd.read_metrics()
    resume: bool | Path = False
    if fold_dir.exists():
        if rd.running():
            raise InputError(f"{fold_dir}: a live process is training this fold; let it finish or stop it first.")
        if rd.pointer.is_file():
            resume = fold_dir
        else:
            log.info("cv: %s stopped before its first checkpoint; training it again", fold_dir)
            shutil.rmtree(fold_dir)
    run = train_splits(cfg, task, splits, resume=resume)
    return run.run_dir, run.metrics


def _ensemble_result(ens: Path) -> dict:
    """A finished ensemble's record, as ensemble() returned it (its analysis file), for a resumed cv."""
    return json.loads(RunDir(ens).analysis("ensemble").read_text(encoding="utf-8"))


def _cv_folds(cfg: Config, task, splits: Splits, pool: list, index: list, root: Path, folds: int) -> dict:
    rows, oof = [], []
    for k, (fit, held) in enumerate(index):
        info = {"method": f"cv fold {k + 1} of {folds}", "seed": cfg.train.seed, "group_column": cfg.data.group_column,
                "dev_rows": [pool[i].source for i in held], "sizes": {"train": len(fit), "dev": len(held), "test": len(splits.test)}}
        fold_splits = Splits([pool[i] for i in fit], [pool[i] for i in held], splits.test, splits.labels, info)
        d = cfg.to_dict()
        # Each fold its own seed (head initialisation, dropout, batch order): members that differ
        # in more than their data disagree more, and their average gains more (Lakshminarayanan et al. 2017).
        d["train"] = {**d["train"], "seed": cfg.train.seed + k}
        fold_cfg = build_config({**d, "output_dir": str(root), "run_name": f"fold-{k + 1}"})
        log.info("cv: fold %d/%d: train %d, held out %d", k + 1, folds, len(fit), len(held))
        run_dir, metrics = _fold_run(fold_cfg, task, fold_splits, root / f"fold-{k + 1}")
        rows.append({"fold": k + 1, "run_dir": str(run_dir), "dev": _headline(metrics, "dev"),
                     "test": _headline(metrics, "test")})
        preds = RunDir(run_dir).predictions("dev")
        for i, line in zip(held, preds.read_text().splitlines()):
            oof.append({"index": int(i), "fold": k + 1, **json.loads(line)})
    result = {"folds": rows, "k": folds, "grouped": bool(cfg.data.group_column), "examples": len(pool),
              "mean": _stat(rows, np.mean), "std": _stat(rows, np.std)}
    write_jsonl(root / "oof.jsonl", sorted(oof, key=lambda r: r["index"]))
    return result


def _headline(metrics: dict, split: str) -> dict:
    m = metrics.get(split) or {}
    return {k: m[k] for k in metrics.get("headline", []) if k in m}


def _stat(rows: list[dict], fn) -> dict:
    out: dict = {}
    for split in ("dev", "test"):
        keys = rows[0][split].keys() if rows and rows[0][split] else []
        out[split] = {k: float(fn([r[split][k] for r in rows])) for k in keys}
    return out


def render_cv(r: dict) -> str:
    keys = list(r["folds"][0]["dev"])
    lines = [f"# {r['k']}-fold cross-validation ({'grouped, ' if r['grouped'] else ''}stratified; {r['examples']} examples)", "",
             "| fold | " + " | ".join(f"held-out {k}" for k in keys) + " | " + " | ".join(f"test {k}" for k in r["folds"][0]["test"]) + " |",
             "|---" * (1 + len(keys) + len(r["folds"][0]["test"])) + "|"]
    for f in r["folds"]:
        lines.append(f"| {f['fold']} | " + " | ".join(f"{v:.4f}" for v in f["dev"].values()) + " | "
                     + " | ".join(f"{v:.4f}" for v in f["test"].values()) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{r['mean']['dev'][k]:.4f} ± {r['std']['dev'][k]:.4f}" for k in keys) + " | "
                 + " | ".join(f"{r['mean']['test'][k]:.4f} ± {r['std']['test'][k]:.4f}" for k in r["mean"]["test"]) + " |")
    if r.get("ensemble"):
        e = r["ensemble"]
        lines += ["", f"Ensemble of the {r['k']} fold models: `{e['run_dir']}`"
                  + (f", test {', '.join(f'{k} {v:.4f}' for k, v in e['test'].items())}" if e.get("test") else "") + "."]
    return "\n".join(lines) + "\n"


# ---- members --------------------------------------------------------------------------------------
def _check_members(run_dirs: list, what: str) -> list[dict]:
    if len(run_dirs) < 2:
        raise InputError(f"{what}: give at least two run directories.")
    metas = []
    for d in run_dirs:
        if not RunDir(d).finished():
            raise InputError(f"{what}: {d} is not a finished lmtune run.")
        metas.append(read_meta(RunDir(d).model))
    first = metas[0]
    for d, m in zip(run_dirs[1:], metas[1:]):
        if m["task"] != first["task"] or m["labels"] != first["labels"]:
            raise InputError(f"{what}: {d} is a {m['task']} run with labels {m['labels'][:5]}...; {run_dirs[0]} is {first['task']} "
                             f"with {first['labels'][:5]}...: members must share the task and the labels (same order).")
    return metas


def _shared_dev(runs: list[Run]) -> list | None:
    """The dev split every member was evaluated on and none trained on (members of one config), or None."""
    records = [json.loads(RunDir(r.run_dir).splits.read_text()) if RunDir(r.run_dir).splits.is_file() else {} for r in runs]
    devs = [rec.get("dev_rows") or ([rec["dev"]] if rec.get("dev") else None) for rec in records]
    if not devs[0] or any(d != devs[0] for d in devs):
        return None
    return runs[0].split_examples("dev")


def _test(run: Run) -> list:
    try:
        return run.task.read(run.config).test
    except InputError:
        return []


# ---- ensembles -------------------------------------------------------------------------------------
def ensemble(run_dirs: list, out: str | Path, weights: str = "uniform", dev: str | None = None) -> dict:
    """Build an ensemble run directory at `out`; returns its summary (also OUT/ensemble.json)."""
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; ensemble writes a new run directory.")
    metas = _check_members(run_dirs, "ensemble")
    task = get_task(metas[0]["task"])
    task.require(ENSEMBLE, "ensemble")
    runs = [load(d) for d in run_dirs]
    vocab = runs[0].tokenizer.get_vocab()
    for r in runs[1:]:
        if r.tokenizer.get_vocab() != vocab:
            raise InputError(f"ensemble: {r.run_dir} uses another tokenizer than {runs[0].run_dir}; members must share one "
                             "(the same base model family).")
    for r in runs:
        r.config.train.progress = "none"
    cfg = copy.deepcopy(runs[0].config)
    cfg.abstain = dataclasses.replace(cfg.abstain, score="probability")  # the members' [CLS] features are not averaged
    labels = runs[0].labels
    dev_examples = (runs[0].task.read_file(dev, cfg, labels, require_label=True) if dev else _shared_dev(runs))
    if weights == "dev" and dev_examples is None:
        raise InputError("ensemble --weights dev: the members share no dev split that none of them trained on (cross-validation "
                         "folds); give one with --dev FILE.")
    # what each member's logits are divided by: its temperature, less what its weights carry (lmtune.fold)
    temperatures = [float(r.task.unfolded_temperature()) for r in runs]
    w = [1.0] * len(runs)
    if weights == "dev":
        w = _fit_weights(runs, dev_examples)
    model = EnsembleModel([r.model for r in runs], w, temperatures)
    task.set_state({**runs[0].task.state(), "temperature": 1.0, "folded_temperature": 1.0, "threshold": None,
                    "score": "probability"})
    run = Run(out, model, runs[0].tokenizer, task, labels, cfg)
    fitted: dict = {}
    if dev_examples is not None:
        encoded = {"dev": run.encode(dev_examples)}
        outputs = functools.cache(lambda split: run.outputs(encoded[split]))
        fitted = fit_output_controls(task, cfg, outputs, encoded, labels)
    metrics = {"headline": list(task.headline), "metric": cfg.train.metric or task.headline[0]}
    test = _test(runs[0])
    if dev_examples is not None:
        metrics["dev"] = run.evaluate_examples(dev_examples)
    if test:
        metrics["test"] = run.evaluate_examples(test)
    summary = {"run_dir": str(out), "members": [str(Path(d).resolve()) for d in run_dirs], "weights": [x / sum(w) for x in w],
               "weighting": weights, "recalibrated": "calibration" in fitted, "abstention_refitted": "abstention" in fitted,
               "dev": _headline(metrics, "dev"), "test": _headline(metrics, "test")}
    with atomic_dir(out) as tmp:
        rd = RunDir(tmp)
        rd.model.mkdir()
        with quiet_transformers():
            runs[0].tokenizer.save_pretrained(rd.model)
        write_meta(rd.model, model_meta(task, labels, cfg, ensemble={"members": summary["members"], "weights": summary["weights"],
                                                                     "temperatures": temperatures}))
        write_text(rd.config, cfg.to_yaml())
        write_json(rd.metrics, metrics)
        write_json(rd.analysis("ensemble"), summary)
        write_text(rd.report, _report("Ensemble", summary, metrics))
    return summary


def _fit_weights(runs: list[Run], dev: list) -> list[float]:
    """Member weights minimising the ensemble's dev log-loss (softmax-parameterised, so they stay a
    convex combination)."""
    from scipy.optimize import minimize
    gold_index = {lab: i for i, lab in enumerate(runs[0].labels)}
    keep = [i for i, ex in enumerate(dev) if ex.label in gold_index]
    gold = np.array([gold_index[dev[i].label] for i in keep])
    probs = []
    for r in runs:
        enc = r.encode([dev[i] for i in keep])
        logits, _ = r.task.split_outputs(r.outputs(enc), enc, r.labels)  # raw logits, whatever the weights carry
        z = logits / r.task.temperature
        z = np.exp(z - z.max(1, keepdims=True))
        probs.append(z / z.sum(1, keepdims=True))
    stack = np.stack(probs)  # [members, examples, classes]

    def nll(a: np.ndarray) -> float:
        w = np.exp(a - a.max())
        w /= w.sum()
        p = np.einsum("m,mnc->nc", w, stack)[np.arange(len(gold)), gold]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())
    a = minimize(nll, np.zeros(len(runs)), method="Nelder-Mead", options={"maxiter": 400}).x
    w = np.exp(a - a.max())
    return (w / w.sum()).tolist()


# ---- soups -----------------------------------------------------------------------------------------
def soup(run_dirs: list, out: str | Path, greedy: bool = False) -> dict:
    """Average the weights of runs fine-tuned from the same base model into one run directory at `out`."""
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; soup writes a new run directory.")
    metas = _check_members(run_dirs, "soup")
    names = {m["config"]["model"]["name"] for m in metas}
    if len(names) > 1:
        raise InputError(f"soup: members were fine-tuned from different base models ({', '.join(sorted(names))}); a soup "
                         "averages runs of one base model.")
    adapters = [d for d in run_dirs if is_adapter_dir(RunDir(d).model)]
    if adapters:
        raise InputError(f"soup: {adapters[0]} holds a PEFT adapter; merge it first (lmtune merge) or soup full fine-tunings.")
    runs = [load(d) for d in run_dirs]
    shapes = {k: v.shape for k, v in runs[0].model.state_dict().items()}
    for r in runs[1:]:
        if {k: v.shape for k, v in r.model.state_dict().items()} != shapes:
            raise InputError(f"soup: {r.run_dir}'s architecture differs from {runs[0].run_dir}'s.")
    for r in runs:
        r.config.train.progress = "none"
        # raw weights: members saved with different temperatures folded in would not average to one model
        unfold_temperature(r.model, r.task, text_probe(r.tokenizer, r.model))
    metric = runs[0].metrics.get("metric") or runs[0].task.headline[0]
    sign = -1 if metric in LOWER_IS_BETTER else 1
    dev_values = [r.metrics.get("dev", {}).get(metric) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: (dev_values[i] is None, -sign * (dev_values[i] or 0.0)))  # best first
    base = runs[order[0]]
    dev = _shared_dev(runs)
    if greedy and dev is None:
        raise InputError("soup --greedy: the runs share no dev split to choose ingredients on; soup runs of one config.")
    # clone: the state dict shares storage with the model, which the greedy search loads averages into
    states = [{k: v.detach().float().cpu().clone() for k, v in runs[i].model.state_dict().items()} for i in order]
    chosen, steps = [0], []
    best_value = base.evaluate_examples(dev)[metric] if dev is not None else None
    if greedy:
        for j in range(1, len(states)):
            _load_average(base.model, [states[i] for i in chosen + [j]])
            value = base.evaluate_examples(dev)[metric]
            kept = sign * value > sign * best_value  # strictly better: a tie adds risk and no evidence
            steps.append({"run_dir": str(runs[order[j]].run_dir), "dev": value, "kept": kept})
            if kept:
                chosen.append(j)
                best_value = value
        log.info("soup: greedy kept %d of %d runs (dev %s %.4f)", len(chosen), len(states), metric, best_value)
    else:
        chosen = list(range(len(states)))
    _load_average(base.model, [states[i] for i in chosen])
    return _write_soup(base, out, [str(runs[order[i]].run_dir) for i in chosen], "greedy" if greedy else "uniform", steps, dev)


def _load_average(model: torch.nn.Module, states: list[dict]) -> None:
    avg = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    current = model.state_dict()
    model.load_state_dict({k: v.to(current[k].dtype) for k, v in avg.items()})


def _write_soup(run: Run, out: Path, members: list[str], method: str, steps: list, dev: list | None) -> dict:
    """The soup as an ordinary run: its output controls refitted on dev, metrics, predictions, model."""
    task, cfg = run.task, run.config
    if dev is not None:
        encoded = {"dev": run.encode(dev)}
        if cfg.abstain.score == "mahalanobis":
            encoded["train"] = run.encode(task.read(cfg).train)
        outputs = functools.cache(lambda split: run.outputs(encoded[split]))
        fit_output_controls(task, cfg, outputs, encoded, run.labels)
    metrics = {"headline": list(task.headline), "metric": cfg.train.metric or task.headline[0]}
    test = _test(run)
    if dev is not None:
        metrics["dev"] = run.evaluate_examples(dev)
    if test:
        metrics["test"] = run.evaluate_examples(test)
    summary = {"run_dir": str(out), "method": method, "members": members, "steps": steps,
               "dev": _headline(metrics, "dev"), "test": _headline(metrics, "test")}
    src = RunDir(run.run_dir)
    fold_temperature(run.model, task, text_probe(run.tokenizer, run.model))  # as training saves a model
    meta = model_meta(task, saved=src.model, soup={"method": method, "members": members})
    with atomic_dir(out) as tmp:
        rd = RunDir(tmp)
        with quiet_transformers():
            run.model.save_pretrained(rd.model)
            run.tokenizer.save_pretrained(rd.model)
        save_task_arrays(task, rd.model)
        write_meta(rd.model, meta)
        for kept in ("config", "splits"):
            if getattr(src, kept).is_file():
                shutil.copy2(getattr(src, kept), getattr(rd, kept))
        write_json(rd.metrics, metrics)
        write_json(rd.analysis("soup"), summary)
        write_text(rd.report, _report(f"Model soup ({method})", summary, metrics))
    return summary


def _report(title: str, summary: dict, metrics: dict) -> str:
    lines = [f"# {title} of {len(summary['members'])} runs", ""]
    lines += [f"- `{m}`" + (f" (weight {w:.3f})" if "weights" in summary else "")
              for m, w in zip(summary["members"], summary.get("weights", [None] * len(summary["members"])))]
    for split in ("dev", "test"):
        if summary.get(split):
            lines.append(f"\n{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary[split].items()))
    return "\n".join(lines) + "\n"
