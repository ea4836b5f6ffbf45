"""The dashboard's state: its settings and what every route needs (a module of its own so that the page
and API routers and the app that mounts them import it, not each other)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from lmtune.ui.confine import Confinement, run_name_ok
from lmtune.ui.jobs import Jobs

HERE = Path(__file__).parent


@dataclass
class UiSettings:
    runs_dir: str = "runs"
    workdir: str = "."
    token: str | None = None  # required for every call when set (always set when bound beyond localhost)
    max_upload_bytes: int = 20 * 2**20
    host: str = "127.0.0.1"  # the address it is bound to: Host headers naming anything else are refused
    allow_paths: tuple[str, ...] | list[str] = field(default_factory=tuple)  # folders allowed beyond workdir


class UiState:
    """What every route needs: the settings, the folders, the templates, the jobs."""

    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self.runs_dir, self.workdir = Path(settings.runs_dir).resolve(), Path(settings.workdir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.confine = Confinement.of(self.workdir, tuple(settings.allow_paths))
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
        self.env.filters["num"] = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
        self.jobs = Jobs(self.runs_dir, self.workdir, self.confine)
        self.loaded = functools.lru_cache(maxsize=2)(_load_run)

    def page(self, template: str, **ctx) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(runs_dir=str(self.runs_dir), **ctx))

    def run_path(self, name: str) -> Path:
        if not run_name_ok(name) or not name or not (self.runs_dir / name / "config.yaml").is_file():
            raise HTTPException(404, f"no run {name!r} under {self.runs_dir}")
        return self.runs_dir / name


def _load_run(path: str, stamp: float):
    """A run's model, loaded once per model file version (stamp: its mtime)."""
    from lmtune.api import load
    run = load(path)
    run.config.train.progress = "none"
    return run


def state(request: Request) -> UiState:
    """The dashboard's state, as a route dependency."""
    return request.app.state.ui
