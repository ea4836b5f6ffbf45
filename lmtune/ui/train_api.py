"""The training form's API (columns of a data file; the form and its YAML view kept in sync), the live
metrics stream of a training job, and the run page's export and push jobs.

Every route sits behind the dashboard's guard (Host, token, X-Lmtune-UI on POST); every path a body
names goes through the confinement (403 outside the working directory and --allow-path folders).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.ui import form, live
from lmtune.ui.api import existing_file, job_of
from lmtune.ui.state import UiState, state

router = APIRouter(prefix="/api")


class PathBody(BaseModel):
    path: str


class FormToYaml(BaseModel):
    config: str = ""
    values: dict[str, str | int | float | bool | None]


class YamlBody(BaseModel):
    config: str


class PushBody(BaseModel):
    to: str


def _unprocessable(e: InputError) -> HTTPException:
    return HTTPException(422, str(e))


@router.post("/columns")
async def api_columns(body: PathBody, ui: UiState = Depends(state)):
    """A data file's columns, for the form's column pickers, and init's guess of task and columns."""
    path = existing_file(ui, body.path)
    try:
        return await asyncio.to_thread(form.file_columns, path)
    except InputError as e:
        raise _unprocessable(e) from None


@router.post("/form/yaml")
async def api_form_to_yaml(body: FormToYaml, ui: UiState = Depends(state)):
    """The YAML view with the form's changed values set in it."""
    try:
        return {"config": form.merge_values(body.config, body.values, ui.confine)}
    except InputError as e:
        raise _unprocessable(e) from None


@router.post("/form/values")
async def api_yaml_to_form(body: YamlBody, ui: UiState = Depends(state)):
    """The form's values read from the YAML view; 422 (the form is left alone) unless it is a valid config."""
    try:
        return {"values": await asyncio.to_thread(form.form_values, body.config, ui.workdir)}
    except InputError as e:
        raise _unprocessable(e) from None


@router.get("/jobs/{job_id}/metrics")
async def api_job_metrics(job_id: str, request: Request, ui: UiState = Depends(state)):
    """Server-sent events: the job's per-step loss and per-evaluation metrics as they are written."""
    job = job_of(ui, job_id)
    start = live.last_event_offset(request.headers.get("last-event-id"))
    return StreamingResponse(live.follow_events(job, request.is_disconnected, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/run/{name}/metrics")
async def api_run_metrics(name: str, request: Request, ui: UiState = Depends(state)):
    """Server-sent events: a run's history rows, followed while it trains (the run page's live charts)."""
    rd = RunDir(ui.run_path(name))
    start = live.last_event_offset(request.headers.get("last-event-id"))
    return StreamingResponse(live.follow_run(rd, request.is_disconnected, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def idle_finished_run(ui: UiState, name: str):
    """The run's folder, when it has its final model and no export, push or labeling job is working on it (409
    otherwise: two jobs on one run would write the same files)."""
    path = ui.run_path(name)
    if not RunDir(path).finished():
        raise HTTPException(409, f"run {name!r} has no final model yet")
    busy = [j for j in ui.jobs.jobs.values() if j.kind != "train" and j.run_dir == path and j.proc.poll() is None]
    if busy:
        raise HTTPException(409, f"a {busy[0].kind} job is already running on {name!r} ({busy[0].id})")
    return path


@router.post("/run/{name}/export")
async def api_export(name: str, ui: UiState = Depends(state)):
    """`lmtune export RUN` (ONNX, checked against PyTorch) as a job; the page follows /api/jobs/ID/events."""
    path = idle_finished_run(ui, name)
    return ui.jobs.start_command("export", [str(path)], path).state()


@router.post("/run/{name}/push")
async def api_push(name: str, body: PushBody, ui: UiState = Depends(state)):
    """`lmtune push RUN --to DIR` as a job: the Hub repo's layout written into a folder inside the allowed paths."""
    path = idle_finished_run(ui, name)
    if not body.to.strip():
        raise HTTPException(422, "to: give a folder to write the model to")
    target = ui.confine.path(body.to.strip(), "to")
    return ui.jobs.start_command("push", [str(path), "--to", str(target)], path).state()
