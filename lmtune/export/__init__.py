"""Exports of a finished run (lmtune export --format NAME): the formats are the `exporters` registry's
entries (lmtune/registrations.py), each declaring its --quantize values, its other options and its tasks."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lmtune.errors import InputError
from lmtune.registry import exporters


def check_request(format: str, run_dir: str | Path, quantize: str | None = None, options: Iterable[str] = ()) -> None:
    """Refuse, before anything is loaded or written, what the format does not declare: an unknown format, a
    --quantize value or an option it lacks, a run of a task it does not serve."""
    exporters.check(format)
    declared = exporters.meta(format, "quantize", ())
    if quantize is not None and quantize not in declared:
        raise InputError(f"export: --format {format} has no --quantize {quantize!r}; choose from {', '.join(declared)}.")
    takes = exporters.meta(format, "options", ())
    if unknown := [o for o in options if o not in takes]:
        flags = ", ".join("--" + o.replace("_", "-") for o in unknown)
        raise InputError(f"export: --format {format} does not take {flags}"
                         + (f" (it takes {', '.join('--' + o.replace('_', '-') for o in takes)})." if takes else "."))
    tasks, refused = exporters.meta(format, "tasks"), exporters.meta(format, "refuses", {})
    if tasks is None and not refused:
        return
    from lmtune.artifacts import RunDir, read_meta
    rd = RunDir(run_dir)
    if not rd.finished():
        return  # the export itself says what is missing
    task = read_meta(rd.model).get("task")
    if tasks is not None and task not in tasks:
        raise InputError(f"export: --format {format} supports {exporters.meta(format, 'supports') or ', '.join(tasks)}; "
                         f"{rd.root} is a {task} run.")
    from lmtune.tasks import get_task
    for capability, instead in refused.items():
        if task and capability in get_task(task).capabilities:
            raise InputError(f"export: --format {format} does not serve {task} runs: {instead}")


def merged_model(run, fmt: str):
    """The run's model on CPU in eval mode with its adapter folded into the weights (one file that stands
    alone); a PEFT method whose virtual tokens cannot be folded (prefix, prompt) is refused, naming `fmt`."""
    from lmtune.peft import is_peft, merge, mergeable
    model = run.model.cpu().eval()
    method = run.config.peft.method
    if is_peft(model):
        if method not in mergeable():
            raise InputError(f"export: a {method} run adds virtual tokens that cannot be folded into {fmt}; "
                             f"export works for full fine-tuning and {', '.join(mergeable())} runs.")
        model = merge(model, method).eval()
    return model
