"""mkdocs hook: the site's home page is README.md itself, its links into docs/ made relative to the site.

docs/index.md only names this hook, so the front page exists once and cannot drift from the README.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def site_links(readme: str) -> str:
    """`](docs/page.md)` in the README is `](page.md)` from the site's root."""
    return readme.replace("](docs/", "](")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).resolve().parent / "README.md"
    return site_links(readme.read_text(encoding="utf-8"))
