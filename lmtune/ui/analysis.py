"""The dashboard's analysis views: the compare table with its B - A column, the reliability diagram, and
error analysis (misclassified and low-confidence examples, NER sentences with their wrong spans).

Everything is read from what a run saved (metrics.json, results.json, predictions/SPLIT.jsonl); the
charts are SVG written here, like views.py's, so the pages need no script and nothing from a CDN.
Texts in predictions are user data: they are only ever rendered escaped, and never logged.
"""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from lmtune.artifacts import RunDir
from lmtune.data.ner_readers import split_words
from lmtune.data.tagging import detect_scheme, spans

SPLITS = ("dev", "test")
RELIABILITY_BINS = 15  # as lmtune.evaluate.calibration.reliability_bins: equal-width bins (lo, hi]
MAX_ERROR_ROWS = 5000  # the page stays responsive; the count says when more were left out
CALIBRATED, RAW = "#1f77b4", "#d62728"


# ---- numbers ----------------------------------------------------------------------------------------
def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(v: object) -> str:
    """A count as a count ("18"), a measurement with 4 decimals, anything else as it is."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def signed(v: int | float) -> str:
    """A difference with its sign: "+2", "-0.0125", "0"."""
    if v == 0:
        return "0"
    if isinstance(v, int):
        return f"{v:+d}"
    return f"{v:+.4f}" if abs(v) >= 5e-5 else f"{v:+.1e}"  # not "+0.0000" for a difference that is there


def sign_class(v: int | float) -> str:
    return "diff-pos" if v > 0 else "diff-neg" if v < 0 else "diff-zero"


# ---- compare ----------------------------------------------------------------------------------------
def compare_table(root: Path, names: list[str]) -> list[dict]:
    """Every top-level numeric dev and test metric of the runs (ints kept as ints), with each later run's
    difference from the first: B - A, as `lmtune compare` prints it. A metric some run lacks has None."""
    per_run = [RunDir(root / n).read_metrics() for n in names]
    rows = []
    for split in SPLITS:
        keys: dict[str, None] = {}  # the order the runs wrote them in
        for m in per_run:
            keys.update({k: None for k, v in (m.get(split) or {}).items() if is_number(v)})
        for k in keys:
            values = [(m.get(split) or {}).get(k) for m in per_run]
            values = [v if is_number(v) else None for v in values]
            diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            rows.append({"metric": f"{split}.{k}", "values": values, "diffs": diffs})
    return rows


# ---- reliability --------------------------------------------------------------------------------------
def bins_from_predictions(rows: list[dict]) -> list[list[float]]:
    """[mean confidence, accuracy, count] per non-empty confidence bin, from a classification run's saved
    predictions (its score is the calibrated top probability; an abstained row keeps its top label)."""
    conf_correct = [(float(r["score"]), (r.get("top_label") or r["label"]) == r["gold"]) for r in rows
                    if "gold" in r and "label" in r and is_number(r.get("score"))]
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in conf_correct:
        groups.setdefault(min(max(math.ceil(c * RELIABILITY_BINS) - 1, 0), RELIABILITY_BINS - 1), []).append((c, ok))
    return [[sum(c for c, _ in g) / len(g), sum(ok for _, ok in g) / len(g), len(g)] for _, g in sorted(groups.items())]


def ece_of(bins: list[list[float]]) -> float:
    """Expected calibration error from the bins: the count-weighted mean |accuracy - confidence|."""
    n = sum(b[2] for b in bins)
    return sum(b[2] * abs(b[1] - b[0]) for b in bins) / n if n else 0.0


def reliability_data(metrics: dict, prediction_rows: list[dict]) -> dict | None:
    """{series name: (bins, ECE)} for a split: the bins training saved in the split's metrics (calibrated,
    and before calibration when a temperature was fitted), else bins of the saved predictions."""
    if metrics.get("reliability"):
        out = {"model": (metrics["reliability"], metrics.get("ece", ece_of(metrics["reliability"])))}
        raw = metrics.get("reliability_uncalibrated")
        if raw and raw != metrics["reliability"]:
            out = {"calibrated": out["model"], "uncalibrated": (raw, metrics.get("ece_uncalibrated", ece_of(raw)))}
        return out
    bins = bins_from_predictions(prediction_rows)
    return {"model": (bins, ece_of(bins))} if bins else None


def reliability_chart(series: dict[str, tuple[list[list[float]], float]], title: str, size: int = 320) -> str:
    """A reliability diagram: a bar per confidence bin as high as its accuracy (the first series), the
    diagonal of perfect calibration, and every series' (confidence, accuracy) points joined by a line."""
    pad_l, pad_b, pad_t, legend_h = 40, 34, 22, 16 * len(series)
    w = h = size - pad_l - 10
    height = pad_t + h + pad_b + legend_h

    def sx(v: float) -> float:
        return pad_l + v * w

    def sy(v: float) -> float:
        return pad_t + (1 - v) * h

    out = [f'<svg class="chart reliability" role="img" aria-label="{escape(title)}" viewBox="0 0 {size} {height}" '
           f'width="{size}" height="{height}">',
           f'<text x="{pad_l}" y="14" class="chart-title">{escape(title)}</text>',
           f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" class="plot-area"/>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        out += [f'<line x1="{sx(t):.1f}" y1="{pad_t + h}" x2="{sx(t):.1f}" y2="{pad_t + h + 4}" class="axis"/>',
                f'<text x="{sx(t):.1f}" y="{pad_t + h + 15}" class="tick" text-anchor="middle">{t:g}</text>',
                f'<text x="{pad_l - 5}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>']
    out += [f'<text x="{pad_l + w / 2:.0f}" y="{pad_t + h + 29}" class="tick" text-anchor="middle">confidence</text>',
            f'<text x="12" y="{pad_t + h / 2:.0f}" class="tick" text-anchor="middle" transform="rotate(-90 12 {pad_t + h / 2:.0f})">'
            'accuracy</text>',
            f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" class="diagonal"/>']
    first = next(iter(series.values()))[0]
    for conf, acc, n in first:  # the bars: where each bin's accuracy stands against the diagonal
        i = min(max(math.ceil(conf * RELIABILITY_BINS) - 1, 0), RELIABILITY_BINS - 1)
        lo, hi = i / RELIABILITY_BINS, (i + 1) / RELIABILITY_BINS
        out.append(f'<rect class="bin" x="{sx(lo) + 1:.1f}" y="{sy(acc):.1f}" width="{sx(hi) - sx(lo) - 2:.1f}" '
                   f'height="{sy(0) - sy(acc):.1f}" data-confidence="{conf:.6f}" data-accuracy="{acc:.6f}" data-count="{n}">'
                   f'<title>confidence {lo:.2f}-{hi:.2f}: accuracy {acc:.3f} over {n} (mean confidence {conf:.3f})</title></rect>')
    for j, (name, (bins, err)) in enumerate(series.items()):
        color = (CALIBRATED, RAW)[j % 2]
        pts = " ".join(f"{sx(c):.1f},{sy(a):.1f}" for c, a, _ in bins)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5" class="series" data-name="{escape(name)}"/>')
        out += [f'<circle cx="{sx(c):.1f}" cy="{sy(a):.1f}" r="3.5" fill="{color}" class="point"><title>{escape(name)}: '
                f'confidence {c:.3f}, accuracy {a:.3f}, {n} examples</title></circle>' for c, a, n in bins]
        y = pad_t + h + pad_b + 12 + 16 * j
        out += [f'<rect x="{pad_l}" y="{y - 9}" width="10" height="10" fill="{color}"/>',
                f'<text x="{pad_l + 16}" y="{y}" class="legend ece" data-ece="{err:.6f}">{escape(name)}: ECE {err:.4f}</text>']
    out.append("</svg>")
    return "\n".join(out)


# ---- error analysis -----------------------------------------------------------------------------------
def read_predictions(rd: RunDir, split: str, limit: int | None = None) -> list[dict]:
    path = rd.predictions(split)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:  # a damaged line: the page shows the others
                continue
            if isinstance(row, dict):
                rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def scored_predictions(rd: RunDir, split: str) -> list[dict]:
    """A split's saved predictions when they are single-label ones with a score and a gold label (what the
    reliability bins need), else none: a regression or generation run's big file is not read for nothing."""
    first = read_predictions(rd, split, 1)
    if not first or not is_number(first[0].get("score")) or not isinstance(first[0].get("gold"), str):
        return []
    return read_predictions(rd, split)


def classification_errors(rows: list[dict]) -> list[dict]:
    """One entry per labeled example: gold, predicted, confidence, whether it is wrong, the top
    probabilities; wrong answers first, the most confident first (a confident mistake says most)."""
    out = []
    for i, r in enumerate(rows):
        if "gold" not in r or "label" not in r or not isinstance(r["gold"], str):
            continue
        probs = sorted((r.get("probabilities") or {}).items(), key=lambda kv: -kv[1])[:3]
        out.append({"index": i, "text": r.get("text", ""), "pair": r.get("text_pair"), "gold": r["gold"],
                    "pred": r["label"], "conf": float(r["score"]) if is_number(r.get("score")) else 1.0, "wrong": r["label"] != r["gold"],
                    "top": probs, "source": r.get("source", "")})
    return sorted(out, key=lambda e: (not e["wrong"], -e["conf"] if e["wrong"] else e["conf"]))


def ner_words(row: dict) -> tuple[list[str], list[str]] | None:
    """The words the tags are of, and the text between each word and the next: the row's tokens (spaces
    between), or its text split as the NER reader splits it (cut at the predicted entities' edges); None
    when the split does not give one word per tag."""
    if isinstance(row.get("tokens"), list):
        return [str(t) for t in row["tokens"]], [" "] * len(row["tokens"])
    text = row.get("text")
    if not isinstance(text, str):
        return None
    cuts = {p for e in row.get("entities", []) for p in (e.get("start"), e.get("end")) if isinstance(p, int)}
    offsets = split_words(text, cuts)
    if len(offsets) != len(row.get("tags", [])):
        return None
    return [text[s:e] for s, e in offsets], [text[e:nxt] for (_, e), (nxt, _) in zip(offsets, offsets[1:])] + [""]


def sentence_html(words: tuple[list[str], list[str]], marked: list[tuple[int, int, str]], wrong: set[tuple[int, int, str]]) -> str:
    """Words with the spans marked: `ok` when the other side has the same span and type, else `wrong`."""
    tokens, gaps = words
    starts = {s: (s, e, t) for s, e, t in marked}

    def piece(a: int, b: int) -> str:  # words a..b-1 as they stand in the text
        return "".join(tokens[k] + (gaps[k] if k < b - 1 else "") for k in range(a, b))
    out, i = [], 0
    while i < len(tokens):
        if i in starts:
            s, e, t = starts[i]
            e = max(e, i + 1)
            cls = "span wrong" if (s, e, t) in wrong else "span ok"
            out.append(f'<mark class="{cls}" data-type="{escape(t)}">{escape(piece(s, e))}<sub>{escape(t)}</sub></mark>{escape(gaps[e - 1])}')
            i = e
        else:
            out.append(escape(tokens[i] + gaps[i]))
            i += 1
    return "".join(out)


def ner_errors(rows: list[dict]) -> list[dict]:
    """One entry per labeled sentence: gold and predicted spans, the wrong ones (missed, spurious or
    typed wrongly), the entity types on each side and the lowest predicted entity score."""
    labeled = [(i, r) for i, r in enumerate(rows) if isinstance(r.get("gold"), list) and isinstance(r.get("tags"), list)]
    scheme = detect_scheme([r["gold"] for _, r in labeled] + [r["tags"] for _, r in labeled]) if labeled else "bio"
    out = []
    for i, r in labeled:
        gold, pred = set(spans(r["gold"], scheme)), set(spans(r["tags"], scheme))
        words = ner_words(r)
        missed, spurious = sorted(gold - pred), sorted(pred - gold)
        scores = [float(e["score"]) for e in r.get("entities", []) if is_number(e.get("score"))]
        say = ([f"missed {t} “{' '.join(words[0][s:e]) if words else f'words {s}-{e}'}”" for s, e, t in missed]
               + [f"predicted {t} “{' '.join(words[0][s:e]) if words else f'words {s}-{e}'}”" for s, e, t in spurious])
        out.append({"index": i, "wrong": bool(missed or spurious), "conf": min(scores, default=1.0),
                    "gold_types": sorted({t for _, _, t in gold}), "pred_types": sorted({t for _, _, t in pred}),
                    "gold_html": sentence_html(words, sorted(gold), gold - pred) if words else escape(str(r.get("text", ""))),
                    "pred_html": sentence_html(words, sorted(pred), pred - gold) if words else "",
                    "errors": say, "source": r.get("source", "")})
    return sorted(out, key=lambda e: (not e["wrong"], e["conf"]))


def error_analysis(root: Path, name: str, split: str | None = None) -> dict:
    """What the error-analysis page shows for a run's split (test, else dev): the kind of rows, the rows,
    and the labels (or entity types) the filters offer."""
    rd = RunDir(root / name)
    split = split if split in SPLITS else next((s for s in ("test", "dev") if rd.predictions(s).is_file()), "test")
    rows = read_predictions(rd, split, MAX_ERROR_ROWS + 1)
    truncated, rows = len(rows) > MAX_ERROR_ROWS, rows[:MAX_ERROR_ROWS]
    kind, entries = None, []
    if any("entities" in r for r in rows[:5]):
        kind, entries = "ner", ner_errors(rows)
        labels = sorted({t for e in entries for t in e["gold_types"] + e["pred_types"]})
    elif any(isinstance(r.get("gold"), str) and "label" in r for r in rows[:5]):
        kind, entries = "classification", classification_errors(rows)
        labels = sorted({e["gold"] for e in entries} | {e["pred"] for e in entries})
    else:
        labels = []
    splits = [s for s in SPLITS if rd.predictions(s).is_file()]
    return {"name": name, "split": split, "splits": splits, "kind": kind, "rows": entries, "labels": labels,
            "wrong": sum(e["wrong"] for e in entries), "truncated": truncated}
