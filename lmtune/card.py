"""The model card (RUN_DIR/model/README.md) in the Hugging Face Hub's format, rendered from
results.json and the model's metadata, like report.md; written again whenever results.json changes.

The YAML header is made by huggingface_hub's own ModelCardData / EvalResult, so the Hub reads the
metrics as a model-index (metric types are Hub metric ids, the averaging in the name and args; the
dataset is named after the data, the license after the base model's own card); the body says how to
use it (transformers.pipeline and lmtune), what the model is for, what it was trained on and how, how
good it is, which output controls it applies, and what the audit and diagnosis found. No training
text is quoted: a card is meant to be published.
"""
from __future__ import annotations

import math
from pathlib import Path

from lmtune.artifacts import RunDir, read_meta
from lmtune.fold import pipeline_reproduces_lmtune
from lmtune.io import write_text
from lmtune.peft import is_adapter_dir
from lmtune.tasks import get_task


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "n"}


def _hub_id(name: str) -> str | None:
    """A base model named as a Hub repo id (org/name), not a local folder."""
    return name if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/")) else None


# lmtune's metric keys as the Hub's metric ids (the `evaluate` library's names), the averaging in the
# name and args: a Hub reader groups and compares results by type, so macro F1 is type f1
HUB_METRICS: dict[str, tuple[str, str, dict | None]] = {
    "accuracy": ("accuracy", "accuracy", None),
    "subset_accuracy": ("accuracy", "subset accuracy", None),
    "macro_f1": ("f1", "macro F1", {"average": "macro"}),
    "micro_f1": ("f1", "micro F1", {"average": "micro"}),
    "samples_f1": ("f1", "samples F1", {"average": "samples"}),
    "samples_jaccard": ("jaccard", "samples Jaccard", {"average": "samples"}),
    "official_macro_f1": ("f1", "official macro F1 (SemEval scorer)", {"average": "macro"}),
    "f1": ("f1", "F1", None),
    "precision": ("precision", "precision", None),
    "recall": ("recall", "recall", None),
    "exact_match": ("exact_match", "exact match", None),
    "spearman": ("spearmanr", "Spearman correlation", None),
    "pearson": ("pearsonr", "Pearson correlation", None),
    "mae": ("mae", "mean absolute error", None),
    "rmse": ("mse", "root mean squared error", {"squared": False}),
    "perplexity": ("perplexity", "perplexity", None),
    "rougeL": ("rouge", "ROUGE-L", {"rouge_types": ["rougeL"]}),
    "rouge1": ("rouge", "ROUGE-1", {"rouge_types": ["rouge1"]}),
    "rouge2": ("rouge", "ROUGE-2", {"rouge_types": ["rouge2"]}),
    "ndcg_10": ("ndcg_at_10", "nDCG@10", None),
    "mrr_10": ("mrr_at_10", "MRR@10", None),
    "recall_1": ("recall_at_1", "recall@1", None),
    "recall_5": ("recall_at_5", "recall@5", None),
    "recall_10": ("recall_at_10", "recall@10", None),
}
NER_METRICS = {"f1": ("seqeval", "entity F1 (seqeval, strict)", None),
               "precision": ("seqeval", "entity precision (seqeval, strict)", None),
               "recall": ("seqeval", "entity recall (seqeval, strict)", None)}
SPLIT_WORDS = {"train", "training", "dev", "valid", "validation", "val", "test", "testing", "data", "splits", "eval"}


def dataset_name(source: str | None) -> str:
    """What the data is called, as the card names it: a Hub dataset's id; a saved `datasets` folder's
    own name (its dataset_info.json's dataset_name, else the folder); a file's name. A split's name
    (train/, validation.parquet, data/test.csv) is not the dataset's: the first folder above it that
    is not one names it."""
    if not source:
        return "local data"
    s = str(source)
    if s.startswith("hub:"):
        return s.split(":", 3)[1]
    if s.startswith("memory:"):
        return "in-memory dataset"
    p = Path(s)
    info = p / "dataset_info.json"
    if p.is_dir() and info.is_file():
        import json
        try:
            named = json.loads(info.read_text()).get("dataset_name")
        except (OSError, ValueError):
            named = None
        if named and named not in SPLIT_WORDS:
            return str(named)
    parts = [p.stem if not p.is_dir() else p.name, *(q.name for q in p.parents)]
    return next((x for x in parts if x and x.lower() not in SPLIT_WORDS), p.stem or "local data")


def base_license(model: str) -> tuple[str | None, str | None]:
    """The base model's license (and license_name, for 'other') from its own card: the README.md of a
    local folder, of the packaged copy, or of the Hub cache; (None, None) where none is known."""
    from huggingface_hub import ModelCard
    readme = None
    try:
        from lmtune.models import resolve_model
        folder = Path(resolve_model(model))
        readme = folder / "README.md" if (folder / "README.md").is_file() else None
    except Exception:  # an unresolvable name: no card to read, and the card is still written
        folder = None
    if readme is None and _hub_id(model):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None, None
    try:
        data = ModelCard.load(readme).data
    except Exception:  # a card the Hub's parser refuses: the license is unknown, not an error of this run
        return None, None
    license_, name = getattr(data, "license", None), getattr(data, "license_name", None)
    if isinstance(license_, list):
        license_ = license_[0] if license_ else None
    if license_ == "other" and not name:
        return None, None  # 'other' without its name tells a reader nothing
    return license_, name


