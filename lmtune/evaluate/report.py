"""report.md: what was run, on what data, how it went, and how good the model is."""
from __future__ import annotations

from pathlib import Path

from lmtune.evaluate import plots
from lmtune.io import write_text


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def prf_table(first: str, rows: dict[str, dict], marks: dict[str, str] | None = None) -> list[str]:
    """Markdown table of precision / recall / F1 / support (sklearn and seqeval report dicts)."""
    lines = [f"| {first} | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in rows.items():
        lines.append(f"| {name}{(marks or {}).get(name, '')} | {c['precision']:.3f} | {c['recall']:.3f} | "
                     f"{c['f1-score']:.3f} | {int(c['support'])} |")
    return lines


def write_report(run_dir: Path, summary: dict, split_metrics: dict[str, dict], history: list[dict],
                 metric: str, task_section: str, headline: tuple[str, ...]) -> Path:
    plots.learning_curve(history, metric, run_dir / "learning_curve.png")
    lines = [f"# lmtune report: {summary['run_name']}", "",
             f"- task: **{summary['task']}**, model: `{summary['model']}`",
             f"- data: {summary['data']}",
             "- examples: " + ", ".join(f"{k} {v}" for k, v in summary["sizes"].items()),
             f"- labels ({len(summary['labels'])}): {', '.join(summary['labels'])}",
             f"- truncated to max_length {summary['max_length']}: " + ", ".join(
                 f"{k} {v['truncated']}/{v['examples']}" for k, v in summary["truncation"].items()),
             f"- learning rates: encoder {summary['lr']:.2g}, head {summary['head_lr']:.2g}",
             f"- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} "
             f"({summary['trainable_pct']:.2f}%, method: {summary['peft_method']}); model artifact "
             f"{summary['artifact_mb']:.1f} MB; peak memory {summary['peak_mem_mb']:.0f} MB "
             f"(+{summary['peak_mem_increase_mb']:.0f} MB during training); "
             f"{summary['seconds_per_epoch']:.1f} s per epoch",
             f"- training: {summary['steps']} steps in {summary['train_seconds']:.1f}s (dev evaluation "
             f"{summary['eval_seconds']:.1f}s, checkpoints {summary['checkpoint_seconds']:.1f}s); stopped: {summary['stop_reason']}",
             f"- best checkpoint: step {summary['best_step']} (dev {metric} {_fmt(summary['best_metric'])}), restored",
             *([f"- AdaLoRA final ranks: {summary['rank_pattern']}"] if summary.get("rank_pattern") else []),
             "", "## Results", "", "| split | " + " | ".join(headline) + " | examples |",
             "|---|" + "---|" * (len(headline) + 1)]
    for split, m in split_metrics.items():
        lines.append(f"| {split} | " + " | ".join(_fmt(m.get(k, "")) for k in headline) + f" | {m.get('n', '')} |")
    lines += ["", "## Learning curve", "", "![learning curve](learning_curve.png)", "", task_section]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
