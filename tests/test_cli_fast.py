"""The command line answers --version, --help and completion without the machine-learning stack: torch,
transformers, peft and scikit-learn are imported only when a command runs. Speed itself is measured
(`time lmtune --version`), not tested; these check the imports that make it slow, in a fresh interpreter.
A closed pipe ends the CLI quietly, and fish gets a completion script of its own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "sklearn")
# the checkout under test first, as a subprocess would otherwise import the installed (editable) copy
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120, check=False)


def _heavy_imported_by(code: str) -> list[str]:
    """The heavy top-level packages in sys.modules after running code in a fresh interpreter."""
    proc = _run(code + f"\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # a printed list of names


def test_building_the_parser_imports_no_ml_library():
    assert _heavy_imported_by("import lmtune\nimport lmtune.cli\nlmtune.cli.build_parser()") == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["serve", "--help"], ["drift", "--help"], ["train", "--help"],
                                  ["config"], ["config", "--schema"],
                                  ["completion", "bash"], ["completion", "zsh"], ["completion", "fish"]])
def test_version_help_and_completion_import_no_ml_library(argv):
    code = f"import contextlib, io\nfrom lmtune.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n" \
           f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass"
    assert _heavy_imported_by(code) == []


def test_python_dash_m_version_imports_no_ml_library():
    # -X importtime lists every module the process imported, on stderr
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmtune", "--version"], capture_output=True,
                          text=True, env=ENV, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("lmtune ")
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "lmtune" in imported and not imported & set(HEAVY)


def test_the_package_names_still_resolve_when_used():
    import lmtune
    assert callable(lmtune.train) and callable(lmtune.load) and issubclass(lmtune.InputError, Exception)
    assert {"Run", "Config", "load_config"} <= set(dir(lmtune))
    with pytest.raises(AttributeError):
        lmtune.no_such_name  # noqa: B018


def test_train_help_still_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "Config keys:" in out and "train.lr" in out and "data.max_length" in out
    assert "generate.max_new_tokens" in out and "data.tag_scheme" in out  # the task-owned sections too


@pytest.mark.parametrize("argv", [["completion", "zsh"], ["completion", "fish"], ["--help"]])
def test_a_closed_pipe_ends_quietly(argv):
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    proc.stdout.close()  # the reader is gone before the first write (`| head -0`), whatever the output's size
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()[-2000:]
    assert proc.returncode in (0, 141)  # --help exits through argparse's own exit (0)


def _fish_lines() -> list[str]:
    from lmtune.completion import fish_script
    return fish_script(build_parser(generated_help=False)).splitlines()


def test_fish_completion_has_every_command_and_its_options():
    lines = _fish_lines()
    assert all(line.startswith(("complete -c lmtune ", "#")) for line in lines)
    commands = {line.split(" -a ")[1].split()[0] for line in lines if "-n '__fish_use_subcommand' -f -a " in line}
    assert {"train", "predict", "serve", "completion", "recommend", "drift", "attack"} <= commands
    serve = [line for line in lines if "'__fish_seen_subcommand_from serve'" in line]
    assert any("-l backend -xa 'auto " in line for line in serve)  # a choice option offers its values
    assert any("-l no-auth -d " in line and " -r" not in line for line in serve)  # a switch takes no value
    assert any("-l port -r" in line for line in serve)
    assert any("'__fish_seen_subcommand_from recommend; and __fish_seen_subcommand_from rank' -l history -r" in line
               for line in lines)
    assert main(["completion", "fish"]) == 0


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_commands_options_and_choices(tmp_path):
    script = tmp_path / "lmtune.fish"
    script.write_text("\n".join(_fish_lines()) + "\n")

    def complete(line: str) -> list[str]:
        proc = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C {line!r}"],
                              capture_output=True, text=True, timeout=60, check=True)
        return [c.split("\t")[0] for c in proc.stdout.splitlines()]

    assert "train" in complete("lmtune tr") and "tune" not in complete("lmtune tr")
    assert complete("lmtune train --re") == ["--resume"]
    assert set(complete("lmtune serve RUN --backend ")) == {"auto", "torch", "onnx", "onnx-int8"}
    assert set(complete("lmtune recommend ")) == {"fit", "rank"}
    assert "--history" in complete("lmtune recommend rank --h")
    assert "--alpha" in complete("lmtune drift RUN --")
