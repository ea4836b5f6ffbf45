"""The dashboard's HTML pages: runs, a run, its error analysis, compare, train (and the favicon)."""
from __future__ import annotations

import yaml
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from lmtune.artifacts import RunDir
from lmtune.ui import analysis, views
from lmtune.ui.state import UiState, state

router = APIRouter()
COMPARED_CURVES = ("train_loss", "dev_loss", "dev_accuracy", "dev_macro_f1", "dev_f1")


@router.get("/", response_class=HTMLResponse)
async def runs_page(ui: UiState = Depends(state)):
    return ui.page("runs.html", runs=views.runs_table(ui.runs_dir))


@router.get("/run/{name}", response_class=HTMLResponse)
async def run_page(name: str, ui: UiState = Depends(state)):
    ui.run_path(name)
    d = views.run_details(ui.runs_dir, name)
    split = "test" if "test" in d["metrics"] else "dev"
    m = d["metrics"].get(split, {})
    curves = views.curves(d["history"])
    charts = [views.line_chart({k: v for k, v in curves.items() if k in ("train_loss", "dev_loss")}, "loss"),
              views.line_chart({k: v for k, v in curves.items() if k.startswith("dev_") and k != "dev_loss"
                                and not k.startswith("dev_ece")}, "dev metrics")]
    entities = [views.entity_html(r["text"], r["entities"]) if isinstance(r.get("text"), str)
                else views.tagged_html(r["tokens"], r.get("tags", []), r.get("gold"))
                for r in d["test_rows"] if "entities" in r][:20]
    data_cfg = (yaml.safe_load(d["config"]) or {}).get("data", {}) if d["config"] else {}
    explained = [{"name": kind, "html": views.attribution_html(e["attributions"]), "label": e.get("label"), "gold": e.get("gold")}
                 for kind, exs in (d["results"].get("explain") or {}).get("examples", {}).items() for e in exs]
    reliability = analysis.reliability_data(m, [] if m.get("reliability") else analysis.scored_predictions(RunDir(ui.runs_dir / name), split))
    return ui.page("run.html", d=d, split=split, m=m, charts=charts, explained=explained,
                   confusion=views.confusion_table(m.get("confusion_matrix", []), d["labels"]), entities=entities,
                   pairs=bool(data_cfg.get("text_pair_column")), data_cfg=data_cfg,
                   reliability=reliability and analysis.reliability_chart(reliability, f"reliability ({split})"))


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(request: Request, ui: UiState = Depends(state)):
    names = request.query_params.getlist("run")
    if len(names) < 2:
        raise HTTPException(422, "compare needs two or more runs: /compare?run=A&run=B")
    for n in names:
        ui.run_path(n)
    c = views.compare_runs(ui.runs_dir, names)
    overlay: dict[str, dict] = {}
    for n in names:
        for k, pts in c["curves"][n].items():
            if k in ("dev_loss", "train_loss") or not k.startswith("dev_ece"):
                overlay.setdefault(k, {})[n] = pts
    charts = [views.line_chart(series, k) for k, series in overlay.items() if k in COMPARED_CURVES]
    return ui.page("compare.html", c=c, charts=charts, table=analysis.compare_table(ui.runs_dir, names), a=analysis)


@router.get("/run/{name}/errors", response_class=HTMLResponse)
async def errors_page(name: str, split: str | None = None, ui: UiState = Depends(state)):
    """Error analysis: the split's misclassified and low-confidence examples (NER: sentences with wrong spans)."""
    ui.run_path(name)
    return ui.page("errors.html", e=analysis.error_analysis(ui.runs_dir, name, split))


@router.get("/train", response_class=HTMLResponse)
def train_page(ui: UiState = Depends(state)):  # plain def: FastAPI runs it in a thread, so the first import blocks no loop
    import lmtune.registrations  # noqa: F401  (the built-in tasks and PEFT methods)
    from lmtune.config import DEFAULT_MODEL
    from lmtune.models import PACKAGED_MODELS
    from lmtune.registry import peft_methods, tasks
    models = list(dict.fromkeys([DEFAULT_MODEL, *PACKAGED_MODELS]))
    return ui.page("train.html", max_mb=ui.settings.max_upload_bytes / 2**20, tasks=tasks.names(),
                   peft_methods=peft_methods.names(), models=models)


@router.get("/favicon.ico")
async def favicon():
    return RedirectResponse("/static/favicon.svg")
