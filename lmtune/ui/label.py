"""The dashboard's labeling page for a run (lmtune.active): the latest batch with the model's suggestions, accept
or correct each row (saved as the batch's labeled file), retrain (`lmtune label RUN --import` as a job), and the
learning curve."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel

from lmtune.artifacts import RunDir, read_meta
from lmtune.errors import InputError
from lmtune.ui.state import UiState, state

router = APIRouter()


class LabelsBody(BaseModel):
    batch: int
    labels: dict[int, list[str]]  # rank -> the row's label (one, or a multi-label run's several)


class RetrainBody(BaseModel):
    batch: int


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
    return ui.page("label.html", name=name, batch=batch, saved=saved, labels=read_meta(rd.model)["labels"],
                   curve=st["curve"], has_plot=rd.active_curve.is_file())


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
    rd = _finished(ui, name)
    path = loop.labeled_path(rd.root, body.batch)
    if not path.is_file():
        raise HTTPException(422, f"batch {body.batch}: no labels saved yet; accept or correct some rows first.")
    job = ui.jobs.start_command("label", [str(rd.root), "--import", str(path)], rd.root)
    return job.state()
