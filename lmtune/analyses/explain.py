"""explain: which words drive each label, coloured examples, and how faithful the attributions are
(lmtune.explain); `lmtune explain RUN_DIR` writes RUN_DIR/explain.json and the Explanations section of
report.md. With --text / --input the command prints predictions with word attributions instead.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmtune.analysis import Analysis, Param, examples_of
from lmtune.errors import InputError
from lmtune.registry import backends


def explain(run: Any, data: str | Path | None = None, max_examples: int = 300, method: str = "auto", steps: int = 32,
            share: float = 0.2) -> dict:
    """Explain a labeled file (default: the run's test split): per-class words, example explanations and
    their faithfulness."""
    from lmtune.explain import analyse
    examples = examples_of(run, data, "test")
    return analyse(run, examples, str(data) if data else "test", max_examples, method, steps, share,
                   progress=run.config.train.progress)


def explained_chunks(run: Any, texts: list | None, path: str | None, label: str | None = None, method: str = "auto",
                     steps: int = 32) -> Iterator[list[dict]]:
    """Explained prediction rows of texts, or of a file (read and checked whole first), 64 rows at a time."""
    if texts:
        yield run.explain(texts, label, method, steps)
        return
    examples = run.task.read_file(path, run.config, run.labels, False)
    for i in range(0, len(examples), 64):
        yield run.explain_examples(examples[i:i + 64], label, method, steps)


def attributions_mode(load: Callable[[], Any], o: dict) -> int | None:
    """`lmtune explain RUN_DIR --text/--input`: predictions with word attributions as JSONL, no analysis."""
    if o["text"] and (o["input"] or o["data"]):
        raise InputError("explain: give --text TEXT (repeatable) or --input FILE, or neither to explain the run's test split.")
    if o["pair"] and len(o["pair"]) != len(o["text"] or []):
        raise InputError(f"explain: {len(o['pair'])} --pair for {len(o['text'] or [])} --text; give one --pair after each --text.")
    if not (o["text"] or o["input"]):
        return None
    run = load()
    texts = list(zip(o["text"], o["pair"])) if o["pair"] else o["text"]
    for rows in explained_chunks(run, texts, o["input"], o["label"], o["method"], o["steps"]):
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return 0


def section(result: dict, run_dir: Path | None = None) -> str:
    """The Explanations section of report.md (and explanations.png when run_dir is given)."""
    f = result["faithfulness"]
    main = result["method"]
    lines = ["## Explanations", "",
             f"{result['n']} examples of {result['data']} explained by "
             + ("Integrated Gradients on the embeddings" + f" ({result['steps']} steps)" if main == "ig" else "occlusion (word removal)")
             + f", {result['seconds_per_example']:.3f} s each. Attributions are of the predicted label's log-odds; positive "
               "words push towards it.", ""]
    if f is None:
        lines += ["Explanations are per entity (of its first word's tag); faithfulness (word removal) is measured for "
                  "whole-text predictions only.", ""]
    else:
        lines += [f"Faithfulness at the top {100 * f['share']:.0f}% of words (ERASER; higher comprehensiveness and lower "
                  "sufficiency mean the highlighted words are what the model uses):", "",
                  "| words chosen by | comprehensiveness | sufficiency |", "|---|---|---|"]
        for name in (main, "attention", "random"):
            if name in f:
                lines.append(f"| {name} | {f[name]['comprehensiveness']} | {f[name]['sufficiency']} |")
        if main in f and "random" in f and f[main]["comprehensiveness"] is not None:
            rnd = f["random"]["comprehensiveness"]
            ratio = f[main]["comprehensiveness"] / rnd if rnd else math.inf
            verdict = "trust the colours" if ratio >= 2 else "treat the colours with caution: they are not far from random words"
            lines += ["", f"Removing the top words hurts {ratio:.1f}x as much as removing random ones: {verdict}."]
        lines.append("")
    lines += ["Words that drive each label (mean attribution, times seen):", ""]
    for label, words in result["class_words"].items():
        lines.append(f"- **{label}**: " + ", ".join(f"{w} ({m:+.3g}, {n})" for w, m, n in words))
    lines.append("")
    for name, exs in result["examples"].items():
        if exs:
            lines += [f"**{name.capitalize()}**:", ""]
            for e in exs:
                lines.append("- " + marked(e) + f" → {e.get('label', e.get('value'))}"
                             + (f" (gold {e['gold']})" if "gold" in e else "") + (f", p {e['score']:.3f}" if "score" in e else ""))
            lines.append("")
    if run_dir is not None and any(result["examples"].values()):
        attribution_figure(result["examples"], run_dir / "explanations.png")
        lines += ["![explanations](explanations.png)", ""]
    return "\n".join(lines)


def marked(example: dict) -> str:
    """The text with its two most positive words in bold and its most negative in italics."""
    words = example["attributions"]
    order = sorted(range(len(words)), key=lambda i: -words[i][1])
    strong, weak = set(order[:2]), {order[-1]} if len(order) > 2 and words[order[-1]][1] < 0 else set()
    return " ".join(f"**{w}**" if i in strong else f"_{w}_" if i in weak else w for i, (w, _) in enumerate(words))


def attribution_figure(examples: dict[str, list[dict]], path: Path, max_words: int = 40) -> None:
    """Words on coloured boxes (green towards the label, red against), one line per example."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = [(name, e) for name, exs in examples.items() for e in exs]
    fig = plt.figure(figsize=(12, 0.5 * len(items) + 0.6))
    renderer = fig.canvas.get_renderer()
    height = 1 / (len(items) + 1)
    for row, (name, e) in enumerate(items):
        y = 1 - (row + 1) * height
        words = e["attributions"][:max_words]
        top = max((abs(a) for _, a in words), default=1.0) or 1.0
        x = fig.text(0.005, y, f"{name} → {e.get('label', e.get('value'))}:", fontsize=8, weight="bold")
        pos = x.get_window_extent(renderer).x1 / fig.bbox.width + 0.01
        for w, a in words:
            c = (0.2, 0.7, 0.3, min(abs(a) / top, 1.0)) if a >= 0 else (0.85, 0.2, 0.2, min(abs(a) / top, 1.0))
            t = fig.text(pos, y, w, fontsize=8, bbox={"facecolor": c, "edgecolor": "none", "pad": 1.5})
            pos = t.get_window_extent(renderer).x1 / fig.bbox.width + 0.004
            if pos > 0.97:
                break
    from lmtune.evaluate.plots import save_figure
    save_figure(fig, path)


ANALYSIS = Analysis(
    section, explain, in_report=lambda result, run_dir, doc: section(result, run_dir), command_mode=attributions_mode,
    help="which words drove a prediction (Integrated Gradients), and how faithful that is",
    description="With --text/--input: predictions with word attributions as JSONL. Without: explains the "
                "run's test split (or --data FILE): the words that drive each label, coloured examples, "
                "and faithfulness (comprehensiveness / sufficiency vs random words and attention); writes "
                "RUN_DIR/explain.json and an Explanations section in report.md.",
    params=(Param("text", repeat=True, help="a text to explain (repeatable)", command_only=True),
            Param("pair", repeat=True, help="the second text of the pair, for a model trained on pairs (one per --text)",
                  command_only=True),
            Param("input", help="file with the run's columns: every row explained (JSONL out)", command_only=True),
            Param("data", help="labeled file to analyse instead of the run's test split"),
            Param("label", help="explain this label instead of the predicted one", command_only=True),
            Param("method", default="auto", choices=("auto", "ig", "occlusion"),
                  help="auto: Integrated Gradients on the torch backend, occlusion (word removal) on ONNX"),
            Param("backend", default="torch", choices=tuple(backends.names()), command_only=True),
            Param("steps", int, 32, "Integrated Gradients steps"),
            Param("max_examples", int, 300, "examples analysed (a seeded sample)"),
            Param("share", float, 0.2, "share of top words for the faithfulness measures"),
            Param("json", bool, help="print the whole analysis as JSON", command_only=True)))
