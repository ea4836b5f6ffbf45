"""Optional TensorBoard logging, as a loop callback: writes history rows not yet written."""
from __future__ import annotations

from pathlib import Path

from lmtune.errors import InputError


def require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("train.tensorboard: the tensorboard package is not installed. "
                         "pip install 'lmtune[tensorboard]', or set train.tensorboard false.") from None
    return SummaryWriter


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        SummaryWriter = require_tensorboard()
        self.writer = SummaryWriter(log_dir=str(log_dir))
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
