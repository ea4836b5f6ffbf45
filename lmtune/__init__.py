"""lmtune: fine-tune, evaluate and report pretrained language models from a labeled file."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmtune.api import Run, load, train
    from lmtune.config import Config, load_config
    from lmtune.errors import InputError

# name -> the module that defines it. Imported on first use (PEP 562), so `import lmtune` (and so the
# CLI's --version, --help and completion) does not pay for torch and transformers up front.
_LAZY = {"Run": "lmtune.api", "load": "lmtune.api", "train": "lmtune.api",
         "Config": "lmtune.config", "load_config": "lmtune.config", "InputError": "lmtune.errors"}

__all__ = ["Config", "InputError", "Run", "__version__", "load", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lmtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
