"""Every module imports by its dotted name (`import lmtune.training.loop` once failed: the function
lmtune.train shadowed the subpackage), and lmtune's modules import each other without a cycle."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmtune

MODULES = sorted(m.name for m in pkgutil.walk_packages(lmtune.__path__, "lmtune.") if not m.name.endswith("__main__"))


def test_every_module_imports_by_its_dotted_name():
    # `import a.b.c as m` resolves the attribute chain a -> b -> c, which is what a shadowing name breaks
    script = "\n".join(f"import {name} as m\nassert m.__name__ == {name!r}, m" for name in MODULES)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lmtune.training.loop" in MODULES and len(MODULES) > 30


def test_no_import_cycles():
    root = Path(lmtune.__file__).resolve().parent.parent
    hook = root.parent / "shared" / "hooks" / "import_cycles.py"
    if not hook.is_file():
        pytest.skip("../shared/hooks/import_cycles.py is not beside this checkout")
    proc = subprocess.run([sys.executable, str(hook), "lmtune"], capture_output=True, text=True, check=False, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
