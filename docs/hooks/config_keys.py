"""mkdocs hook: the config page's table of keys, rendered from the config's own fields (the same help
text, defaults and choices that `lmtune config` prints and the JSON Schema carries), never by hand, so
a key added to a section shows up here without anyone editing the page. The page asks for it with
`<!-- config:keys -->`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

MARKER = "<!-- config:keys -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def keys_table() -> str:
    """| key | default | meaning | with one row per dotted key, in the config's own order."""
    from lmtune.config import all_keys
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, f in all_keys().items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        meaning = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            meaning += " One of: " + ", ".join(map(str, f.metadata["choices"])) + "."
        rows.append(f"| `{key}` | `{default!r}` | {_cell(meaning)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    return markdown.replace(MARKER, keys_table()) if MARKER in markdown else markdown
