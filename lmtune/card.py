"""The model card (RUN_DIR/model/README.md) in the Hugging Face Hub's format, rendered from
results.json and the model's metadata, like report.md; written again whenever results.json changes.

The YAML header is made by huggingface_hub's own ModelCardData / EvalResult, so the Hub reads the
metrics as a model-index; the body says what the model is for, what it was trained on and how, how
good it is, which output controls it applies, and what the audit and diagnosis found. No training
text is quoted: a card is meant to be published.
"""
from __future__ import annotations

import math
from pathlib import Path

from lmtune.artifacts import RunDir, read_meta
from lmtune.io import write_text
from lmtune.tasks import get_task


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "n"}


def _hub_id(name: str) -> str | None:
    """A base model named as a Hub repo id (org/name), not a local folder."""
    return name if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/")) else None


def card_data(results: dict, meta: dict, pipeline: str):
    from huggingface_hub import EvalResult, ModelCardData
    cfg, summary = meta["config"], results["summary"]
    data = cfg.get("data", {})
    dataset = data.get("hub") or Path(str(data.get("train") or data.get("test") or "local data")).stem
    evals = [EvalResult(task_type=pipeline, dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                        metric_type=key, metric_value=value, metric_name=f"{split} {key}")
             for split in ("test", "dev") for key, value in _numbers(results["metrics"].get(split, {})).items()
             if key in results["headline"] and key != "loss"]
    return ModelCardData(base_model=_hub_id(summary["model"]), license="other", library_name="transformers",
                         pipeline_tag=pipeline, tags=["lmtune", summary["task"], *([summary["peft_method"]]
                                                                                   if summary["peft_method"] != "none" else [])],
                         datasets=[data["hub"]] if data.get("hub") else None, model_name=summary["run_name"],
                         eval_results=evals or None)


def _table(results: dict) -> list[str]:
    headline = [k for k in results["headline"] if k != "loss"]
    lines = ["| split | " + " | ".join(headline) + " | examples |", "|---|" + "---|" * (len(headline) + 1)]
    for split, m in results["metrics"].items():
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, ""))
                                                  for k in headline) + f" | {m.get('n', '')} |")
    return lines


def _controls(task_state: dict) -> list[str]:
    shown = {k: v for k, v in task_state.items() if isinstance(v, (int, float, str, bool)) and v is not None}
    if not shown:
        return ["None beyond the model's own outputs."]
    return [f"- `{k}`: {v:.4g}" if isinstance(v, float) else f"- `{k}`: {v}" for k, v in shown.items()]


def _robustness(rob: dict) -> list[str]:
    metric = rob["metric"]
    lines = [f"Attacked on {rob.get('n', 'the dev')} examples; clean {metric} {rob['clean'][metric]:.4f}.", "",
             f"| attack | {metric} |", "|---|---|"]
    lines += [f"| {name} | {a[metric]:.4f} |" for name, a in rob["attacks"].items() if metric in a]
    return lines


def _limitations(results: dict) -> list[str]:
    found = [f"- data audit, {f['check']} ({f['severity']}): {f['detail']}" for f in results.get("audit", [])
             if f["severity"] != "info"]
    found += [f"- fit diagnosis, {f['kind']} ({f['severity']}): {f['evidence']}" for f in results.get("diagnosis", [])]
    return found or ["- The data audit and the fit diagnosis found nothing above info level. The figures hold for data "
                     "like the test split only."]


def render_card(run_dir: str | Path, results: dict) -> Path:
    rd = RunDir(run_dir)
    meta = read_meta(rd.model)
    task = get_task(meta["task"])
    s, cfg = results["summary"], meta["config"]
    train = cfg.get("train", {})
    labels = s["labels"]
    body = [
        f"# {s['run_name']}", "",
        f"A {s['task']} model fine-tuned from `{s['model']}` with [lmtune](https://pypi.org/project/lmtune/).", "",
        "## Intended use", "",
        f"{task.hub_pipeline.replace('-', ' ').capitalize()} over texts like its training data"
        + (f", with the labels: {', '.join(labels[:30])}{' ...' if len(labels) > 30 else ''}." if labels else "."),
        "Outside that domain its scores are not evidence of quality; check on your own labeled sample first.", "",
        "## Training data", "",
        "Examples: " + ", ".join(f"{k} {v}" for k, v in s["sizes"].items())
        + f"; longer than max_length {s['max_length']}: "
        + ", ".join(f"{k} {v['truncated']}/{v['examples']}" for k, v in s["truncation"].items()) + ".", "",
        "## Training recipe", "",
        f"- {s['peft_method'] if s['peft_method'] != 'none' else 'full fine-tuning'}, trainable parameters "
        f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_pct']:.2f}%)",
        f"- AdamW, learning rates encoder {s['lr']:.2g} / head {s['head_lr']:.2g}, epochs {train.get('epochs')}, "
        f"batch size {train.get('batch_size')}, seed {train.get('seed')}",
        f"- {s['steps']} steps, stopped: {s['stop_reason']}; best checkpoint step {s['best_step']} "
        f"(dev {results['metric']} {s['best_metric']:.4f}) restored",
        "",
        "## Evaluation", "", *_table(results), "",
        "## Output controls (calibration and abstention)", "", *_controls(meta.get("task_state", {})), "",
        *(["## Robustness", "", *_robustness(results["robustness"]), ""] if results.get("robustness") else []),
        "## Limitations", "", *_limitations(results), "",
    ]
    from huggingface_hub import ModelCard
    text = f"---\n{card_data(results, meta, task.hub_pipeline).to_yaml()}\n---\n\n" + "\n".join(body)
    ModelCard(text)  # parse what we wrote: a card the Hub cannot read is an error here, not after upload
    write_text(rd.card, text)
    return rd.card

