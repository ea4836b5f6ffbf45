"""`lmtune push RUN_DIR REPO_ID`: the model folder (weights, tokenizer, lmtune.json, model card) to the
Hub; `--to DIR` writes the same files to a local folder instead, `--dry-run` lists them.

All three go through one staged copy of model/ (stage): lmtune.json with credentials masked and the
model card rendered again with the repo id in its snippets. The run itself is not changed, and what
--to writes or --dry-run lists is exactly what the upload sends. Hub failures (offline mode, HTTP
errors, no token) are input errors with what to do, not tracebacks.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmtune.artifacts import META, RunDir, read_meta, write_meta
from lmtune.errors import InputError
from lmtune.io import atomic_dir


def _finished(run_dir: str | Path) -> RunDir:
    rd = RunDir(run_dir)
    if not rd.finished():
        raise InputError(f"{rd.root}: no finished model (model/{META} missing); push a run that finished training.")
    return rd


def stage(run_dir: str | Path, dest: Path, repo_id: str | None = None) -> list[Path]:
    """The Hub repo's files in `dest` (an existing empty folder): model/ as it is, its lmtune.json with
    credentials masked (a run from before masking), and README.md, the model card, rendered again with
    repo_id in its usage snippets. Returns the files, relative to dest, sorted."""
    from lmtune import results
    from lmtune.card import render_card
    rd = _finished(run_dir)
    for src in sorted(rd.model.rglob("*")):
        if src.is_file() and src.name != rd.card.name and not any(p.startswith(".") for p in src.relative_to(rd.model).parts):
            target = dest / src.relative_to(rd.model)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    write_meta(dest, read_meta(rd.model))  # write_meta masks credentials in the config
    if results.path(rd.root).is_file():
        render_card(rd.root, results.read(rd.root), repo_id=repo_id, dest=dest / rd.card.name)
    elif rd.card.is_file():  # a model folder without its run's results.json: its card as it is
        shutil.copy2(rd.card, dest / rd.card.name)
    return sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())


def push_to_folder(run_dir: str | Path, folder: str | Path, repo_id: str | None = None) -> list[Path]:
    """The Hub layout written to a local folder (made whole in a temporary one, then renamed); the folder
    must not exist yet."""
    folder = Path(folder)
    if folder.exists():
        raise InputError(f"{folder}: already exists; push --to writes a new folder and never overwrites one.")
    with atomic_dir(folder) as tmp:
        files = stage(run_dir, Path(tmp), repo_id)
    return files


def dry_run(run_dir: str | Path, repo_id: str | None = None) -> list[tuple[str, int]]:
    """What push would upload: (path in the repo, bytes) per file; nothing is written anywhere lasting."""
    with tempfile.TemporaryDirectory(prefix="lmtune-push-") as tmp:
        return [(str(f), (Path(tmp) / f).stat().st_size) for f in stage(run_dir, Path(tmp), repo_id)]


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload RUN_DIR/model (weights, tokenizer, lmtune.json, the card) to a Hub model repo; the token
    comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it."""
    _finished(run_dir)
    from huggingface_hub import HfApi
    with _quiet_http(), tempfile.TemporaryDirectory(prefix="lmtune-push-") as tmp:
        stage(run_dir, Path(tmp), repo_id)
        try:
            api = HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=f"lmtune run {Path(run_dir).name}")
        except Exception as e:
            raise hub_error(e, repo_id) from None
    return str(getattr(info, "commit_url", info))


@contextmanager
def _quiet_http() -> Iterator[None]:
    """httpx logs a line per HTTP request at INFO, which lmtune's logging shows: quiet during the upload
    only, and the levels put back after (another part of the process may want them)."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2", "httpcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def hub_error(e: Exception, repo_id: str) -> Exception:
    """huggingface_hub's failures as input errors that say what to do; anything else unchanged."""
    from huggingface_hub import errors
    if isinstance(e, errors.OfflineModeIsEnabled):
        return InputError(f"push {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set), so nothing "
                          "can be uploaded. Unset HF_HUB_OFFLINE, or write the repo's files locally with --to DIR.")
    if isinstance(e, errors.LocalTokenNotFoundError) or (
            isinstance(e, errors.HfHubHTTPError) and getattr(e.response, "status_code", None) == 401):
        return InputError(f"push {repo_id}: no valid Hugging Face token. Set HF_TOKEN or run `hf auth login` with a "
                          "token that has write access.")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(e.response, "status_code", None)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return InputError(f"push {repo_id}: the Hub answered {status or 'an error'}: {first}. Check the repo id and that "
                          "your token can write to it.")
    # huggingface_hub's HTTP client (httpx, or its httpx2 fork) raises its own transport errors, which are
    # not builtin ConnectionErrors: matched by class name, whichever client is installed
    transport = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout"}
    if isinstance(e, (ConnectionError, TimeoutError)) or any(c.__name__ in transport for c in type(e).__mro__):
        return InputError(f"push {repo_id}: cannot reach the Hugging Face Hub ({type(e).__name__}). Check the network, "
                          "or write the repo's files locally with --to DIR.")
    return e
