"""The seam for run analyses: what a trained run is asked after training (drift, fairness, explanations,
robustness, ...) and what report.md shows of it.

An analysis is an `Analysis` registered by name in `lmtune.registry.analyses` (built-ins in
lmtune/registrations.py, each in its own module under lmtune/analyses/). It declares

- `run(run, **params) -> dict`: the result, as JSON data (None for a section that training writes);
- `section(result) -> str`: its markdown, printed by its command and shown in report.md;
- `params`: its options, each a keyword of `run` and a flag of its command (`lmtune NAME RUN_DIR --flag ...`).

`Run.analyse(name, **params)` (here: `analyse`) runs one, writes RUN_DIR/NAME.json and puts the result
into results.json under NAME, which renders report.md again; `results.render` shows every registered
section present in results.json, in registration order. `runnable` and `add_arguments` give the cli's
command table an entry per analysis that runs, built from the registry when the parser is built, so an analysis registered before
`lmtune.cli.main` is called has a command too. Adding an analysis is one module and one registration.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.io import write_json
from lmtune.registry import analyses


@dataclass(frozen=True)
class Param:
    """One option of an analysis: a keyword of its function and the flag --NAME (underscores as dashes)
    of its command."""
    name: str
    type: type = str  # str, int, float; bool: a switch; list: comma-separated on the command line
    default: Any = None
    help: str | None = None
    choices: tuple | None = None
    required: bool = False
    repeat: bool = False  # the flag may be given again: a list of values
    command_only: bool = False  # read by the command (--json, --backend ...), not passed to the function

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"help": self.help, "dest": self.name}
        if self.type is bool:
            kw["action"] = "store_true"
        else:
            kw.update(default=self.default, required=self.required,
                      type=str if self.type is list else self.type,
                      **({"choices": list(self.choices)} if self.choices else {}),
                      **({"action": "append"} if self.repeat else {}))
        parser.add_argument(self.flag, **kw)

    def value(self, ns: argparse.Namespace) -> Any:
        v = getattr(ns, self.name)
        if self.type is list and isinstance(v, str):  # "a, b" -> ["a", "b"]; an empty flag is not given
            return [c.strip() for c in v.split(",") if c.strip()] if v else None
        return v


@dataclass(frozen=True)
class Analysis:
    """A registered analysis (see the module docstring). The registry's name is its NAME: the results.json
    key, the NAME.json file and, unless `command` says otherwise, the subcommand."""
    section: Callable[[dict], str]  # result -> markdown (printed by the command; report.md unless in_report)
    run: Callable[..., dict] | None = None  # (run, **params) -> result; None: training writes it, no command
    params: tuple[Param, ...] = ()
    help: str = ""  # one line for `lmtune --help`
    description: str | None = None  # the command's --help text
    command: str | None = None  # the subcommand when it is not NAME (robustness: attack)
    prints_json: bool = False  # the command prints the result as JSON (else the section; JSON with a json param)
    quiet: bool = False  # the command turns the run's progress bars off
    # report.md's section when it needs the run directory (a figure) or other results: (result, run_dir, results)
    in_report: Callable[[dict, Path, dict], str] | None = None
    # the command answers some options itself (explain --text): (load, options) -> exit status, or None to analyse
    command_mode: Callable[[Callable[[], Any], dict], int | None] | None = None

    def report(self, result: dict, run_dir: Path, doc: dict) -> str:
        """The section report.md shows ("" for none)."""
        return self.in_report(result, run_dir, doc) if self.in_report else self.section(result)


def get(name: str) -> Analysis:
    return analyses.get(name)


def result_file(run_dir: str | Path, name: str) -> Path:
    """RUN_DIR/NAME.json: where an analysis' result is written (RunDir names it)."""
    return RunDir(run_dir).analysis(name)


def analyse(run: Any, name: str, **params: Any) -> dict:
    """Run the analysis NAME on a loaded run; its result goes to RUN_DIR/NAME.json and, for a run with
    results.json, into it under NAME (report.md rendered again, a new result replacing the old)."""
    from lmtune import results  # here, not at the top: results imports the tasks (torch), and the cli's parser
    # imports this module to list the analysis commands
    analysis = get(name)
    if analysis.run is None:
        raise InputError(f"{name}: this section is written by training; there is nothing to run.")
    result = analysis.run(run, **params)
    write_json(result_file(run.run_dir, name), result)
    if results.path(run.run_dir).is_file():  # a run trained before results.json keeps only NAME.json
        results.update(run.run_dir, **{name: result})
    return result


def examples_of(run: Any, data: str | Path | None, split: str, require_label: bool = True) -> list:
    """The examples an analysis reads: a file with the run's columns, else a split of the run (dev or
    test), re-read from the data sources its config records."""
    if data:
        return run.task.read_file(str(data), run.config, run.labels, require_label=require_label)
    return run.split_examples(split)


def runnable() -> list[tuple[str, str, Analysis]]:
    """(subcommand, registry name, analysis) for every registered analysis that runs, read from the registry
    when asked, so an analysis registered before `lmtune.cli.main` is called has a command too."""
    return [(get(n).command or n, n, get(n)) for n in analyses.names() if get(n).run is not None]


def add_arguments(analysis: Analysis, parser: argparse.ArgumentParser) -> None:
    """The command's arguments: the run directory, then one flag per declared param."""
    parser.add_argument("run_dir")
    for param in analysis.params:
        param.add_to(parser)


def run_command(name: str, load: Callable[..., Any], ns: argparse.Namespace) -> int:
    """The one handler of every analysis command: load the run, analyse, print the section (or JSON),
    say where the result went."""
    analysis = get(name)
    options = {p.name: p.value(ns) for p in analysis.params}
    backend = {"backend": options["backend"]} if options.get("backend") else {}  # a backend param picks the loader's
    opener = functools.partial(load, ns.run_dir, **backend)
    if analysis.command_mode is not None:
        status = analysis.command_mode(opener, options)
        if status is not None:
            return status
    run = opener()
    if analysis.quiet:
        run.config.train.progress = "none"
    kwargs = {p.name: options[p.name] for p in analysis.params if not p.command_only}
    result = run.analyse(name, **kwargs)
    as_json = analysis.prints_json or options.get("json")
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else analysis.section(result))
    print(f"wrote {result_file(ns.run_dir, name)}", file=sys.stderr)
    return 0
