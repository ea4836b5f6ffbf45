"""mkdocs hook: the benchmark figures rendered from bench/results/*.json, never written by hand.

Each bench's results file holds its command, the commit whose README first stated the figures, the date,
the machine, a headline figure and its sections: provenance text (markdown, verbatim) and tables
(columns with their decimals, rows of numbers or verbatim cells). A page asks for them with markers:
`<!-- bench:overview -->` (one row per bench), `<!-- bench:all -->` (every bench under its own heading)
or `<!-- bench:NAME -->` (one bench, no heading). An unknown bench or a malformed file stops the build.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"<!-- bench:([\w-]+) -->")
REQUIRED = ("bench", "order", "title", "script", "command", "commit", "date", "machine", "headline", "sections")
RESULTS = "bench/results"  # relative to mkdocs.yml


def load_results(folder: Path) -> dict[str, dict]:
    """Every NAME.json under folder, checked, keyed by its bench name (the file's stem)."""
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PluginError(f"error: {path}: line {e.lineno}: not valid JSON ({e.msg}); fix the file") from e
        missing = [key for key in REQUIRED if key not in doc]
        if missing:
            raise PluginError(f"error: {path}: missing {', '.join(missing)}; every results file needs {', '.join(REQUIRED)}")
        if doc["bench"] != path.stem:
            raise PluginError(f"error: {path}: bench is {doc['bench']!r}; it must be the file's name, {path.stem!r}")
        results[path.stem] = doc
    if not results:
        raise PluginError(f"error: {folder}: no bench results (*.json) found")
    return results


def format_cell(value: Any, decimals: int | None) -> str:
    """A number with its column's decimals (as the bench stated it); any other cell as written."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.{decimals}f}" if decimals is not None else str(value)


def render_table(table: dict) -> str:
    columns = table["columns"]
    lines = ["| " + " | ".join(c["name"] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table["rows"]:
        if len(row) != len(columns):
            raise PluginError(f"error: bench table row {row!r} has {len(row)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(format_cell(v, c.get("decimals")) for v, c in zip(row, columns)) + " |")
    return "\n".join(lines)


def provenance(doc: dict) -> str:
    return (f"*`{doc['command']}` · commit `{doc['commit']}` · {doc['date']} · {doc['machine']} · "
            f"results: `{RESULTS}/{doc['bench']}.json`*")


def render_bench(doc: dict, heading: bool = False) -> str:
    parts = [f"## {doc['title']} {{#{doc['bench']}}}"] if heading else []
    parts.append(provenance(doc))
    for section in doc["sections"]:
        parts.append(render_table(section["table"]) if "table" in section else section["text"])
    return "\n\n".join(parts)


def render_overview(results: dict[str, dict]) -> str:
    lines = ["| bench | figure | lmtune | against | commit | date |", "|---|---|---|---|---|---|"]
    for doc in sorted(results.values(), key=lambda d: d["order"]):
        h = doc["headline"]
        lines.append(f"| [{doc['title']}](#{doc['bench']}) | {h['what']} | **{format_cell(h['lmtune'], h['decimals'])}** | "
                     f"{h['against']}: {format_cell(h['against_value'], h['decimals'])} | `{doc['commit']}` | {doc['date']} |")
    return "\n".join(lines)


def render_markers(markdown: str, results: dict[str, dict], where: str) -> str:
    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name == "overview":
            return render_overview(results)
        if name == "all":
            return "\n\n".join(render_bench(d, heading=True) for d in sorted(results.values(), key=lambda d: d["order"]))
        if name not in results:
            raise PluginError(f"error: {where}: <!-- bench:{name} --> names no file {RESULTS}/{name}.json; "
                              f"benches: {', '.join(sorted(results))}")
        return render_bench(results[name])
    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if "<!-- bench:" not in markdown:
        return markdown
    folder = Path(config["config_file_path"]).resolve().parent / RESULTS
    return render_markers(markdown, load_results(folder), page.file.src_uri)
