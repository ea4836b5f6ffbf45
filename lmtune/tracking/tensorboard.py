"""TensorBoard tracker: history rows as scalars (train/*, dev/*), the final metrics as final/*."""
from __future__ import annotations

from pathlib import Path

from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, step_metrics


class TensorBoardLogger(Tracker):
    @staticmethod
    def require():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("train.trackers: tensorboard needs the tensorboard package. "
                             "pip install 'lmtune[track]', or leave tensorboard out of train.trackers.") from None
        return SummaryWriter

    def __init__(self, run_dir: Path, cfg=None):
        SummaryWriter = self.require()
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.done = 0

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            for key, value in step_metrics(row).items():
                self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("dev_") else f"train/{key}", value, row["step"])
        self.done = len(state.history)
        self.writer.flush()

    def finish(self, results: dict, files: list[Path]) -> None:
        step = results.get("summary", {}).get("steps", 0)
        for key, value in final_metrics(results).items():
            self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()
