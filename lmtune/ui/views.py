"""What the dashboard's pages show, as data read from the run directories (results.json, metrics.json,
history.jsonl, config.yaml, predictions), never from report.md; and the SVG charts drawn from it.

Charts are SVG written here rather than a JavaScript charting library: the page must work offline with
nothing fetched from a CDN, and SVG <title> elements give hover values with no script at all.
"""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path


from lmtune.artifacts import RunDir
from lmtune.runs import compare, list_runs

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def runs_table(root: Path) -> list[dict]:
    """Every run under root, newest first, with its headline metrics and duration."""
    return sorted(list_runs(root), key=lambda r: r["date"], reverse=True) if root.is_dir() else []


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def history(rd: RunDir) -> list[dict]:
    path = rd.history if rd.history.is_file() else rd.events  # events.jsonl: the rows so far of a run still training
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written while the run is in progress
            continue
    return rows


def curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """train loss per step, and each dev metric at its evaluations: name -> [(step, value)]."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if (k == "train_loss" or k.startswith("dev_")) and isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def run_details(root: Path, name: str) -> dict:
    """Everything the run page shows."""
    rd = RunDir(root / name)
    results = _read_json(rd.root / "results.json", {})
    metrics = results.get("metrics") or {k: v for k, v in _read_json(rd.metrics, {}).items() if k in ("dev", "test")}
    meta = _read_json(rd.model_meta, {})
    labels = meta.get("labels") or results.get("summary", {}).get("labels") or []
    test_rows = []
    if rd.predictions("test").is_file():
        with open(rd.predictions("test"), encoding="utf-8") as fh:
            for line in fh:
                test_rows.append(json.loads(line))
                if len(test_rows) >= 50:
                    break
    noise = []
    noise_file = rd.root / "label_noise.jsonl"
    if noise_file.is_file():
        noise = [json.loads(x) for x in noise_file.read_text().splitlines()[:200] if x.strip()]
    return {"name": name, "config": rd.config.read_text() if rd.config.is_file() else "", "results": results,
            "metrics": metrics, "labels": labels, "task": meta.get("task") or results.get("summary", {}).get("task", "?"),
            "history": history(rd), "finished": rd.finished(), "running": rd.running(), "test_rows": test_rows, "label_noise": noise,
            "export": _read_json(rd.export / "export.json", None)}


def compare_runs(root: Path, names: list[str]) -> dict:
    """Config differences of the first run against each other one (lmtune.runs.compare, which reads each run
    once), and their curves; the metrics table with its B - A columns is ui.analysis.compare_table."""
    pairs = [compare(root / names[0], root / n) for n in names[1:]]
    config: dict[str, list] = {}
    for k in sorted({k for p in pairs for k in p["config"]}):
        first = next(p["config"][k][0] for p in pairs if k in p["config"])
        config[k] = [first] + [p["config"][k][1] if k in p["config"] else first for p in pairs]
    return {"names": names, "config": config,
            "curves": {n: curves(history(RunDir(root / n))) for n in names}}


# ---- SVG ------------------------------------------------------------------------------------------
def line_chart(series: dict[str, list[tuple[float, float]]], title: str, width: int = 640, height: int = 260) -> str:
    """A line chart of named (x, y) series; every point has a <title> (hover shows its value)."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f'<p class="muted">{escape(title)}: no data yet</p>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    # one step or one value: widen the range on both sides, so a lone point sits inside the plot, not on the axes
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x0 + 1)
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - abs(y0) * 0.1 - 1e-3, y0 + abs(y0) * 0.1 + 1e-3)
    left, right, top, bottom = 48, 130, 22, 28
    w, h = width - left - right, height - top - bottom

    inset = 6  # points at the ends of the range are drawn clear of the axes, where they would be hidden

    def sx(x: float) -> float:
        return left + inset + (x - x0) / (x1 - x0) * (w - 2 * inset)

    def sy(y: float) -> float:
        return top + inset + (1 - (y - y0) / (y1 - y0)) * (h - 2 * inset)

    out = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
           f'<text x="{left}" y="14" class="chart-title">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" class="axis"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" class="axis"/>',
           f'<text x="{left - 4}" y="{top + 4}" class="tick" text-anchor="end">{y1:.3g}</text>',
           f'<text x="{left - 4}" y="{top + h}" class="tick" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{left}" y="{height - 8}" class="tick">step {x0:.0f}</text>',
           f'<text x="{left + w}" y="{height - 8}" class="tick" text-anchor="end">{x1:.0f}</text>']
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(s))
        out.append(f'<g class="series-group" data-name="{escape(name)}">')  # a legend click shows or hides it (compare.js)
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5" class="series" data-name="{escape(name)}"/>')
        step = max(1, len(s) // 60)  # at most ~60 hover points per series
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}" class="point"><title>{escape(name)} '
                f'step {x:.0f}: {y:.4g}</title></circle>' for x, y in s[::step] + ([s[-1]] if (len(s) - 1) % step else [])]
        out.append("</g>")
        out.append(f'<text x="{left + w + 8}" y="{top + 12 + 14 * i}" fill="{color}" class="legend" data-name="{escape(name)}">'
                   f'{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def confusion_table(matrix: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as a shaded HTML table (rows: gold, columns: predicted)."""
    if not matrix:
        return ""
    top = max(max(r) for r in matrix) or 1
    head = "".join(f"<th>{escape(lab)}</th>" for lab in labels)
    rows = []
    for lab, r in zip(labels, matrix):
        cells = "".join(f'<td style="background: rgba(31,119,180,{v / top:.2f})" title="gold {escape(lab)}, predicted '
                        f'{escape(labels[j])}: {v}">{v}</td>' for j, v in enumerate(r))
        rows.append(f"<tr><th>{escape(lab)}</th>{cells}</tr>")
    return (f'<table class="confusion" id="confusion-matrix"><tr><th>gold \\ predicted</th>{head}</tr>'
            + "".join(rows) + "</table>")


def tagged_html(tokens: list[str], tags: list[str], gold: list[str] | None) -> str:
    """Tokens with predicted entity words marked (type below) and gold entity words underlined; a word the
    model missed or typed wrongly is outlined in red."""
    out = []
    for i, tok in enumerate(tokens):
        p = tags[i].split("-", 1)[-1] if i < len(tags) and tags[i] != "O" else None
        g = gold[i].split("-", 1)[-1] if gold and i < len(gold) and gold[i] != "O" else None
        cls = " ".join(c for c, on in (("ent", p), ("gold", g), ("wrong", p != g)) if on)
        title = f"predicted {p or 'O'}, gold {g or 'O'}" if gold else f"predicted {p or 'O'}"
        body = escape(tok) + (f"<sub>{escape(p)}</sub>" if p else "")
        out.append(f'<mark class="{cls}" title="{escape(title)}">{body}</mark>' if cls else escape(tok))
    return " ".join(out)


def entity_html(text: str, entities: list[dict], gold: list[dict] | None = None) -> str:
    """A sentence with predicted entities marked."""
    marks = sorted(({"start": e["start"], "end": e["end"], "label": e.get("label", e.get("type", "")), "cls": "ent"}
                    for e in entities if "start" in e), key=lambda m: m["start"])
    out, pos = [], 0
    for m in marks:
        if m["start"] < pos:
            continue
        out.append(escape(text[pos:m["start"]]))
        out.append(f'<mark class="{m["cls"]}" title="{escape(m["label"])}">{escape(text[m["start"]:m["end"]])}'
                   f'<sub>{escape(m["label"])}</sub></mark>')
        pos = m["end"]
    out.append(escape(text[pos:]))
    return "".join(out)


def attribution_html(attributions: list[list]) -> str:
    """Words on a green (towards the label) or red (against) background, as strong as their attribution."""
    top = max((abs(a) for _, a in attributions), default=1.0) or 1.0
    out = []
    for w, a in attributions:
        rgb = "44,160,44" if a >= 0 else "214,39,40"
        out.append(f'<span class="attr" style="background: rgba({rgb},{min(abs(a) / top, 1):.2f})" title="{a:+.4g}">{escape(w)}</span>')
    return " ".join(out)
