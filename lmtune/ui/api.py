"""The JSON API behind the pages' scripts: runs, Try it, data files and uploads, `lmtune init` configs,
training jobs with their event streams, and cleaned copies.

JSON bodies are pydantic models, so a body that is not the object a route takes (a list, a string, a
wrong type) is a 422 before any code runs, and /openapi.json describes each one.
"""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmtune.artifacts import RunDir
from lmtune.errors import InputError
from lmtune.ui import views
from lmtune.ui.state import UiState, state
from lmtune.ui.jobs import Job, clean_copy

router = APIRouter(prefix="/api")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt", ".conll", ".parquet")
_NAME = re.compile(r"^[\w][\w.-]{0,127}$")


class PredictBody(BaseModel):
    text: str = ""
    pair: str | None = None


class FileBody(BaseModel):
    path: str
    task: str | None = None


class JobBody(BaseModel):
    config: str


class CleanAction(BaseModel):
    line: int
    action: Literal["drop", "relabel"]
    label: str | None = None


class CleanBody(BaseModel):
    path: str
    actions: list[CleanAction] = []
    label_column: str | None = None


@router.get("/runs")
async def api_runs(ui: UiState = Depends(state)):
    return views.runs_table(ui.runs_dir)


@router.post("/run/{name}/predict")
async def api_predict(name: str, body: PredictBody, ui: UiState = Depends(state)):
    path = ui.run_path(name)
    text, pair = body.text, body.pair
    if not text.strip() or len(text) > 5000:
        raise HTTPException(422, "give a text of 1 to 5000 characters")
    meta = RunDir(path).model_meta
    stamp = meta.stat().st_mtime if meta.is_file() else 0.0
    if not stamp:
        raise HTTPException(409, "this run has no final model yet")

    def predict():
        return ui.loaded(str(path), stamp).predict([(text, pair)] if pair else [text])[0]
    try:
        return await asyncio.to_thread(predict)
    except InputError as e:
        raise HTTPException(422, str(e)) from None


@router.get("/files")
async def api_files(ui: UiState = Depends(state)):
    """Data files under the working directory (not under the runs or the UI's own folders)."""
    out = []
    for p in sorted(ui.workdir.rglob("*")):
        rel = p.relative_to(ui.workdir)
        if (p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not any(part.startswith(".") for part in rel.parts)
                and ui.runs_dir not in p.parents):
            out.append(str(rel))
        if len(out) >= 500:
            break
    return out


@router.post("/upload")
async def api_upload(request: Request, name: str, ui: UiState = Depends(state)):
    base, limit = Path(name).name, ui.settings.max_upload_bytes
    if not _NAME.match(base) or Path(base).suffix.lower() not in DATA_SUFFIXES:
        raise HTTPException(415, f"{name}: upload a data file ({', '.join(DATA_SUFFIXES)})")
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit():
        raise HTTPException(400, "Content-Length must be a number of bytes")
    if int(declared) > limit:
        raise HTTPException(413, f"upload larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, f"upload larger than {limit} bytes")
    target = ui.confine.path(f"uploads/{base}")
    target.parent.mkdir(parents=True, exist_ok=True)
    from lmtune.io import atomic_path
    with atomic_path(target) as tmp:
        tmp.write_bytes(bytes(data))
    return {"path": str(target.relative_to(ui.workdir)), "bytes": len(data)}


def existing_file(ui: UiState, given: str) -> Path:
    path = ui.confine.path(given)
    try:
        found = path.is_file()
    except OSError:  # a name too long for the file system, say: no such file either
        found = False
    if not found:
        raise HTTPException(404, f"{given}: no such file")
    return path


@router.post("/init")
async def api_init(body: FileBody, ui: UiState = Depends(state)):
    from lmtune.scaffold import inspect, render
    path = existing_file(ui, body.path)
    try:
        return {"config": render(inspect(path), body.task or None)}
    except InputError as e:
        raise HTTPException(422, str(e)) from None


@router.post("/jobs")
async def api_start(body: JobBody, ui: UiState = Depends(state)):
    try:
        job = ui.jobs.start(body.config)
    except InputError as e:
        raise HTTPException(422, str(e)) from None
    return job.state()


def job_of(ui: UiState, job_id: str) -> Job:
    try:
        return ui.jobs.get(job_id)
    except KeyError:
        raise HTTPException(404, f"no job {job_id}") from None


@router.get("/jobs/{job_id}")
async def api_job(job_id: str, ui: UiState = Depends(state)):
    return job_of(ui, job_id).state()


@router.post("/jobs/{job_id}/stop")
async def api_stop(job_id: str, ui: UiState = Depends(state)):
    job_of(ui, job_id)
    return await asyncio.to_thread(ui.jobs.stop, job_id)


@router.get("/jobs/{job_id}/events")
async def api_events(job_id: str, ui: UiState = Depends(state)):
    """Server-sent events: each new output line, then the final state."""
    job = job_of(ui, job_id)

    async def stream():
        pos = 0
        while True:
            done = job.proc.poll() is not None
            text = job.log.read_bytes()[pos:] if job.log.is_file() else b""
            if text:
                cut = len(text) if done else text.rfind(b"\n") + 1
                for line in text[:cut].decode("utf-8", "replace").splitlines():
                    yield f"data: {json.dumps({'line': line})}\n\n"
                pos += cut
            if done:
                yield f"event: done\ndata: {json.dumps(job.state())}\n\n"
                return
            await asyncio.sleep(0.3)
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/clean")
async def api_clean(body: CleanBody, ui: UiState = Depends(state)):
    path = existing_file(ui, body.path)
    actions = [a.model_dump(exclude_none=True) for a in body.actions]
    try:
        return clean_copy(path, actions, ui.workdir / "cleaned", body.label_column or "label")
    except InputError as e:
        raise HTTPException(422, str(e)) from None
