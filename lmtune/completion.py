"""Fish completion for the command line, written from the same argparse parser as --help (shtab, which
gives the bash and zsh scripts, has no fish). One `complete` line per command and per option:

    complete -c lmtune -n __fish_use_subcommand -a train -d 'fine-tune from a config file'
    complete -c lmtune -n '__fish_seen_subcommand_from train' -l resume -d '...'

This module imports nothing heavy: completion must answer at once.
"""
from __future__ import annotations

import argparse

PROG = "lmtune"


def _quote(text: str) -> str:
    """A fish single-quoted string (only backslash and quote are special inside one)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _help_line(text: str | None) -> str:
    """The first line of a help text, as argparse would print it (%% is a literal %)."""
    if not text or text == argparse.SUPPRESS:
        return ""
    return " ".join(text.split()).replace("%%", "%")


def _subcommands(parser: argparse.ArgumentParser) -> tuple[argparse._SubParsersAction | None, dict[str, str]]:
    """The parser's sub-command action and each sub-command's one-line help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action, {a.dest: _help_line(a.help) for a in action._choices_actions}
    return None, {}


def _option_line(condition: str, action: argparse.Action) -> str | None:
    """The `complete` line of one option: its flags, whether it takes a value, its choices, its help."""
    if not action.option_strings or action.help == argparse.SUPPRESS:
        return None
    parts = [f"complete -c {PROG} -n {_quote(condition)}"]
    for flag in action.option_strings:
        parts.append(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}")
    if action.nargs != 0:  # takes a value: -r; a fixed set of values: -x (no files) with the values
        parts.append(f"-xa {_quote(' '.join(map(str, action.choices)))}" if action.choices else "-r")
    if text := _help_line(action.help):
        parts.append(f"-d {_quote(text)}")
    return " ".join(parts)


def _lines(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    sub, helps = _subcommands(parser)
    # where this parser's options and sub-commands apply: its command path was typed (and, for a group,
    # none of its sub-commands yet when offering them)
    seen = "; and ".join(f"__fish_seen_subcommand_from {name}" for name in path)
    lines = [line for a in parser._actions if (line := _option_line(seen or "__fish_use_subcommand", a))]
    if sub is None:
        return lines
    if path:
        offer = f"{seen}; and not __fish_seen_subcommand_from {' '.join(sub.choices)}"
    else:
        offer = "__fish_use_subcommand"
        lines.insert(0, f"complete -c {PROG} -n __fish_use_subcommand -f")  # a command comes first, not a file
    for name, child in sub.choices.items():
        lines.append(f"complete -c {PROG} -n {_quote(offer)} -f -a {name}"
                     + (f" -d {_quote(helps[name])}" if helps.get(name) else ""))
        lines += _lines(child, [*path, name])
    return lines


def fish_script(parser: argparse.ArgumentParser) -> str:
    """The fish completion script: `lmtune completion fish | source`, or save it as
    ~/.config/fish/completions/lmtune.fish."""
    return "\n".join([f"# fish completion for {PROG} (lmtune completion fish)", *_lines(parser, [])]) + "\n"
