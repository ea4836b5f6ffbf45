"""TensorBoard, a registered tracker (lmtune.registrations): a loop callback that writes the
history rows not yet written.

A tracker is a class with `require()` (raises InputError before training when its package is
missing), `__init__(run_dir, cfg)`, `__call__(state)` after each step, and `close()`.
"""
from __future__ import annotations

from pathlib import Path

from lmtune.errors import InputError


class TensorBoardLogger:
    @staticmethod
    def require():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("train.trackers: tensorboard needs the tensorboard package. "
                             "pip install 'lmtune[tensorboard]', or leave tensorboard out of train.trackers.") from None
        return SummaryWriter

    def __init__(self, run_dir: Path, cfg=None):
        SummaryWriter = self.require()
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.done = 0

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("dev_") else f"train/{key}",
                                           value, row["step"])
        self.done = len(state.history)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
