"""The dashboard's labeling page for a run (lmtune.active): the latest batch with the model's suggestions, accept
or correct each row (saved as the batch's labeled file), retrain (`lmtune label RUN --import` as a job), ask the
run for its next batch (`lmtune label RUN --pool FILE` as a job), and the learning curve."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from lmtune.artifacts import RunDir, read_meta
from lmtune.errors import InputError
from lmtune.ui.state import UiState, state

router = APIRouter()


class LabelsBody(BaseModel):
    batch: int
    labels: dict[int, list[str]]  # rank -> the row's label (one, or a multi-label run's several)


class RetrainBody(BaseModel):
    batch: int


class NextBody(BaseModel):
    pool: str | None = Field(None, max_length=4096)  # default: the pool the loop's last batch came from
    size: int = Field(20, ge=1, le=10_000)
    strategy: str = "entropy"


def _finished(ui: UiState, name: str) -> RunDir:
    rd = RunDir(ui.run_path(name))
    if not rd.finished():
        raise HTTPException(404, f"run {name!r} has not finished training")
    return rd


@router.get("/run/{name}/label", response_class=HTMLResponse)
async def label_page(name: str, ui: UiState = Depends(state)):
    from lmtune.active import loop
    rd = _finished(ui, name)
    st = loop.read_state(rd.root)
    batch = st["batches"][-1] if st["batches"] else None
    saved = loop.saved_labels(rd.root, batch["index"]) if batch else {}
    from lmtune.registry import query_strategies
    last = st["batches"][-1] if st["batches"] else {}
    return ui.page("label.html", name=name, batch=batch, saved=saved, labels=read_meta(rd.model)["labels"],
                   curve=st["curve"], has_plot=rd.active_curve.is_file(), strategies=query_strategies.names(),
                   next_pool=last.get("pool", ""), next_size=last.get("requested", last.get("size", 20)),
                   next_strategy=last.get("strategy", "entropy"))


@router.get("/api/run/{name}/label/curve.png")
async def label_curve(name: str, ui: UiState = Depends(state)):
    rd = _finished(ui, name)
    if not rd.active_curve.is_file():
        raise HTTPException(404, "no learning curve yet (it is drawn when a labeling round is recorded)")
    return FileResponse(rd.active_curve, media_type="image/png")


@router.post("/api/run/{name}/label")
async def label_save(name: str, body: LabelsBody, ui: UiState = Depends(state)):
    from lmtune.active import loop
    rd = _finished(ui, name)
    try:
        path = loop.save_labels(rd.root, body.batch, body.labels)
    except InputError as e:
        raise HTTPException(422, str(e)) from None
    return {"saved": len(loop.saved_labels(rd.root, body.batch)), "file": str(path)}


@router.post("/api/run/{name}/label/retrain")
async def label_retrain(name: str, body: RetrainBody, ui: UiState = Depends(state)):
    """`lmtune label RUN_DIR --import BATCH-K.labeled.jsonl` as a job: the grown train file, then the retrain."""
    from lmtune.active import loop
    from lmtune.ui.train_api import idle_finished_run
    rd = RunDir(idle_finished_run(ui, name))  # 409 while another job (an ask for a batch, a retrain) works on it
    path = loop.labeled_path(rd.root, body.batch)
    if not path.is_file():
        raise HTTPException(422, f"batch {body.batch}: no labels saved yet; accept or correct some rows first.")
    job = ui.jobs.start_command("label", [str(rd.root), "--import", str(path)], rd.root)
    return job.state()


@router.post("/api/run/{name}/label/next")
async def label_next(name: str, body: NextBody, ui: UiState = Depends(state)):
    """`lmtune label RUN_DIR --pool POOL --batch SIZE --strategy S` as a job: the run asks for its next batch (the
    rows its loop has asked before are left out). The pool defaults to the one the loop's last batch came from;
    any pool must lie inside the dashboard's allowed folders."""
    from lmtune.active import loop
    from lmtune.registry import query_strategies
    from lmtune.ui.train_api import idle_finished_run
    rd = RunDir(idle_finished_run(ui, name))
    if body.strategy not in query_strategies.names():
        raise HTTPException(422, f"strategy {body.strategy!r}: choose from {', '.join(query_strategies.names())}.")
    st = loop.read_state(rd.root)
    given = (body.pool or "").strip() or (st["batches"][-1]["pool"] if st["batches"] else "")
    if not given:
        raise HTTPException(422, "no pool: this run's loop has asked no batch yet; give the pool file to choose from.")
    pool = ui.confine.path(given, "pool")
    if not pool.is_file():
        raise HTTPException(404, f"{given}: no such file")
    job = ui.jobs.start_command("label", [str(rd.root), "--pool", str(pool), "--batch", str(body.size),
                                          "--strategy", body.strategy], rd.root)
    return job.state()
