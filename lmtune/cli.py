"""Command line: one table of commands over the Python API.

Each command is a function with typed parameters; COMMANDS maps its name to the function (litgpt's
command table). Its arguments come from the signature: a parameter without a default is a positional
argument, one with a default an optional one (a positional when it comes before `*`), a keyword-only
one without a default a required option; `Annotated[T, "help"]` (or `Arg(...)`) carries the help.
A command that declares `overrides` also takes free-form `--section.key VALUE` config overrides.
`--help`, shell completion and the README's command list (checked by a test) come from the table.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Literal

from lmtune.config import describe_fields, parse_overrides
from lmtune.errors import InputError
from lmtune.registry import backends, query_strategies

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"

TRAIN_HELP = """Fine-tune a model: lmtune train CONFIG.yaml [--resume [RUN_DIR]] [--section.key VALUE ...]

Any config key can be overridden on the command line, e.g. --train.lr 3e-5 --data.max_length 64
(a bare leaf name such as --lr works when it is unambiguous). Unknown keys are errors.

Config keys:
"""

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# ---- the table's parts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """How one parameter appears on the command line, beyond what its type and default say."""
    help: str | None = None
    flag: str | None = None  # the option's name when it is not --the-parameter-name (a Python keyword: --from)
    choices: Any = None  # allowed values: a tuple or a registry (read when the parser is built)
    metavar: str | None = None
    nargs: str | None = None  # "?" with const: an option whose value may be left out (--resume [RUN_DIR])
    const: Any = None


@dataclass(frozen=True)
class Command:
    run: Callable[..., int]
    help: str
    description: str | Callable[[], str] | None = None  # a callable: generated text, printed with its line breaks
    # None: the arguments come from run's signature; a function: it adds them, and run takes the Namespace
    # (the analysis commands: lmtune.analysis builds their flags from the params each analysis declares)
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

    @property
    def overrides(self) -> bool:
        """Takes free-form --section.key VALUE config overrides (run has an `overrides` parameter)."""
        return self.arguments is None and "overrides" in inspect.signature(self.run).parameters


@dataclass(frozen=True)
class Group:
    """A command with sub-commands of its own (lmtune recommend fit / rank)."""
    help: str
    commands: dict[str, Command] = field(default_factory=dict)


def _base_type(tp: Any) -> tuple[Any, Arg]:
    """(the parameter's type without Optional / Annotated, its Arg)."""
    meta = Arg()
    if typing.get_origin(tp) is Annotated:
        tp, *extras = typing.get_args(tp)
        meta = next((Arg(help=e) if isinstance(e, str) else e for e in extras), meta)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [t for t in typing.get_args(tp) if t is not type(None)]
        tp = rest[0] if len(rest) == 1 else next(t for t in rest if t is not bool)  # bool | str: --resume [RUN_DIR]
    return tp, meta


def _argument(param: inspect.Parameter, tp: Any, meta: Arg) -> tuple[list[str], dict]:
    """The add_argument call (names, keyword arguments) for one parameter of a command's function."""
    kw: dict[str, Any] = {"help": meta.help}
    positional = param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    has_default = param.default is not inspect.Parameter.empty
    if typing.get_origin(tp) is Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif meta.choices is not None:
        kw["choices"] = list(meta.choices)
    if tp is bool:
        kw["action"] = "store_true"
    elif typing.get_origin(tp) is list:
        kw["type"] = typing.get_args(tp)[0]
        kw.update({"nargs": "+"} if positional else {"action": "append"})
    elif tp in (int, float):
        kw["type"] = tp
    if meta.nargs:
        kw.update(nargs=meta.nargs, const=meta.const)
    if meta.metavar:
        kw["metavar"] = meta.metavar
    if positional:
        if has_default:
            kw.update(nargs="?", default=param.default)
        return [param.name], kw
    kw.update({"dest": param.name, "default": param.default} if has_default else {"dest": param.name, "required": True})
    return [meta.flag or "--" + param.name.replace("_", "-")], kw


def add_signature_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """One argument per parameter of fn (`overrides` excepted: those are the free-form config flags)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    for param in inspect.signature(fn).parameters.values():
        if param.name != "overrides":
            names, kw = _argument(param, *_base_type(hints.get(param.name, str)))
            parser.add_argument(*names, **kw)


def option_flags(fn: Callable) -> set[str]:
    """The options a command's function declares (--resume, --from, ...), as the parser spells them."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return {_argument(p, *_base_type(hints.get(p.name, str)))[0][0] for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "overrides"} | {"-h", "--help"}


def _paired(args: list[str], declared: set[str]) -> list[str]:
    """`--key VALUE` -> `--key=VALUE` for each flag the command does not declare (a config override), so that
    argparse never takes an override's VALUE for the command's positional argument (`lmtune pretrain --lr 1e-4`)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" not in a and a not in declared and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{a}={args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def _call(command: Command, ns: argparse.Namespace, extras: list[str]) -> int:
    if command.arguments is not None:
        return command.run(ns)
    params = inspect.signature(command.run).parameters
    kwargs = {k: v for k, v in vars(ns).items() if k in params}
    if command.overrides:
        kwargs["overrides"] = parse_overrides(extras)
    return command.run(**kwargs)


# ---- commands -------------------------------------------------------------------------------------

def _print_headline(run) -> None:
    print(f"run dir: {run.run_dir}")
    for split in ("dev", "test"):
        m = run.metrics.get(split)
        if m:
            shown = "  ".join(f"{k} {m[k]:.4f}" for k in run.metrics.get("headline", []) if k != "loss" and k in m)
            print(f"{split}: {shown}  (n={m['n']})")
    print(f"report: {run.run_dir / 'report.md'}")


ConfigFile = Annotated[str | None, "YAML config file"]


def cmd_train(config: ConfigFile = None, *,
              resume: Annotated[bool | str, Arg("continue the newest run under output_dir (or RUN_DIR) from its last "
                                                "checkpoint", nargs="?", const=True, metavar="RUN_DIR")] = False,
              from_run: Annotated[str | None, Arg("continual fine-tuning from this finished run (the same as "
                                                  "--continual.from_run RUN_DIR)", flag="--from", metavar="RUN_DIR")] = None,
              overrides: dict[str, Any]) -> int:
    from lmtune.api import train
    if from_run:
        overrides["continual.from_run"] = from_run
    _print_headline(train(config, overrides=overrides, resume=resume))
    return 0


def cmd_demo(*, overrides: dict[str, Any]) -> int:
    return cmd_train(str(DEMO_CONFIG), overrides=overrides)


def cmd_evaluate(run_dir: str, *, data: Annotated[str, "labeled file with the run's text/label columns"]) -> int:
    from lmtune.api import load
    m = load(run_dir).evaluate(data)
    print(json.dumps({k: v for k, v in m.items() if k != "confusion_matrix"}, indent=2))
    return 0


def cmd_predict(run_dir: str, *,
                input: Annotated[str | None, "file with the run's columns (CSV/TSV/JSONL/parquet), or - for standard "
                                             "input: one JSON object or one plain text per line, read and predicted as it "
                                             "streams"] = None,
                text: Annotated[list[str] | None, "a text to predict on (repeatable)"] = None,
                pair: Annotated[list[str] | None, "the second text of the pair, for a model trained on pairs (one per "
                                                  "--text)"] = None,
                output: Annotated[str | None, "write JSONL to this file (written whole, then renamed); - or absent: "
                                              "standard output"] = None,
                explain: Annotated[bool, "add word attributions for the predicted label (see lmtune explain)"] = False) -> int:
    from lmtune.api import load
    if bool(input) == bool(text):
        raise InputError("predict: give either --input FILE (- for standard input) or --text TEXT (repeatable).")
    if pair and len(pair) != len(text or []):
        raise InputError(f"predict: {len(pair)} --pair for {len(text or [])} --text; give one --pair after each --text.")
    run = load(run_dir)
    texts = list(zip(text, pair)) if pair else text
    if explain:  # the same rows, each with its word attributions
        if input == "-":
            raise InputError("predict --explain reads --input FILE or --text, not standard input.")
        from lmtune.analyses.explain import explained_chunks
        chunks = explained_chunks(run, texts, input)
    elif input == "-":
        chunks = run.predict_stream(sys.stdin)
    else:
        chunks = run.predict_file_chunks(input) if input else iter([run.predict(texts)])
    _write_jsonl(chunks, output)
    return 0


def _write_jsonl(chunks, output: str | None) -> None:
    """Rows as JSON lines to a file (replaced only when complete) or, streamed, to standard output."""
    if output and output != "-":
        from lmtune.io import atomic_path
        n = 0
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as fh:  # the old output stays until this is complete
            for rows in chunks:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                n += len(rows)
        print(f"wrote {n} predictions to {output}", file=sys.stderr)
        return
    for rows in chunks:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        sys.stdout.flush()


def cmd_ui(runs_dir: Annotated[str, "the output_dir holding the runs (default: runs)"] = "runs", *,
           host: str = "127.0.0.1", port: int = 7860,
           token_file: Annotated[str | None, "file whose first line is the token"] = None,
           allow_path: Annotated[list[str], Arg(help="also allow paths under DIR in job configs and file picks (repeatable; "
                                                     "default: only the current directory)", metavar="DIR")] = []) -> int:  # noqa: B006 (argparse copies it)
    from lmtune.ui.app import UiSettings, check_binding, serve_ui, ui_token
    token = ui_token(token_file)
    check_binding(host, token)
    print(f"lmtune ui on http://{host}:{port}/ (runs: {runs_dir}; Ctrl-C stops)", file=sys.stderr)
    serve_ui(UiSettings(runs_dir=runs_dir, workdir=".", token=token, allow_paths=tuple(allow_path)), host, port)
    return 0


def cmd_audit(config: ConfigFile = None, *, strict: Annotated[bool, "exit 1 when any finding is critical"] = False,
              overrides: dict[str, Any]) -> int:
    from lmtune.config import load_config
    from lmtune.tasks import get_task
    from lmtune.tasks.base import LABEL_NOISE
    cfg = load_config(config, overrides)
    task = get_task(cfg.task)
    splits = task.read(cfg)
    findings = task.audit(splits)
    if cfg.data.label_noise_folds:
        task.require(LABEL_NOISE, "data.label_noise_folds")
        from lmtune.noise import find_label_issues, finding, out_of_fold_probs
        from lmtune.runtime import accelerator_for
        probs = out_of_fold_probs(cfg, task, splits.train, splits.labels, cfg.data.label_noise_folds,
                                  accelerator_for(cfg.train.precision))
        result = find_label_issues(splits.train, splits.labels, probs)
        findings.append({**finding(result, len(splits.train)), "candidates": result["flagged"]})
    print(json.dumps(findings, indent=2, ensure_ascii=False))
    worst = {f["severity"] for f in findings}
    print(f"{len(findings)} finding(s): " + ", ".join(f"{s} {sum(f['severity'] == s for f in findings)}"
                                                    for s in ("critical", "warning", "info") if s in worst), file=sys.stderr)
    return 1 if strict and "critical" in worst else 0


def cmd_pretrain(config: ConfigFile = None, *, overrides: dict[str, Any]) -> int:
    from lmtune.config import load_config
    from lmtune.pretrain import pretrain, summary
    print(summary(pretrain(load_config(config, overrides))))
    return 0


def cmd_tune(config: ConfigFile = None, *,
             trials: Annotated[int | None, "trials of the study, all workers together"] = None,
             timeout: Annotated[float | None, "stop starting trials after this many seconds"] = None,
             soup: Annotated[bool, "also average the best trials' weights (a model soup)"] = False,
             no_prune: Annotated[bool, "train every trial to the end"] = False,
             resume: Annotated[bool, "re-queue the trials a stopped worker left running"] = False,
             overrides: dict[str, Any]) -> int:
    from lmtune.config import load_config
    from lmtune.search.tune import tune
    if trials is None:
        raise InputError("tune: give --trials N (the number of trials of the study, all workers together).")
    result = tune(load_config(config, overrides), trials, timeout, not no_prune, soup, resume)
    best = result["best"]
    print(json.dumps({"best_trial": best["number"], f"dev_{result['metric']}": best["dev"], "params": best["params"],
                      "complete": result["complete"], "pruned": result["pruned"], "run_dir": best["run_dir"]}, indent=2))
    return 0


def cmd_cv(config: ConfigFile = None, *, folds: Annotated[int, "number of folds"] = 5,
           no_ensemble: Annotated[bool, "skip the ensemble of the fold models"] = False,
           resume: Annotated[bool, "continue the cv that stopped under OUTPUT_DIR/RUN_NAME: finished folds are kept, "
                                   "a fold with a checkpoint resumes"] = False, overrides: dict[str, Any]) -> int:
    from lmtune.config import load_config
    from lmtune.search.combine import cv, render_cv
    print(render_cv(cv(load_config(config, overrides), folds, not no_ensemble, resume)))
    return 0


Out = Annotated[str, "the new run directory"]


def cmd_ensemble(run_dirs: list[str], *, out: Out,
                 weights: Annotated[Literal["uniform", "dev"], "dev: weights that minimise the dev log-loss (needs a "
                                                               "shared dev split or --dev)"] = "uniform",
                 dev: Annotated[str | None, "labeled file to fit weights, temperature and abstention on (default: the "
                                            "members' shared dev)"] = None) -> int:
    from lmtune.search.combine import ensemble
    print(json.dumps(ensemble(run_dirs, out, weights, dev), indent=2))
    return 0


def cmd_soup(run_dirs: list[str], *, out: Out,
             greedy: Annotated[bool, "add a run (best dev first) only if it improves the soup's dev metric"] = False) -> int:
    from lmtune.search.combine import soup
    print(json.dumps(soup(run_dirs, out, greedy), indent=2))
    return 0


def cmd_report(run_dir: str) -> int:
    from lmtune.results import render
    print(render(run_dir))
    return 0


def cmd_merge(run_dir: str, out_dir: str) -> int:
    from lmtune.api import load
    from lmtune.artifacts import RunDir, model_meta, write_meta
    from lmtune.io import atomic_dir
    from lmtune.peft import merge
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"{out}: already exists; merge writes a new folder and never overwrites one.")
    run = load(run_dir)
    merged = merge(run.model, run.config.peft.method)
    meta = model_meta(run.task, saved=RunDir(run_dir).model, refresh_state=False, merged_from=str(run_dir))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
    print(f"merged model: {out}")
    return 0


def cmd_prefer(run_dir: str, *, k: Annotated[int, "sampled outputs per prompt (the greedy one is a candidate too)"] = 4,
               temperature: Annotated[float, "sampling temperature of the candidates (top-p 0.95)"] = 0.8,
               max_prompts: Annotated[int | None, "sample at most this many training prompts (the cost: k + 1 "
                                                  "generations each)"] = None,
               objective: Annotated[Literal["dpo", "orpo"], "the preference loss the new run trains"] = "dpo",
               overrides: dict[str, Any]) -> int:
    from lmtune.prefer import prefer
    run = prefer(run_dir, k=k, temperature=temperature, max_prompts=max_prompts, objective=objective,
                 progress=overrides.pop("train.progress", "bar"), overrides=overrides)
    p = run.metrics["prefer"]["train"]
    print(f"pairs: {p['pairs']} of {p['prompts']} prompts ({run.run_dir / 'prefer' / 'pairs.jsonl'})")
    _print_headline(run)
    return 0


def cmd_distill(teacher_run_dir: str, *, student: Annotated[str, "the student model (hub id or folder), e.g. a smaller "
                                                                "backbone than the teacher's"],
                unlabeled: Annotated[str | None, "unlabeled texts the teacher also labels softly, read as predict reads "
                                                 "them (the data's text column; NER: tokens or raw text)"] = None,
                temperature: Annotated[float, "softmax temperature of the soft targets (Hinton et al. 2015: 2 to 4)"] = 2.0,
                alpha: Annotated[float, "weight of the soft term (1 - alpha: the hard labels' cross-entropy)"] = 0.5,
                student_layers: Annotated[int | None, "truncate the student to its first N encoder layers"] = None,
                no_compare: Annotated[bool, "skip the same student trained on hard labels alone"] = False,
                overrides: dict[str, Any]) -> int:
    from lmtune.distill import distill
    d = distill(teacher_run_dir, student=student, unlabeled=unlabeled, temperature=temperature, alpha=alpha,
                student_layers=student_layers, overrides=overrides, compare=not no_compare)
    metric = d["metric"]
    for name in ("teacher", "student", "hard_only"):
        if name in d:
            r = d[name]
            value = "-" if r[metric] is None else f"{r[metric]:.4f}"
            print(f"{name}: {d['split']} {metric} {value}  {r['seconds_per_1000']:.3f} s / 1000 texts  ({r['run_dir']})")
    print(f"cost ratio (student / teacher): {d['cost_ratio']:.3f}")
    print(f"report: {Path(d['student']['run_dir']) / 'report.md'}")
    return 0


def cmd_label(run_dir: Annotated[str | None, "the trained run that asks (absent with --cold)"] = None, *,
              pool: Annotated[str | None, "unlabeled rows to choose from (the run's text column; CSV/TSV/JSONL/parquet)"] = None,
              batch: Annotated[int, "rows to label in this batch"] = 20,
              strategy: Annotated[str, Arg("which rows: entropy / margin (calibrated probabilities), coreset (k-center on "
                                           "the run's embeddings), badge (k-means++ on last-layer gradient embeddings), "
                                           "random (seeded)", choices=query_strategies)] = "entropy",
              format: Annotated[Literal["csv", "jsonl", "label-studio"], "the batch file: ours (fill in its label column) "
                                                                          "or Label Studio tasks with pre-annotations "
                                                                          "(+ the labeling config XML)"] = "csv",
              out: Annotated[str | None, "the batch file (default RUN_DIR/active/batch-K.EXT)"] = None,
              seed: Annotated[int, "seed of random, badge and the cold start's k-means"] = 0,
              import_file: Annotated[str | None, Arg("a labeled batch (our CSV/JSONL, or a Label Studio JSON export) to "
                                                     "append to a new train file and retrain on", flag="--import",
                                                     metavar="LABELED_FILE")] = None,
              train_out: Annotated[str | None, "--import: the new train file (default RUN_DIR/active/train-K.EXT); "
                                               "never an existing file"] = None,
              no_train: Annotated[bool, "--import: write the train file and config, print the train command"] = False,
              cold: Annotated[str | None, Arg("no run yet: pick a diverse first batch by k-means on this model's (or "
                                              "config's model's) embeddings, suggestions zero-shot from --labels",
                                              metavar="CONFIG_OR_MODEL", nargs="?", const="")] = None,
              labels: Annotated[str | None, "--cold: the label names, comma-separated"] = None) -> int:
    from lmtune import active
    names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    if import_file:
        if run_dir is None:  # a cold start's labeled batch becomes the first train file
            if not train_out:
                raise InputError("label --import without RUN_DIR: give --train-out FILE, the first train file to write.")
            from lmtune.active.cold import to_train_file
            print(f"wrote {to_train_file(import_file, train_out, names)} labeled rows to {train_out}; train a first run "
                  f"on it: lmtune train CONFIG --data.train {train_out}")
            return 0
        record = active.import_labeled(run_dir, import_file, train_out, train=not no_train)
        print(f"{record['rows']} labeled rows ({record['skipped']} not labeled, {record['duplicates']} already in the "
              f"train data) -> {record['train_file']}")
        if no_train:
            print(f"retrain: lmtune train {record['config']}")
        else:
            print(f"retrained run: {record['run_dir']} (learning curve: {Path(record['run_dir']) / 'active_curve.png'})")
        return 0
    if not pool:
        raise InputError("label: give --pool FILE (the unlabeled rows), or --import LABELED_FILE.")
    if cold is not None or run_dir is None:
        if not names:
            raise InputError("label --cold: give --labels a,b,c (the label names the suggestions come from).")
        from lmtune.active.cold import cold_start
        record = cold_start(cold or "", pool, batch, names, format, out, seed)
    else:
        record = active.query(run_dir, pool, batch, strategy, format, out, seed)
    print(f"batch of {record['size']} rows ({record['strategy']}) -> {', '.join(record['files'])}")
    return 0


def cmd_export(run_dir: str, *, format: Annotated[str, "onnx (encoders and decoders), or gguf (generation runs of "
                                                   "Llama models, for llama.cpp)"] = "onnx",
               quantize: Annotated[str | None, "onnx: int8 (dynamic quantization, written beside fp32); gguf: f16 "
                                               "(default), q8_0 or q4_k_m (needs llama-cpp-python)"] = None,
               prune: Annotated[str | None, "onnx: magnitude:AMOUNT zeroes that share of each encoder weight matrix "
                                            "(smaller file); ffn:AMOUNT,heads:AMOUNT removes that share of feed-forward "
                                            "neurons / attention heads by importance (faster on every backend), then "
                                            "distils from the unpruned model"] = None,
               recover_epochs: Annotated[int | None, "onnx: epochs of distillation on the run's train split after "
                                                     "ffn/heads pruning (0: none; default 1)"] = None,
               sample: Annotated[int | None, "dev examples the export is verified on (onnx: logits, default 256; "
                                             "gguf: greedy continuations, default 20)"] = None) -> int:
    from lmtune.export import check_request
    from lmtune.registry import exporters
    # only the options given are passed on: each format keeps its own defaults, and refuses the ones it lacks
    options = {k: v for k, v in (("prune", prune), ("recover_epochs", recover_epochs), ("sample", sample)) if v is not None}
    check_request(format, run_dir, quantize, options)
    export = exporters.get(format)
    print(json.dumps(export(run_dir, **({"quantize": quantize} if quantize else {}), **options), indent=2))
    return 0


def cmd_init(data_file: str, *, task: Annotated[str | None, "the task, when the guess from the columns is wrong"] = None,
             output: Annotated[str | None, "config file to write (default lmtune.yaml)"] = None,
             force: Annotated[bool, "replace an existing config file"] = False) -> int:
    from lmtune.scaffold import write_config
    out = Path(output or "lmtune.yaml")
    info, schema = write_config(data_file, out, task, force)
    print(json.dumps({k: v for k, v in info.items() if k != "file"}, indent=2, ensure_ascii=False), file=sys.stderr)
    if schema:
        print(f"wrote {schema}: the config's JSON Schema, which editors (YAML language server) complete and check against",
              file=sys.stderr)
    print(f"wrote {out}: check the lines marked 'guess', then `lmtune train {out}`", file=sys.stderr)
    return 0


def cmd_runs(dir: Annotated[str, "the output_dir holding the runs (default: runs)"] = "runs", *,
             as_json: Annotated[bool, Arg(flag="--json")] = False) -> int:
    from lmtune.runs import format_runs, list_runs
    rows = list_runs(dir)
    print(json.dumps(rows, indent=2) if as_json else format_runs(rows))
    return 0


def cmd_compare(run_a: str, run_b: str, *, as_json: Annotated[bool, Arg(flag="--json")] = False) -> int:
    from lmtune.runs import compare, format_compare
    c = compare(run_a, run_b)
    print(json.dumps(c, indent=2) if as_json else format_compare(c))
    return 0


def cmd_push(run_dir: str, repo_id: Annotated[str | None, "the Hub repo (org/name); optional with --to or --dry-run"] = None, *,
             to: Annotated[str | None, "write the repo's files to this new local folder instead of uploading"] = None,
             dry_run: Annotated[bool, "list the files push would upload (path and size); write nothing"] = False,
             private: bool = False) -> int:
    from lmtune import hub
    if to is None and not dry_run and not repo_id:
        raise InputError("push: give the Hub repo id (push RUN_DIR ORG/NAME), or --to DIR for a local copy, or --dry-run.")
    if dry_run:
        files = hub.dry_run(run_dir, repo_id)
        for name, size in files:
            print(f"{size:>12,}  {name}")
        print(f"{len(files)} files, {sum(s for _, s in files):,} bytes would be uploaded"
              + (f" to {repo_id}" if repo_id else "") + " (dry run: nothing written)")
    elif to is not None:
        files = hub.push_to_folder(run_dir, to, repo_id)
        print(f"wrote {len(files)} files to {to} (the Hub repo's layout)")
    else:
        print(f"pushed: {hub.push(run_dir, repo_id, private)}")
    return 0


def cmd_completion(shell: Literal["bash", "zsh", "fish"]) -> int:
    """A completion script for the shell, from the same parser as --help (shtab for bash and zsh, which it
    supports; fish written here, as shtab has none)."""
    parser = build_parser(generated_help=False)
    if shell == "fish":
        from lmtune.completion import fish_script
        print(fish_script(parser))
    else:
        import shtab
        print(shtab.complete(parser, shell=shell))
    return 0


def cmd_config(*, schema: Annotated[bool, "the config file's JSON Schema (draft-07) instead of the key list"] = False,
               output: Annotated[str | None, "write it to this file instead of standard output"] = None) -> int:
    from lmtune.config import schema_text
    text = schema_text() if schema else describe_fields() + "\n"
    if output:
        from lmtune.io import write_text
        write_text(output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_chat(run_dir: str, *, max_new_tokens: Annotated[int | None, "tokens per reply at most (default: the run's)"] = None,
             system: Annotated[str | None, "a system message to start the conversation with"] = None) -> int:
    """An interactive terminal chat with a generation run: each reply streams as it is generated, with
    the decoding chosen on dev; the conversation so far is the prompt (the tokenizer's chat template)."""
    from transformers import TextStreamer

    from lmtune.api import load
    from lmtune.tasks.base import GENERATE
    run = load(run_dir)
    run.task.require(GENERATE, "chat")
    run.config.train.progress = "none"
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"chat with {Path(run_dir).name}: an empty line or /exit ends, /reset starts over", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(run.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = run.generate_examples([run.task.from_messages(history)], max_new_tokens=max_new_tokens, streamer=streamer)[0]
        if not out["finished"]:
            print(f"[stopped at {out['tokens']} tokens]", file=sys.stderr)
        history.append({"role": "assistant", "content": out["text"]})
    return 0


def cmd_search(run_dir: str, *, query: Annotated[list[str], "a query (repeatable)"] = [],  # noqa: B006 (argparse copies it)
               k: Annotated[int, "documents per query"] = 10,
               corpus: Annotated[str | None, "embed this file's documents (retrieval.corpus_column) as the run's new "
                                             "index first"] = None,
               reranker: Annotated[str | None, Arg("re-order the index's best with this pair run (a cross-encoder)",
                                                   metavar="PAIR_RUN")] = None,
               rerank_depth: Annotated[int, "candidates per query the reranker re-orders"] = 50,
               rerank_label: Annotated[str | None, "the pair run's label that means relevant (default: "
                                                   "1/true/yes/relevant ...)"] = None) -> int:
    """A retrieval run's best documents for each query: one JSON line {query, results} per query."""
    from lmtune.api import load
    if not query and not corpus:
        raise InputError("search: give --query TEXT (repeatable), and/or --corpus FILE to (re)build the run's index.")
    run = load(run_dir)
    if corpus:
        n = run.build_index(corpus)
        print(f"index: {n} documents from {corpus} written to {Path(run_dir) / 'index'}", file=sys.stderr)
    if query:
        ranker = load(reranker) if reranker else None
        for q, rows in zip(query, run.search(query, k, reranker=ranker, depth=rerank_depth, rerank_label=rerank_label)):
            print(json.dumps({"query": q, "results": rows}, ensure_ascii=False))
    return 0


def cmd_recommend_fit(config: Annotated[str, "the app's YAML (see lmtune/apps/recommend/example.yaml)"]) -> int:
    """The recommendation app (lmtune.apps.recommend): train, then compare with popularity and BM25."""
    from lmtune.apps import recommend
    result = recommend.fit(config)
    t = result["test"]
    print(f"run dir: {result['run_dir']}")
    for name in ("model", "popularity", "bm25"):
        print(f"test {name}: ndcg_10 {t[name]['ndcg_10']:.4f}  recall_10 {t[name]['recall_10']:.4f}  recall_20 {t[name]['recall_20']:.4f}")
    return 0


def cmd_recommend_rank(run_dir: str, *, user: str | None = None,
                       history: Annotated[str | None, "comma-separated item ids, oldest first"] = None, k: int = 10) -> int:
    from lmtune.apps import recommend
    if bool(user) == bool(history):
        raise InputError("recommend rank: give either --user USER or --history ITEM,ITEM,...")
    items = [x.strip() for x in history.split(",") if x.strip()] if history else None
    for row in recommend.rank(run_dir, user, items, k):
        print(json.dumps(row, ensure_ascii=False))
    return 0


KeyFile = Annotated[str | None, "file with one API key per line (else LMTUNE_API_KEYS)"]
NoAuth = Annotated[bool, "serve without API keys (localhost only)"]


def _refuse_open_no_auth(command: str, host: str, no_auth: bool) -> None:
    if no_auth and host not in LOCAL_HOSTS:
        raise InputError(f"{command}: --no-auth on {host} would let anyone on the network use it. Bind to 127.0.0.1.")


def cmd_assistant_serve(config: Annotated[str, "the app's YAML (see lmtune/apps/assistant/example.yaml)"], *,
                        host: str = "127.0.0.1", port: int = 8010, api_key_file: KeyFile = None, no_auth: NoAuth = False,
                        max_chars: Annotated[int, "characters per message"] = 2000, max_body_bytes: int = 100_000) -> int:
    """The customer-service assistant app (lmtune.apps.assistant) over HTTP."""
    from lmtune.apps import assistant
    from lmtune.apps.assistant.server import serve
    from lmtune.serve.app import ServeSettings
    cfg = assistant.load_config(config)
    _refuse_open_no_auth("assistant serve", host, no_auth)
    serve(cfg, ServeSettings(run_dir=cfg.intents, key_file=api_key_file, no_auth=no_auth, max_chars=max_chars,
                             max_body_bytes=max_body_bytes), host, port)
    return 0


def cmd_assistant_evaluate(config: str, *, data: Annotated[str, "labeled messages in the intent run's columns"]) -> int:
    from lmtune.apps import assistant
    print(json.dumps(assistant.Assistant(assistant.load_config(config)).evaluate(data)))
    return 0


def cmd_monitor(config: Annotated[str, "the app's YAML (see lmtune/apps/monitor/example.yaml)"], *,
                once: Annotated[bool, "process the watched folder once and exit (no server)"] = False,
                host: str = "127.0.0.1", port: int = 8020, api_key_file: KeyFile = None, no_auth: NoAuth = False) -> int:
    """The news monitor app (lmtune.apps.monitor): process the watched folder once, or serve and keep polling it."""
    from lmtune.apps import monitor
    cfg, rules = monitor.load_config(config)
    mon = monitor.Monitor(cfg, rules)
    if once:
        print(json.dumps(mon.process_folder()))
        return 0
    from lmtune.apps.monitor.server import serve
    from lmtune.serve.app import ServeSettings
    _refuse_open_no_auth("monitor", host, no_auth)
    serve(mon, ServeSettings(run_dir=cfg.sentiment, key_file=api_key_file, no_auth=no_auth), host, port)
    return 0


def cmd_serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 8000,
              workers: Annotated[int, "worker processes (each loads the model)"] = 1,
              backend: Annotated[str, Arg("auto: the run's int8 ONNX export, else its fp32 one, else torch",
                                          choices=("auto", *backends.names()))] = "auto",
              api_key_file: Annotated[str | None, "file with one API key per line"] = None,
              no_auth: Annotated[bool, "serve without API keys (local experiments only; refused on a non-local --host "
                                       "unless --insecure)"] = False,
              insecure: Annotated[bool, "allow --no-auth on a non-local --host"] = False,
              header_timeout: Annotated[float, "seconds a client has to send a request's head"] = 10.0,
              body_timeout: Annotated[float, "seconds a client has to send the body after the head"] = 30.0,
              max_connections: Annotated[int, "open connections (kept below the open-file limit); over it the oldest "
                                               "waiting one is dropped"] = 1000,
              max_batch_size: Annotated[int, "texts per model call"] = 32,
              max_wait_ms: Annotated[float, "how long a request waits for others to batch with"] = 5.0,
              max_queue: Annotated[int, "texts waiting before requests get 503"] = 2048,
              max_texts: Annotated[int, "texts per request"] = 64,
              max_chars: Annotated[int, "characters per text"] = 2000,
              explain_per_minute: Annotated[int, "/v1/predict?explain=true requests per minute and API key (0: "
                                                 "explanations off)"] = 30,
              max_body_bytes: int = 1_000_000,
              max_new_tokens: Annotated[int, "generation runs: the most tokens one /v1/generate request may ask for"] = 256,
              threads: Annotated[int | None, "model threads per worker (default: cores / workers)"] = None) -> int:
    from lmtune.serve.app import ServeSettings, create_app, serve
    if no_auth and host not in LOCAL_HOSTS and not insecure:
        raise InputError(f"serve: --no-auth on {host} would let anyone on the network use the model. Bind to "
                         "127.0.0.1, configure API keys, or add --insecure if you really mean it.")
    settings = ServeSettings(run_dir=run_dir, backend=backend, key_file=api_key_file, no_auth=no_auth,
                             max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes, threads=threads,
                             header_timeout_s=header_timeout, body_timeout_s=body_timeout, max_connections=max_connections,
                             explain_per_minute=explain_per_minute, max_new_tokens=max_new_tokens)
    if workers == 1:
        create_app(settings)  # fail fast on a bad run dir or missing keys, before uvicorn starts
    serve(settings, host, port, workers)
    return 0


# ---- the table ------------------------------------------------------------------------------------

COMMANDS: dict[str, Command | Group] = {
    "train": Command(cmd_train, "fine-tune from a config file", lambda: TRAIN_HELP + describe_fields()),
    "demo": Command(cmd_demo, "train the packaged MiniLM on the bundled review data",
                    "Runs `lmtune train` on the bundled demo config; --section.key VALUE flags override it."),
    "evaluate": Command(cmd_evaluate, "metrics of a trained run on a labeled file"),
    "predict": Command(cmd_predict, "predict with a trained run (any task); one JSON line per input",
                       "Predictions as JSONL: labels, spans, scores or answers with their probabilities, intervals or "
                       "abstentions, as the run's task gives them."),
    "ui": Command(cmd_ui, "a local web dashboard: runs, run pages, compare, try it, train from the browser",
                  "Serves the dashboard from the installed package (no internet needed). Binds to 127.0.0.1; another "
                  "--host needs a token (LMTUNE_UI_TOKEN or --token-file); requests naming another Host are refused. "
                  "Job configs and file picks are confined to the current directory and the --allow-path folders."),
    "audit": Command(cmd_audit, "check the data of a config: balance, duplicates, conflicts, leakage",
                     "lmtune audit CONFIG.yaml [--strict] [--section.key VALUE ...]: findings as JSON; --strict exits 1 "
                     "when any finding is critical. --data.label_noise_folds 5 adds label-noise candidates (confident "
                     "learning on 5-fold out-of-fold predictions)."),
    "report": Command(cmd_report, "render RUN_DIR/report.md again from RUN_DIR/results.json"),
    "prefer": Command(cmd_prefer, "preference-tune a generation run: pairs from its own samples (ROUGE-L minus loop, "
                                  "length and invention penalties), then DPO (or ORPO) into a new run dir; --run_name, "
                                  "--output_dir and config keys as overrides"),
    "distill": Command(cmd_distill, "distil a run (one model, an ensemble, a soup) into a smaller student run: soft targets "
                                    "on its train split and --unlabeled texts; compared with the teacher and with the "
                                    "student on hard labels alone"),
    "label": Command(cmd_label, "active learning: the next batch of a pool to label (with the model's suggestions), "
                                "then --import the labels to grow the train file and retrain",
                     "lmtune label RUN_DIR --pool FILE [--batch N] [--strategy entropy|margin|coreset|badge|random] "
                     "[--format csv|jsonl|label-studio] [--out FILE] writes the batch and records it in RUN_DIR/active.json; "
                     "lmtune label RUN_DIR --import LABELED_FILE appends the labeled rows to a new train file beside the "
                     "run and trains the run's config on it (--no-train: print the command); the learning curve is "
                     "RUN_DIR/active_curve.png. No run yet: lmtune label --cold [CONFIG_OR_MODEL] --pool FILE --labels "
                     "a,b,c."),
    "merge": Command(cmd_merge, "fold a LoRA/AdaLoRA/IA3 adapter into a standalone model folder"),
    "export": Command(cmd_export, "export a run to ONNX (optionally int8 / pruned) or GGUF, verified against PyTorch",
                      "--format onnx writes RUN_DIR/export/ (model.onnx, model.int8.onnx, tokenizer, export.json with the "
                      "max logit difference and the dev metric before/after). --format gguf (generation runs of Llama "
                      "models) merges the LoRA and writes RUN_DIR/gguf/model.QUANT.gguf for llama.cpp, with gguf.json "
                      "giving the greedy token agreement with PyTorch on dev prompts."),
    "chat": Command(cmd_chat, "chat in the terminal with a generation run (replies stream as they are generated)"),
    "search": Command(cmd_search, "a retrieval run's best documents for a query, from the run's index (or a new corpus)"),
    "recommend": Group("text-based recommendation app: fit a two-tower model on interactions, rank items for a user", {
        "fit": Command(cmd_recommend_fit, "train, then compare with popularity and BM25 on a leave-last-out split "
                                          "(recommend.json)"),
        "rank": Command(cmd_recommend_rank, "the top items for a user (or a list of item ids), items already taken excluded")}),
    "assistant": Group("customer-service assistant app: intent routing, FAQ answers, hand-off (see Applications)", {
        "serve": Command(cmd_assistant_serve, "POST /v1/chat, a chat page at /, /healthz, /metrics; API keys as lmtune serve"),
        "evaluate": Command(cmd_assistant_evaluate, "routing accuracy on a labeled file (right answer, or hand-off for "
                                                    "out-of-scope)")}),
    "monitor": Command(cmd_monitor, "news sentiment monitor app: companies, sentiment, alert rules, a page (see Applications)"),
    "serve": Command(cmd_serve, "serve a run over HTTP (FastAPI): /v1/predict (/v1/generate), /health, /readyz, /info, "
                                "/v1/models, /metrics, /docs",
                     "API keys come from LMTUNE_API_KEYS (comma-separated) or --api-key-file; calls without a valid key "
                     "get 401 (/health, /healthz, /readyz and the docs need none). Uses RUN_DIR/export (ONNX, int8 first) "
                     "when present. /docs is Swagger UI served from the installed package: it works offline."),
    "config": Command(cmd_config, "list every config key with its default and meaning, or write the JSON Schema (--schema)"),
    "init": Command(cmd_init, "inspect a labeled file and write a commented config to start from"),
    "runs": Command(cmd_runs, "list runs: task, model, date, headline metrics, status"),
    "compare": Command(cmd_compare, "two runs side by side: config differences and metric differences"),
    "push": Command(cmd_push, "upload RUN_DIR/model (weights, tokenizer, model card) to a Hugging Face Hub repo",
                    "Needs a token (HF_TOKEN or `hf auth login`); creates the repo when missing. --to DIR writes the "
                    "same files (the repo's exact layout) to a local folder, --dry-run lists them; neither needs the "
                    "network."),
    "pretrain": Command(cmd_pretrain, "continue masked-LM pretraining on unlabeled in-domain text (pretrain.* keys)",
                        "lmtune pretrain CONFIG.yaml [--pretrain.files '[a.txt]'] [--section.key VALUE ...]: writes "
                        "OUTPUT_DIR/RUN/model (use it as model.name) and pretrain.json with held-out perplexity before and "
                        "after."),
    "tune": Command(cmd_tune, "hyperparameter search (Optuna TPE, pruning); each trial a run dir under OUTPUT_DIR/RUN_NAME",
                    "lmtune tune CONFIG.yaml --trials N [--timeout S] [--soup] [--no-prune] [--resume] "
                    "[--section.key VALUE ...]: tune.space (default by model width), tune.pruner, tune.storage. "
                    "Start it N times to run N workers on one study. --resume re-queues trials a stopped "
                    "worker left running. Writes study.json, study.md, history.png, best.yaml."),
    "cv": Command(cmd_cv, "stratified (or grouped) k-fold cross-validation, and an ensemble of the fold models",
                  "lmtune cv CONFIG.yaml [--folds 5] [--no-ensemble] [--section.key VALUE ...]: folds over train + dev "
                  "(data.group_column keeps groups together); writes OUTPUT_DIR/RUN_NAME (default cv)/fold-K, cv.json, "
                  "cv.md, oof.jsonl and ensemble/."),
    "ensemble": Command(cmd_ensemble, "a run dir that averages its members' calibrated probabilities"),
    "soup": Command(cmd_soup, "average the weights of runs of one base model into one run dir (model soup)"),
    "completion": Command(cmd_completion, "print a shell completion script: eval \"$(lmtune completion bash)\" "
                                          "(or zsh); lmtune completion fish | source"),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description may be a function, called only when the help is printed: `train`'s
    lists every config key, which imports the tasks that declare them (torch), and `lmtune --help` or
    completion must not pay for that."""

    @property
    def description(self) -> str | None:
        text = self._description
        return text() if callable(text) else text

    @description.setter
    def description(self, text: str | Callable[[], str] | None) -> None:
        self._description = text


def _add_commands(sub: argparse._SubParsersAction, table: dict[str, Command | Group], generated_help: bool) -> None:
    for name, entry in table.items():
        if isinstance(entry, Group):
            group = sub.add_parser(name, help=entry.help)
            _add_commands(group.add_subparsers(dest=f"{name}_command", required=True, parser_class=_Parser),
                          entry.commands, generated_help)
            continue
        description = entry.description if generated_help or not callable(entry.description) else None
        p = sub.add_parser(name, help=entry.help, description=description, allow_abbrev=False,  # --section.key must never abbreviate
                           formatter_class=argparse.RawDescriptionHelpFormatter if callable(entry.description)
                           else argparse.HelpFormatter)
        if entry.arguments:
            entry.arguments(p)
        else:
            add_signature_arguments(p, entry.run)
        p.set_defaults(command_entry=entry)


def _load_run(run_dir: str, backend: str = "torch"):
    from lmtune.api import load
    return load(run_dir, backend=backend)


def analysis_commands() -> dict[str, Command]:
    """An entry per registered analysis that runs (drift, fairness, explain, attack, ...): the analysis seam
    builds its flags from its declared params and runs it through Run.analyse. Read from the registry when
    the parser is built, so an analysis registered before main() is called has its command too."""
    from lmtune import analysis
    return {command: Command(functools.partial(analysis.run_command, name, _load_run), entry.help, entry.description,
                             functools.partial(analysis.add_arguments, entry))
            for command, name, entry in analysis.runnable()}


def command_table() -> dict[str, Command | Group]:
    """Every command: the table above and the registered analyses (an analysis may not take a built-in's name)."""
    analyses = analysis_commands()
    if clash := sorted(set(analyses) & set(COMMANDS)):
        raise ValueError(f"analysis command(s) {clash} would replace built-in commands; register them under another name")
    return {**COMMANDS, **analyses}


def build_parser(generated_help: bool = True) -> argparse.ArgumentParser:
    """The whole command line. generated_help=False leaves out the help texts generated from the config
    (train's key list), for the completion scripts, which would read them and so import the tasks."""
    p = _Parser(prog="lmtune", description="Fine-tune, evaluate and serve pretrained language models.")
    p.add_argument("--version", action="version", version=f"lmtune {_version()}")
    _add_commands(p.add_subparsers(dest="command", required=True, parser_class=_Parser), command_table(), generated_help)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmtune")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (`lmtune completion zsh | head -1`): stop quietly, like any Unix filter. Python's
        # final flush of stdout would raise again, so stdout now points at /dev/null (Python docs, "SIGPIPE").
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file descriptor (an embedding program's stream)
            pass
        return 141  # 128 + SIGPIPE: what the shell reports for a filter stopped by a closed pipe


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lmtune").setLevel(logging.INFO)
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    command: Command = ns.command_entry
    if command.overrides:  # parsed again with each override's value kept beside its key
        ns, extras = parser.parse_known_args(_paired(argv, option_flags(command.run)))
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return _call(command, ns, extras)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