def card_data(results: dict, meta: dict, pipeline: str):
    from huggingface_hub import EvalResult, ModelCardData
    cfg, summary = meta["config"], results["summary"]
    data = cfg.get("data", {})
    dataset = data.get("hub") or dataset_name(data.get("train") or data.get("test"))
    names = NER_METRICS if summary["task"] == "ner" else {}
    evals = []
    for split in ("test", "dev"):
        test_source = data.get(split) if split == "test" else data.get("dev")
        split_dataset = data.get("hub") or (dataset_name(test_source) if test_source else dataset)
        for key, value in _numbers(results["metrics"].get(split, {})).items():
            hub = names.get(key) or HUB_METRICS.get(key)
            if key not in results["headline"] or key == "loss" or hub is None:
                continue
            evals.append(EvalResult(task_type=pipeline, dataset_type=split_dataset, dataset_name=split_dataset,
                                    dataset_split=split, metric_type=hub[0], metric_value=value,
                                    metric_name=f"{split} {hub[1]}", metric_args=hub[2]))
    license_, license_name = base_license(summary["model"])
    return ModelCardData(base_model=_hub_id(summary["model"]), license=license_,
                         **({"license_name": license_name} if license_name else {}), library_name="transformers",
                         pipeline_tag=pipeline, tags=["lmtune", summary["task"], *([summary["peft_method"]]
                                                                                   if summary["peft_method"] != "none" else [])],
                         datasets=[data["hub"]] if data.get("hub") else None, model_name=summary["run_name"],
                         eval_results=evals or None)


def usage(pipeline: str, repo_id: str | None, reads_pairs: bool = False, adapter: bool = False,
          task_kind: str = "text-classification", same_probabilities: bool = False, loadable: bool = True) -> list[str]:
    """The card's "How to use": transformers.pipeline on the folder (saying the probabilities are lmtune's only
    where they are: lmtune.fold.pipeline_reproduces_lmtune) and lmtune.load with its output controls."""
    where = repo_id or "path/to/model"
    example = ('{"text": "first sentence", "text_pair": "second sentence"}' if reads_pairs
               else 'question="What is asked?", context="The text that answers it."' if pipeline == "question-answering"
               else '"an example text"')
    # every class's probability; a regression head's value as it is (the pipeline's default for one output
    # is a sigmoid)
    kw = {"text-classification": ", top_k=None", "regression": ', function_to_apply="none"'}.get(task_kind, "")
    merged = (" This folder holds a PEFT adapter: transformers reads its labels only from a merged model, so merge it "
              "first (`lmtune merge RUN_DIR MERGED_DIR`) and give the pipeline MERGED_DIR." if adapter else "")
    lines = ["## How to use", ""]
    # retrieval has no transformers pipeline, and a relation model's entity-marker head is lmtune's own
    if pipeline != "sentence-similarity" and task_kind != "relation" and loadable:
        same = (" (the probabilities are the ones lmtune reports: the calibration temperature is folded into the "
                "weights)" if same_probabilities else "")
        lines += [f"With transformers{same}.{merged}", "", "```python", "from transformers import pipeline", "",
                  f'model = pipeline("{pipeline}", model="{where}"{kw})', f"print(model({example}))", "```", ""]
    lines += ["With lmtune (adds what lmtune.json holds beyond the weights: abstention, thresholds, explanations, "
              "serving):", "", "```python", "import lmtune"]
    if repo_id:
        lines += ["from huggingface_hub import snapshot_download", "",
                  f'snapshot_download("{repo_id}", local_dir="run/model")  # lmtune.load opens a run folder holding model/',
                  'run = lmtune.load("run")']
    else:
        lines += ["", 'run = lmtune.load("path/to/run")  # the run folder that holds model/']
    texts = '[("first sentence", "second sentence")]' if reads_pairs else '["an example text"]'
    lines += [f"print(run.predict({texts}))", "```", "", "Or from the shell: `lmtune predict path/to/run --text "
              "\"an example text\"`, and `lmtune serve path/to/run` for an HTTP service.", ""]
    return lines


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


def _calibration(results: dict) -> list[str]:
    """What calibration did (applied or skipped, with the held-out dev ECE), as results.json records it."""
    c = results.get("task_report", {}).get("calibration") or {}
    if "decision" not in c:
        return []
    return [f"Calibration: {c['decision']} ({c.get('method', 'held-out dev')})"
            + ("; the temperature is folded into the weights." if c.get("folded") else "."), ""]


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


def render_card(run_dir: str | Path, results: dict, repo_id: str | None = None, dest: Path | None = None) -> Path:
    """RUN_DIR/model/README.md (or `dest`); repo_id: the Hub repo the card's snippets load from (push
    renders the card again with it)."""
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
        *usage(task.hub_pipeline, repo_id, bool(cfg.get("data", {}).get("text_pair_column")), is_adapter_dir(rd.model),
               {"regression": "regression", "relation": "relation"}.get(task.name, task.hub_pipeline),
               pipeline_reproduces_lmtune(rd.model), task.hub_loadable),
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
        "## Output controls (calibration and abstention)", "", *_calibration(results), *_controls(meta.get("task_state", {})), "",
        *(["## Robustness", "", *_robustness(results["robustness"]), ""] if results.get("robustness") else []),
        "## Limitations", "", *_limitations(results), "",
    ]
    from huggingface_hub import ModelCard
    text = f"---\n{card_data(results, meta, task.hub_pipeline).to_yaml()}\n---\n\n" + "\n".join(body)
    ModelCard(text)  # parse what we wrote: a card the Hub cannot read is an error here, not after upload
    write_text(dest or rd.card, text)
    return dest or rd.card

