"""Options live with their owner: a task defined only in this file declares its own config section
(a field with a default and a range), registers it, and is trained from the command line; no lmtune
file names it. The section's default reaches the task, a bad value is the usual `error: FILE: line N`
with exit 2, and the section is in the saved config and in report.md."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lmtune import registry
from lmtune.cli import main
from lmtune.config import build_config, option
from lmtune.errors import InputError
from lmtune.tasks import register
from lmtune.tasks.base import CALIBRATE
from lmtune.tasks.classification import ClassificationTask


@dataclass
class EchoSection:
    repeat: int = option(2, "echo task: how many times each training text is repeated.", range="[1, 5]")

    def validate(self, cfg, where: str) -> None:  # the section's own check, run by config.validate
        if self.repeat > 1 and cfg.data.max_length < 16:
            raise InputError(f"{where}: echo.repeat {self.repeat} needs data.max_length >= 16 to keep the repeats.")


class EchoTask(ClassificationTask):
    """Classification that repeats each training text `echo.repeat` times, and says so in its report."""
    name = "echo"
    capabilities = frozenset({CALIBRATE})
    repeat: int | None = None

    def read(self, cfg):
        splits = super().read(cfg)
        self.repeat = cfg.echo.repeat
        for ex in splits.train:
            ex.text = " ".join([ex.text] * self.repeat)
        return splits

    def state(self) -> dict:
        return {**super().state(), "echo_repeat": self.repeat}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.repeat = state.get("echo_repeat")

    def report(self, split_metrics, labels, run_dir) -> str:
        return super().report(split_metrics, labels, run_dir) + f"\n### Echo\n\nEach training text repeated {self.repeat} times.\n"


@pytest.fixture
def echo():
    register("echo", "tests.test_config_sections:EchoTask")
    registry.config_sections.register("echo", "tests.test_config_sections:EchoSection", moved={"data.echo_repeat": "echo.repeat"})
    yield
    registry.config_sections.unregister("echo")  # later tests see the built-in sections only
    registry.tasks.unregister("echo")


def _yaml(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_task_with_its_own_section_trains_from_the_cli(echo, tiny_config, tmp_path, capsys):
    cfg = {**tiny_config, "task": "echo", "train": {**tiny_config["train"], "max_steps": 3}}
    assert main(["train", str(_yaml(tmp_path, cfg))]) == 0
    run_dir = Path(re.search(r"run dir: (.+)", capsys.readouterr().out).group(1))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["echo"] == {"repeat": 2}  # the section's default
    assert "Each training text repeated 2 times." in (run_dir / "report.md").read_text()  # the task read it
    # a value from the command line reaches the task the same way
    assert main(["train", str(_yaml(tmp_path, {**cfg, "run_name": "three"})), "--echo.repeat", "3"]) == 0
    assert "repeated 3 times" in (Path(tiny_config["output_dir"]) / "three" / "report.md").read_text()


def test_an_out_of_range_value_names_the_file_and_line(echo, tiny_config, tmp_path, capsys):
    path = _yaml(tmp_path, {**tiny_config, "task": "echo", "echo": {"repeat": 9}})
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("repeat:"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: line {line}: echo.repeat must be in [1, 5], got 9." in err
    assert not Path(tiny_config["output_dir"]).exists()  # nothing written


def test_the_section_is_documented_and_a_moved_key_still_works(echo, capsys):
    assert main(["config"]) == 0
    assert re.search(r"echo\.repeat\s+default 2\s+echo task: how many times .* \(range \[1, 5\]\)", capsys.readouterr().out)
    with pytest.warns(DeprecationWarning, match="data.echo_repeat has moved to echo.repeat"):
        cfg = build_config({"task": "echo", "data": {"train": "x.csv", "echo_repeat": 4}})
    assert cfg.echo.repeat == 4 and cfg.to_dict()["echo"] == {"repeat": 4}


def test_the_section_validates_itself(echo):
    with pytest.raises(InputError, match="echo.repeat 3 needs data.max_length >= 16"):
        build_config({"task": "echo", "data": {"train": "x.csv", "max_length": 8}, "echo": {"repeat": 3}})
    assert build_config({"task": "echo", "data": {"train": "x.csv", "max_length": 8}, "echo": {"repeat": 1}}).echo.repeat == 1


def test_the_section_goes_when_its_owner_goes(echo):
    registry.config_sections.unregister("echo")
    with pytest.raises(Exception, match="unknown key 'echo'"):
        build_config({"echo": {"repeat": 3}})
    assert "echo" not in build_config({}).to_dict()
