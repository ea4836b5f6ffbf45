"""Live charts' feed: a run's events.jsonl (lmtune.training.live writes a row per step and per evaluation)
followed as server-sent events, one `data:` event a row, then `event: done` with the final state. A
training job's stream ends when the job ends, a run's when no process trains it any more, and either
when the browser goes away; never later.

Each event's id is the file offset after its row: a browser that reconnects (EventSource does, by itself)
sends it back as Last-Event-ID and gets only the rows it has not seen.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from lmtune.artifacts import RunDir
from lmtune.ui.jobs import Job

POLL_SECONDS = 0.4
KEEPALIVE_POLLS = 30  # a comment line every ~12 s: proxies keep the stream open, and a gone client is noticed


def _read_from(path: Path, pos: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            return fh.read()
    except OSError:  # not there yet: the child is still loading the model
        return b""


def _rows(chunk: bytes, pos: int) -> tuple[list[tuple[int, dict]], int]:
    """The complete lines of chunk as (offset after the line, row); a partial last line is left for later."""
    out, start = [], 0
    while (end := chunk.find(b"\n", start)) != -1:
        try:
            row = json.loads(chunk[start:end])
            if isinstance(row, dict):
                out.append((pos + end + 1, row))
        except ValueError:  # never written by lmtune; skipped rather than sent on
            pass
        start = end + 1
    return out, pos + start


async def follow_file(path: Path | None, ended: Callable[[], bool], final: Callable[[], dict],
                      disconnected: Callable[[], Awaitable[bool]], start: int = 0, poll: float = POLL_SECONDS) -> AsyncIterator[str]:
    """Server-sent events of the rows of `path` from byte offset `start`, until `ended()` (then `final()` as
    `event: done`) or `disconnected()` says the client has gone."""
    pos, idle = max(start, 0), 0
    while True:
        if await disconnected():
            return
        done = ended()  # read after this: the rows written before the end all come out
        rows, pos = _rows(await asyncio.to_thread(_read_from, path, pos), pos) if path else ([], pos)
        for offset, row in rows:
            yield f"id: {offset}\ndata: {json.dumps(row)}\n\n"
        if done:
            yield f"event: done\ndata: {json.dumps(final())}\n\n"
            return
        idle = 0 if rows else idle + 1
        if idle >= KEEPALIVE_POLLS:
            idle = 0
            yield ": keepalive\n\n"
        await asyncio.sleep(poll)


def follow_events(job: Job, disconnected: Callable[[], Awaitable[bool]], start: int = 0,
                  poll: float = POLL_SECONDS) -> AsyncIterator[str]:
    """A job's history rows until the job ends (then its final state)."""
    path = RunDir(job.run_dir).events if job.run_dir is not None and job.kind == "train" else None
    return follow_file(path, lambda: job.proc.poll() is not None, job.state, disconnected, start, poll)


def follow_run(rd: RunDir, disconnected: Callable[[], Awaitable[bool]], start: int = 0,
               poll: float = POLL_SECONDS) -> AsyncIterator[str]:
    """A run's history rows while a process trains it (started here or by `lmtune train`), then whether it
    finished; a run not training gives its rows and ends at once."""
    def final() -> dict:
        return {"run": rd.root.name, "status": "finished" if rd.finished() else "stopped"}
    return follow_file(rd.events, lambda: not rd.running(), final, disconnected, start, poll)


def last_event_offset(header: str | None) -> int:
    """The Last-Event-ID a reconnecting browser sends (an offset we gave it); 0 when absent or not ours."""
    return int(header) if header and header.isdigit() and len(header) < 16 else 0
