"""Every benchmark script starts the way a user runs it (`python bench/X.py --help`): its folder comes
first on sys.path there, so a script named like a library (bench/peft.py once) would shadow it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports_and_shows_help(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_no_bench_script_is_named_like_an_installed_module():
    import importlib.util
    import importlib.machinery
    # searched without bench/ itself, which the bench-module tests (test_bench_splits, ...) put on sys.path
    path = [p for p in sys.path if Path(p or ".").resolve() != BENCH.resolve()]
    clashes = [p.stem for p in BENCH.glob("*.py")
               if p.stem in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(p.stem, path) is not None]
    assert not clashes, f"bench scripts shadowing installed modules: {clashes}"
