"""Data-parallel training on CPU: 2 processes (torchrun, gloo backend, as `accelerate launch` would
start them) give the same weights as one process with the same global batch, and a 2-process run
that crashes resumes to the same result."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune

WORKER = """
import json, os, sys
import torch
import lmtune
cfg = json.loads(open(sys.argv[1]).read())
crash_at, resume, draw = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
rank = int(os.environ["RANK"])

def crash(state):
    if draw and state.step % cfg["train"]["eval_every"]:  # between checkpoints, rank 1 draws more random numbers
        torch.rand(1000 * rank)
    if crash_at and state.step == crash_at:
        raise SystemExit(3)  # every rank stops at the same step, like a node that went away

lmtune.train(cfg, resume=resume, callbacks=(crash,))
"""


def _launch(tmp_path: Path, cfg: dict, crash_at: int = 0, resume: bool = False, draw: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
    worker, cfg_file = tmp_path / "worker.py", tmp_path / f"cfg_{cfg['run_name']}.json"
    worker.write_text(WORKER)
    cfg_file.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(cfg_file), str(crash_at), "1" if resume else "0", "1" if draw else "0"]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture
def ddp_config(tiny_config) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["dropout"] = 0.0  # dropout masks differ by process; the math must not
    cfg["train"].update(epochs=2, calibrate=False, eval_every=4, grad_accum=2)
    return cfg


def _single(cfg: dict) -> Path:
    one = copy.deepcopy(cfg)
    one["run_name"] = "single"
    one["train"]["grad_accum"] = 1  # same global batch of 8, no accumulation
    return lmtune.train(one).run_dir


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(ddp_config, tmp_path):
    cfg = {**ddp_config, "run_name": "ddp"}
    out = _launch(tmp_path, cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(cfg["output_dir"]) / "ddp"
    single = _single(ddp_config)
    assert _max_diff(_weights(run_dir), _weights(single)) < 1e-5
    hist = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (single / "history.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in hist if "train_loss" in h]
    assert losses == pytest.approx([h["train_loss"] for h in ref if "train_loss" in h], abs=1e-5)  # global, not one shard's
    assert len(list((run_dir / "checkpoints").glob("step-*"))) >= 1  # saved once, by the main process
    assert (run_dir / "train.log").read_text().count("learning rates:") == 1


def test_two_process_run_resumes_after_a_crash_to_the_same_weights(ddp_config, tmp_path):
    cfg = {**ddp_config, "run_name": "crash"}
    crashed = _launch(tmp_path, cfg, crash_at=10)
    assert crashed.returncode != 0
    run_dir = Path(cfg["output_dir"]) / "crash"
    pointer = json.loads((run_dir / "checkpoints" / "pointer.json").read_text())
    assert not (run_dir / "model").exists() and pointer["last"] == "step-000008"  # evaluated every 4 steps
    resumed = _launch(tmp_path, cfg, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = _single(ddp_config)
    assert _max_diff(_weights(run_dir), _weights(single)) < 1e-5
    assert _max_diff(_last_weights(run_dir), _last_weights(single)) < 1e-5  # model/ is the best step, maybe before the crash


def _last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpts = run_dir / "checkpoints"
    return load_file(str(ckpts / json.loads((ckpts / "pointer.json").read_text())["last"] / "model.safetensors"))


def test_two_process_resume_with_dropout_restores_each_ranks_random_state(ddp_config, tmp_path):
    """The ranks' random states drift apart (here rank 1 draws extra numbers between checkpoints, as
    sampling or augmentation on one shard would): a resumed run equals an uninterrupted one, dropout on,
    only if every rank gets its own random state back, not the main process's."""
    cfg = copy.deepcopy(ddp_config)
    cfg["model"]["dropout"] = 0.1
    whole = _launch(tmp_path, {**cfg, "run_name": "whole"}, draw=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = _launch(tmp_path, {**cfg, "run_name": "again"}, crash_at=10, draw=True)
    assert crashed.returncode != 0
    resumed = _launch(tmp_path, {**cfg, "run_name": "again"}, resume=True, draw=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = Path(cfg["output_dir"])
    # the last checkpoint, not model/ (the best one by dev, which may predate the crash)
    assert _max_diff(_last_weights(out / "whole"), _last_weights(out / "again")) < 1e-5


def test_an_fsdp_run_on_two_cpu_processes_saves_a_consolidated_model_that_from_pretrained_loads(ddp_config, tmp_path):
    """As `accelerate launch` with examples/accelerate/fsdp.yaml asks (ACCELERATE_USE_FSDP): each
    process holds half of each weight, yet the math is one process's with the same global batch, and
    the checkpoints and model/ hold whole weights."""
    from transformers import AutoModelForSequenceClassification
    cfg = {**ddp_config, "run_name": "fsdp"}
    out = _launch(tmp_path, cfg, env={"ACCELERATE_USE_FSDP": "true"}, crash_at=10)
    assert out.returncode != 0
    resumed = _launch(tmp_path, cfg, env={"ACCELERATE_USE_FSDP": "true"}, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = Path(cfg["output_dir"]) / "fsdp"
    assert "FSDP: the model is sharded over 2 processes" in (run_dir / "train.log").read_text()
    single = _single(ddp_config)
    assert _max_diff(_last_weights(run_dir), _last_weights(single)) < 1e-5  # crashed at 10, resumed from 8: same
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    plain = dict(model.state_dict())
    saved = _weights(run_dir)
    assert saved.keys() <= plain.keys() and all(saved[k].shape == plain[k].shape for k in saved)
    assert _max_diff(saved, _weights(single)) < 1e-5


def test_fsdp_asked_for_in_one_process_trains_unsharded_and_says_so(tiny_config, caplog):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=2, fsdp="on", calibrate=False)
    with caplog.at_level("WARNING", logger="lmtune"):
        run = lmtune.train(cfg)
    assert "train.fsdp on: one process has nothing to shard" in caplog.text
    assert (run.run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["ddp", "multi_node", "fsdp"])
def test_the_documented_accelerate_configs_parse_into_the_launch_they_promise(name):
    """docs/multi-gpu.md's `accelerate launch --config_file examples/accelerate/NAME.yaml -m lmtune train CONFIG`:
    accelerate reads each example and turns it into torchrun's arguments and environment (what it
    would start, without starting it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    root = Path(__file__).resolve().parent.parent
    config = root / "examples" / "accelerate" / f"{name}.yaml"
    assert f"`examples/accelerate/{name}.yaml`" in (root / "docs" / "multi-gpu.md").read_text()
    argv = ["--config_file", str(config), *(["--machine_rank", "1"] if name == "multi_node" else []),
            "-m", "lmtune", "train", "cfg.yaml"]
    args = _validate_launch_command(launch_command_parser().parse_args(argv))[0]
    assert args.module and args.training_script == "lmtune" and args.training_script_args == ["train", "cfg.yaml"]
    env = prepare_multi_gpu_env(args)
    if name == "multi_node":  # 2 nodes x 8 processes; this is node 1, meeting node 0 at its address
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
        assert "10.0.0.1" in f"{getattr(args, 'master_addr', '')}{getattr(args, 'rdzv_endpoint', '')}"
    elif name == "fsdp":  # full state dicts: checkpoints and model/ stay plain safetensors
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    else:
        assert args.multi_gpu and int(args.num_processes) == 8 and "ACCELERATE_USE_FSDP" not in env
