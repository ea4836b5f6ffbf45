"""`lmtune push RUN_DIR REPO_ID`: the model folder (weights, tokenizer, lmtune.json, model card) to the Hub."""
from __future__ import annotations

from pathlib import Path

from lmtune.artifacts import RunDir, read_meta, write_meta
from lmtune.errors import InputError
from lmtune.redact import redact
from lmtune.results import render


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload RUN_DIR/model (weights, tokenizer, lmtune.json, the card) to a Hub model repo; the token
    comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it."""
    from huggingface_hub import HfApi
    rd = RunDir(run_dir)
    if not rd.finished():
        raise InputError(f"{rd.root}: no finished model (model/lmtune.json missing); push a run that finished training.")
    if not rd.card.is_file():
        render(rd.root)  # runs from before model cards
    meta = read_meta(rd.model)
    if "config" in meta and redact(meta["config"]) != meta["config"]:
        write_meta(rd.model, meta)  # a run from before credentials were masked: mask them before they leave
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(rd.model), repo_id=repo_id, commit_message=f"lmtune run {rd.root.name}")
    return str(getattr(info, "commit_url", info))
