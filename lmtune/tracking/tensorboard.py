"""TensorBoard tracker: history rows as scalars (train/*, dev/*), the final metrics as final/*, the
resolved config and the run's sizes as an HParams session whose metrics are those final/* scalars
(so the HParams dashboard tables and compares runs), and the run's plots (learning curve, confusion
matrices, reliability diagram) as images under plots/*.

The HParams records are built with tensorboard's own hparams plugin API (summary_v2, the module behind
hparams.api, whose protobuf writers need no TensorFlow) and written into the same event file as the scalars, so a run folder is
one TensorBoard run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.errors import InputError
from lmtune.tracking import Tracker, final_metrics, flat_config, run_facts, step_metrics


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
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.hparams = hparam_values(flat_config(cfg)) if cfg is not None else {}
        self.done = 0

    def __call__(self, state) -> None:
        for row in state.history[self.done:]:
            for key, value in step_metrics(row).items():
                self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("dev_") else f"train/{key}", value, row["step"])
        self.done = len(state.history)
        self.writer.flush()

    def finish(self, results: dict, files: list[Path]) -> None:
        step = results.get("summary", {}).get("steps", 0)
        final = {f"final/{key}": value for key, value in final_metrics(results).items()}
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        sizes, _ = run_facts(results)
        self._write_hparams({**self.hparams, **hparam_values(sizes)}, list(final), self.run_dir.name)
        for png in (f for f in files if f.suffix == ".png" and f.is_file()):
            self.writer.add_image(f"plots/{png.stem}", read_png(png), step, dataformats="HWC")
        self.writer.flush()

    def _write_hparams(self, hparams: dict[str, Any], metric_tags: list[str], trial: str) -> None:
        """The experiment (which hparams and metrics exist), then this run's session with its values."""
        from tensorboard.plugins.hparams import summary_v2  # hparams.api also imports Keras (TensorFlow); this does not
        config = summary_v2.hparams_config_pb([summary_v2.HParam(k) for k in hparams], [summary_v2.Metric(t) for t in metric_tags])
        session = summary_v2.hparams_pb(hparams, trial_id=trial)
        for pb in (config, session):
            self.writer.file_writer.add_summary(pb)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def hparam_values(values: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """What an HParams value may be (bool, number, text): lists and mappings as their text, None as "none"."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else "none" if value is None else str(value)
    return out


def read_png(path: Path) -> Any:
    """A plot as an RGB array (height, width, 3) for add_image."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
