"""Commands as one table: each command's arguments come from its function's typed signature, main has
no per-command cases, and the docs' command list (docs/commands.md) covers the table."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Literal

import pytest

from lmtune.cli import Command, Group, add_signature_arguments, build_parser, command_table, main

ROOT = Path(__file__).resolve().parent.parent


def _names(table: dict, prefix: str = "") -> list[str]:
    out = []
    for name, entry in table.items():
        out += _names(entry.commands, f"{prefix}{name} ") if isinstance(entry, Group) else [f"{prefix}{name}"]
    return out


def test_the_commands_page_lists_every_command_of_the_table():
    commands = (ROOT / "docs" / "commands.md").read_text()
    missing = [n for n in _names(command_table()) if f"`lmtune {n}" not in commands and f"lmtune {n}" not in commands]
    assert not missing, missing
    assert len(_names(command_table())) >= 30


def sample(path: str, *, mode: Literal["fast", "slow"] = "fast", tag: Annotated[list[str] | None, "a tag (repeatable)"] = None,
           limit: Annotated[int, "how many"] = 3, quiet: bool = False, out: str) -> int:
    return 0


def test_arguments_come_from_the_signature(capsys):
    p = argparse.ArgumentParser(prog="sample")
    add_signature_arguments(p, sample)
    ns = p.parse_args(["f.txt", "--mode", "slow", "--tag", "a", "--tag", "b", "--limit", "7", "--quiet", "--out", "o"])
    assert vars(ns) == {"path": "f.txt", "mode": "slow", "tag": ["a", "b"], "limit": 7, "quiet": True, "out": "o"}
    assert vars(p.parse_args(["f.txt", "--out", "o"])) == {"path": "f.txt", "mode": "fast", "tag": None, "limit": 3,
                                                            "quiet": False, "out": "o"}
    for bad in (["f.txt"], ["f.txt", "--out", "o", "--mode", "medium"], ["f.txt", "--out", "o", "--limit", "x"]):
        with pytest.raises(SystemExit):  # a keyword-only parameter without default is required; Literal is choices
            p.parse_args(bad)
    p.print_help()
    assert "a tag (repeatable)" in capsys.readouterr().out
    assert not Command(sample, "h").overrides and Command(lambda *, overrides: 0, "h").overrides


def test_the_built_in_commands_parse_as_their_functions_expect():
    ns, extras = build_parser().parse_known_args(["serve", "RUN", "--port", "9", "--no-auth", "--max-wait-ms", "2.5"])
    assert (ns.run_dir, ns.port, ns.no_auth, ns.max_wait_ms, ns.backend, extras) == ("RUN", 9, True, 2.5, "auto", [])
    ns, extras = build_parser().parse_known_args(["train", "c.yaml", "--resume", "--train.lr", "1e-4", "--epochs=2"])
    assert (ns.config, ns.resume, extras) == ("c.yaml", True, ["--train.lr", "1e-4", "--epochs=2"])
    ns, _ = build_parser().parse_known_args(["train", "c.yaml", "--from", "old", "--resume", "runs/x"])
    assert (ns.from_run, ns.resume) == ("old", "runs/x")
    ns, _ = build_parser().parse_known_args(["recommend", "rank", "R", "--user", "u", "--k", "3"])
    assert (ns.command_entry.run.__name__, ns.user, ns.k) == ("cmd_recommend_rank", "u", 3)


def test_a_command_without_overrides_refuses_unknown_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "RUN", "--train.lr", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --train.lr 1" in capsys.readouterr().err
    assert main(["tune", "--tune.seed", "1"]) == 2  # overrides are taken; --trials is still asked for
    assert re.search(r"error: tune: give --trials N", capsys.readouterr().err)


def test_an_override_value_is_never_taken_for_the_config_file():
    from lmtune.cli import _paired, option_flags
    from lmtune.cli import cmd_train
    args = _paired(["pretrain", "--model.name", "m", "--pretrain.files", "[a.txt]", "--lr=1"], option_flags(cmd_train))
    assert args == ["pretrain", "--model.name=m", "--pretrain.files=[a.txt]", "--lr=1"]
    assert _paired(["train", "c.yaml", "--resume", "runs/x", "--from", "old", "--epochs", "-1"], option_flags(cmd_train)) == \
        ["train", "c.yaml", "--resume", "runs/x", "--from", "old", "--epochs=-1"]
