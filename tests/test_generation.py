"""task generation on a tiny random Llama (and GPT-2): loss on the response only, packing without
cross-talk, the decoding search, the output checks, predict/reload, and the formats' errors."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import InputError
from lmtune.generate_control import (
    ResponsePenalties,
    candidates,
    choose_setting,
    distinct,
    has_loop,
    invented,
    passes,
    rouge,
)
from lmtune.tasks import get_task
from lmtune.tasks.generation import pack
from lmtune.training.loop import inputs
from lmtune.training.optim import resolve_learning_rates
from tests.conftest import toy_rows
from tests.test_decoders import save_tiny_decoder
from tests.fuzz import fuzz_openapi

SUMMARY = {"pos": "the food was great", "neg": "the service was awful"}


def _save_tiny(path: Path, kind: str = "llama") -> str:
    return save_tiny_decoder(path, kind, positions=256)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-gen"))


def _rows(n: int, seed: int) -> list[dict]:
    return [{"text": t, "summary": SUMMARY[label]} for t, label in toy_rows(n, seed)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cfg(tmp_path: Path, model: str, **generate) -> dict:
    data = {k: _write(tmp_path / f"{k}.jsonl", _rows(n, s)) for k, n, s in (("train", 240, 1), ("dev", 32, 2), ("test", 32, 3))}
    return {"task": "generation", "output_dir": str(tmp_path / "runs"), "run_name": "gen", "model": {"name": model},
            "data": {**data, "label_column": "summary", "max_length": 128},
            "generate": {"instruction": "", "max_new_tokens": 12, "search_trials": 2, "search_examples": 16, **generate},
            "peft": {"method": "none"},
            "train": {"epochs": 8, "lr": 1e-2, "progress": "none", "seed": 1}}


def test_task_defaults_are_lora_and_long_inputs_unless_set():
    cfg = build_config({"task": "generation"})
    assert (cfg.peft.method, cfg.data.max_length, cfg.train.batch_size) == ("lora", 1024, 8)
    assert cfg.train.lr is None  # left to the PEFT method's default (LoRA 1e-3)
    lrs = resolve_learning_rates(cfg.train, torch.nn.Linear(1, 1), cfg.peft.method)
    assert (lrs.lr, lrs.head_lr) == (1e-3, 1e-3)
    cfg = build_config({"task": "generation", "peft": {"method": "none"}, "data": {"max_length": 256}})
    assert (cfg.peft.method, cfg.data.max_length) == ("none", 256)
    assert build_config({}).peft.method == "none"  # other tasks keep theirs


def _plain_cfg():
    return build_config({"task": "generation", "data": {"label_column": "summary"}, "generate": {"instruction": ""}})


def _tiny_task(tmp_path: Path, kind: str, rows: list[dict]):
    """The generation task, a tiny random decoder of `kind` and the rows read as source -> summary."""
    task = get_task("generation")
    task.format, task.instruction = "source_target", ""
    model, tok = task.load_model(Path(_save_tiny(tmp_path / kind, kind)))
    return task, model, tok, task.read_file(_write(tmp_path / "d.jsonl", rows), _plain_cfg())


def _batch(task, tokenizer, examples, max_length=128, packed=False):
    enc = task.encode(examples, tokenizer, max_length)
    features = pack(enc.features, max_length) if packed else enc.features
    return enc, task.collate(features, tokenizer)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_is_on_response_tokens_only_and_equals_full_logits(tmp_path, kind):
    """The LM head runs only where a target is (logits_to_keep): the summed loss equals the cross-entropy
    of the full logits at the response positions, and the prompt's tokens cost nothing."""
    task, model, tok, examples = _tiny_task(tmp_path, kind, _rows(6, 4))
    enc, batch = _batch(task, tok, examples)
    loss = task.loss(model(**inputs(batch)), batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = 0.0
    for i, f in enumerate(enc.features):
        p, L = f["prompt_length"], f["length"]
        target = torch.tensor(f["input_ids"][p:L])
        manual += torch.nn.functional.cross_entropy(full[i, p - 1:L - 1].float(), target, reduction="sum")
        assert tok.decode(f["input_ids"][p:L], skip_special_tokens=True).strip() == examples[i].label
    assert torch.allclose(loss, manual, rtol=1e-4), (loss, manual)
    assert task.num_items(enc.features) == int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packing_keeps_examples_apart(tmp_path, kind):
    """Packed rows (position ids restarting, no attention mask) give every example the same loss as
    alone: attention does not cross examples."""
    task, model, tok, examples = _tiny_task(tmp_path, kind, _rows(8, 5))
    enc, plain = _batch(task, tok, examples)
    assert enc.stats["truncated"] == 0
    packed_rows = pack(enc.features, 200)
    assert len(packed_rows) < len(enc.features)
    packed = task.collate(packed_rows, tok)
    assert "attention_mask" not in packed
    alone = torch.stack([task.loss(model(**inputs(b)), b) for f in enc.features for b in [task.collate([f], tok)]])
    plain_losses = task.example_losses(model(**inputs(plain)), plain)
    assert torch.allclose(plain_losses, alone, atol=1e-3)
    order = [i for r in packed_rows for i in r["examples"]]
    packed_losses = _per_example(task, model, packed, packed_rows)
    assert torch.allclose(packed_losses, alone[order], atol=1e-4)
    # the same rows attending across examples (a full mask) come out 10x further off: the check can fail
    leaky = {**packed, "attention_mask": torch.ones_like(packed["input_ids"])}
    off = (_per_example(task, model, leaky, packed_rows) - alone[order]).abs().max()
    assert off > 10 * (packed_losses - alone[order]).abs().max() and off > 1e-4
    assert task.num_items(packed_rows) == task.num_items(enc.features)


def _per_example(task, model, batch, rows) -> torch.Tensor:
    """Each packed example's summed target loss, in packing order."""
    targets = batch["labels"][batch["logits_to_keep"]]
    logits = model(**inputs(batch)).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    where = batch["logits_to_keep"].nonzero()
    out = []
    for r, row in enumerate(rows):
        bounds = [*row["starts"], row["length"]]
        for a, b in zip(bounds, bounds[1:]):
            sel = (where[:, 0] == r) & (where[:, 1] >= a) & (where[:, 1] < b)
            out.append(per_token[sel].sum())
    return torch.stack(out)


def test_generation_run_learns_searches_decoding_and_saves_outputs(tmp_path, tiny_llama):
    run = lmtune.train(_cfg(tmp_path, tiny_llama, packing=True))
    test = run.metrics["test"]
    assert test["rougeL"] >= 0.9 and test["exact_match"] >= 0.8, test
    assert test["repeat_share"] == 0.0 and test["truncated_share"] <= 0.1
    g = json.loads((run.run_dir / "generation.json").read_text())
    assert len(g["search"]["trials"]) == 3 and g["search"]["trials"][0]["settings"] == {}
    assert g["decoding"] == g["search"]["chosen"] and g["splits"]["test"]["rougeL"] == test["rougeL"]
    rows = [json.loads(x) for x in (run.run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all({"prompt", "output", "references"} <= set(r) for r in rows)
    report = (run.run_dir / "report.md").read_text()
    assert "### Generation" in report and "Decoding used by predict and serve" in report
    # predict generates with the saved decoding; a reloaded run gives the same outputs
    out = run.predict(["the food was great really", "it was awful"])
    assert [r["output"] for r in out] == [SUMMARY["pos"], SUMMARY["neg"]]
    again = lmtune.load(run.run_dir)
    assert again.task.decoding == run.task.decoding
    assert [r["output"] for r in again.predict(["the food was great really", "it was awful"])] == [r["output"] for r in out]
    assert again.evaluate(tmp_path / "test.jsonl")["rougeL"] == pytest.approx(test["rougeL"])


def test_lora_generation_run_reloads_from_its_adapter(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, search_trials=0)
    cfg["peft"] = {"method": "lora", "r": 8}
    cfg["train"]["epochs"] = 2
    run = lmtune.train(cfg)
    assert (run.run_dir / "model" / "adapter_model.safetensors").is_file()
    assert not any("lm_head" in k for k in json.loads((run.run_dir / "model" / "adapter_config.json").read_text())
                   .get("modules_to_save") or [])
    out = run.predict(["the food was great"])
    assert out[0]["output"] == lmtune.load(run.run_dir).predict(["the food was great"])[0]["output"]
    # merged into its base for export: a plain causal LM that generates the same
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(run.run_dir), str(merged_dir)]) == 0
    model, tok = run.task.load_model(merged_dir)
    assert not any("lora" in k for k in model.state_dict())
    again = run.task.generate(model, tok, run.task.from_texts(["the food was great"]), torch.device("cpu"), progress="none")
    assert again[0]["text"] == out[0]["output"]


def test_predict_cli_generates(tmp_path, tiny_llama, capsys):
    cfg = _cfg(tmp_path, tiny_llama, search_trials=0)
    cfg["train"]["epochs"] = 1
    run = lmtune.train(cfg)
    assert main(["predict", str(run.run_dir), "--text", "the food was great"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) >= {"output", "tokens", "finished"}


def test_formats_chat_and_instruction_and_their_errors(tmp_path):
    task = get_task("generation")
    cfg = build_config({"task": "generation"})
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello."}]}])
    ex = task.read_file(chat, cfg)[0]
    assert task.format == "chat" and ex.label == "Hello." and [m["role"] for m in ex.messages] == ["system", "user"]
    alpaca = _write(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    ex = task.read_file(alpaca, cfg)[0]
    assert task.format == "instruction" and ex.label == "5" and "2 and 3" in ex.messages[0]["content"]
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                                          {"messages": [{"role": "robot", "content": "Hi"}]}])
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: 'messages' must be"):
        task.read_file(bad, cfg)
    missing = _write(tmp_path / "missing.jsonl", [{"instruction": "Add", "output": "5"}, {"instruction": "Sub"}])
    with pytest.raises(InputError, match=r"missing.jsonl: line 2: no target"):
        task.read_file(missing, cfg)
    # test files with several references: all are kept for ROUGE
    multi = _write(tmp_path / "multi.jsonl", [{"dialogue": "A: hi", "summary1": "x", "summary2": "y"}])
    cfg = build_config({"task": "generation", "data": {"text_column": "dialogue", "label_column": "summary"},
                        "generate": {"reference_columns": ["summary1", "summary2"]}})
    assert task.read_file(multi, cfg)[0].references == ["x", "y"]


def test_output_checks():
    assert has_loop("the cat sat the cat sat the cat sat on the mat")
    assert has_loop("no no no no")
    assert not has_loop("#Person1# asks #Person2# to book a table for two at seven; #Person2# agrees.")
    assert distinct(["a b a b"], 1) == 0.5
    assert invented("Tom paid 40 dollars to Mary.", ["#Person1#: Mary, here are 40 dollars.", "Someone pays Mary."]) == ["Tom"]
    r = rouge([["the cat sat on the mat", "a dog"]], ["the cat sat on a mat"])
    assert 0.8 < r["rougeL"] < 1.0
    assert rouge([["今天天气很好"]], ["今天天气不错"])["rougeL"] == pytest.approx(2 * (4 / 6) * (4 / 6) / (8 / 6))


def test_label_set_constrains_an_untrained_model(tmp_path, tiny_llama):
    """Constrained decoding: even a random model's outputs are one of the labels."""
    task = get_task("generation")
    task.format, task.instruction, task.label_set = "source_target", "", ["the food was great", "the service was awful"]
    model, tok = task.load_model(Path(tiny_llama))
    examples = task.from_texts([t for t, _ in toy_rows(6, 9)])
    out = task.generate(model, tok, examples, torch.device("cpu"), max_new_tokens=12, progress="none")
    assert all(o["text"] in task.label_set for o in out), out
    assert task.constraint.choices == tuple(task.label_set)  # the same constraint as generate.choices (tests/test_structured.py)


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, tiny_llama) -> lmtune.Run:
    tmp = tmp_path_factory.mktemp("gen-run")
    cfg = _cfg(tmp, tiny_llama, search_trials=0)
    cfg["train"]["epochs"] = 6
    return lmtune.train(cfg)


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_generate_endpoint_streams_tokens_with_auth_and_limits(gen_run, monkeypatch):
    from fastapi.testclient import TestClient

    from lmtune.serve.app import ServeSettings, create_app
    monkeypatch.setenv("LMTUNE_API_KEYS", "k-123-long-enough-key")
    app = create_app(ServeSettings(run_dir=str(gen_run.run_dir), backend="torch", max_new_tokens=5, max_chars=100))
    auth = {"Authorization": "Bearer k-123-long-enough-key"}
    with TestClient(app) as client:
        assert client.post("/v1/generate", json={"text": "the food was great"}).status_code == 401
        assert client.post("/v1/generate", json={"text": "x" * 101}, headers=auth).status_code == 413
        assert client.post("/v1/generate", json={"text": "  "}, headers=auth).status_code == 422
        with client.stream("POST", "/v1/generate", json={"text": "the food was great", "max_new_tokens": 50},
                           headers=auth) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _events(r.read().decode())
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and kinds.count("token") >= 2, events
        done = events[-1][1]
        # the server caps max_new_tokens; the streamed pieces add up to the final output
        assert done["tokens"] <= 5 and not done["finished"]
        assert "".join(d["text"] for k, d in events if k == "token").strip() == done["output"]
        whole = client.post("/v1/generate", json={"text": "the food was great", "stream": False, "max_new_tokens": 50},
                            headers=auth).json()
        assert whole["output"] == done["output"] and whole["tokens"] == done["tokens"]
        full = gen_run.predict(["the food was great"])[0]["output"]
        assert full.startswith(done["output"])
        assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
        # /v1/predict answers generation runs too, without echoing the prompt
        p = client.post("/v1/predict", json={"texts": ["the food was great"]}, headers=auth).json()["predictions"][0]
        assert p["output"] == full and "prompt" not in p


def test_chat_streams_replies_and_keeps_the_conversation(gen_run, monkeypatch, capsys):
    lines = iter(["the food was great", "it was awful", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = lmtune.Run.generate_examples

    def spy(self, examples, *a, **kw):
        seen.append([m["role"] for m in examples[0].messages])
        return real(self, examples, *a, **kw)
    monkeypatch.setattr(lmtune.Run, "generate_examples", spy)
    assert main(["chat", str(gen_run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and SUMMARY["pos"] in out
    assert seen == [["user"], ["user", "assistant", "user"]]


def test_decoding_candidates_and_checks():
    c = candidates(seed=3, trials=6, cap=64, reference_tokens=[20, 30, 32, 34, 40])
    assert c[0] == {} and len(c) == 7 and len({json.dumps(x, sort_keys=True) for x in c}) == 7
    assert c == candidates(seed=3, trials=6, cap=64, reference_tokens=[20, 30, 32, 34, 40])  # seeded
    assert {x.get("max_new_tokens", 64) for x in c} <= {64, 48, 37}
    looping = {"repeat_share": 0.3, "length_ratio": 1.1, "truncated_share": 0.1}
    clean = {"repeat_share": 0.02, "length_ratio": 1.2, "truncated_share": 0.1}
    long = {"repeat_share": 0.0, "length_ratio": 3.0, "truncated_share": 0.9}
    assert passes(clean, [looping, clean, long]) and not passes(looping, [looping, clean, long])
    assert not passes(long, [looping, clean, long])
    # when nothing reaches a bound, the best tried sets it
    assert passes(looping, [looping, {**looping, "repeat_share": 0.28}])
    inventive = {**clean, "invented_share": 0.5}
    assert not passes(inventive, [inventive, {**clean, "invented_share": 0.2}])  # invents more than another setting
    assert passes({**clean, "invented_share": 0.25}, [inventive, {**clean, "invented_share": 0.2}])
    # when no setting passes every check (each bound set by a different setting), the fewest failures win, not greedy
    rows = [{"settings": {}, "rougeL": 0.172, "repeat_share": 0.375, "length_ratio": 2.1, "truncated_share": 0.9, "invented_share": 0.0},
            {"settings": {"a": 1}, "rougeL": 0.194, "repeat_share": 0.1, "length_ratio": 1.9, "truncated_share": 0.8, "invented_share": 0.0},
            {"settings": {"b": 1}, "rougeL": 0.191, "repeat_share": 0.0, "length_ratio": 1.6, "truncated_share": 0.875, "invented_share": 0.0},
            {"settings": {"c": 1}, "rougeL": 0.179, "repeat_share": 0.025, "length_ratio": 1.4, "truncated_share": 0.5,
             "invented_share": 0.325}]
    best = choose_setting(rows)
    assert best["settings"] == {"b": 1} and best["failed"] == ["truncated_share"]
    assert rows[0]["failed"] == ["repeat_share", "length_ratio", "truncated_share"] and not any(r["passed"] for r in rows)
    # under a constraint, a length cap that leaves fewer outputs valid loses to one that keeps them all valid
    cut = {**clean, "valid": 0.7}
    whole = {**clean, "valid": 1.0}
    assert not passes(cut, [cut, whole]) and passes(whole, [cut, whole])
    assert choose_setting([{"settings": {"max_new_tokens": 40}, "rougeL": 0.3, **cut},
                           {"settings": {}, "rougeL": 0.25, **whole}])["settings"] == {}
    # ... even when the one that keeps them valid fails another check (loops) and the cut one fails only validity
    assert choose_setting([{"settings": {}, "rougeL": 0.39, **whole, "repeat_share": 0.225},
                           {"settings": {"max_new_tokens": 84}, "rougeL": 0.40, **{**cut, "valid": 0.975}}])["settings"] == {}


def test_repetition_controls_leave_the_prompt_out():
    """The repetition penalty looks at the generated tokens only, and the n-gram block at generated
    n-grams the prompt does not hold: a prompt's n-gram may be copied (again and again), a token seen
    only in the prompt keeps its logit; transformers' own n-gram processor, given the same ids, bans the copy."""
    from transformers import NoRepeatNGramLogitsProcessor
    prompt, generated = [5, 6, 7, 5], [9, 9, 8, 9]  # prompt "5 6" ends with 5; the answer has said "9 8" ... "9"
    ids = torch.tensor([prompt + generated])
    scores = torch.tensor([[2.0] * 10])
    out = ResponsePenalties(start=len(prompt), ngram=2)(ids, scores.clone())
    assert out[0, 8] == float("-inf") and out[0, 9] == float("-inf")  # "9 8" and "9 9" were generated
    assert out[0, 6] == 2.0  # "9 6"? never said: free
    copy = torch.tensor([prompt + [5]])  # the answer starts copying "5 6" from the prompt
    assert ResponsePenalties(start=len(prompt), ngram=2)(copy, scores.clone())[0, 6] == 2.0
    assert NoRepeatNGramLogitsProcessor(2)(copy, scores.clone())[0, 6] == float("-inf")
    again = torch.tensor([prompt + [5, 6, 1, 5]])  # "5 6" copied once already: copying it again is allowed
    assert ResponsePenalties(start=len(prompt), ngram=2)(again, scores.clone())[0, 6] == 2.0
    pen = ResponsePenalties(start=len(prompt), penalty=2.0)(ids, torch.tensor([[2.0] * 8 + [-2.0, 2.0]]))
    assert pen[0, 5] == 2.0 and pen[0, 9] == 1.0 and pen[0, 8] == -4.0  # prompt token untouched; generated ones pushed down
    assert ResponsePenalties.from_settings({"temperature": 0.5}, 4) is None


# ---- streaming over a real server: a dropped client stops the model, a failing model ends the stream ----
@pytest.fixture(scope="module")
def stream_run(tmp_path_factory, tiny_llama) -> str:
    tmp = tmp_path_factory.mktemp("stream-run")
    cfg = _cfg(tmp, tiny_llama, search_trials=0)
    cfg["train"]["epochs"] = 1
    return str(lmtune.train(cfg).run_dir)


class _CountedForward:
    """Llama's forward, counted and slowed to `step_s` a step, its end-of-text logit pushed to -inf so
    a generation runs to max_new_tokens (a real model call each step; only the length is forced).
    With `fail_at`, that call raises, as a model that runs out of memory mid-generation does."""

    def __init__(self, step_s: float, fail_at: int | None = None):
        from transformers import LlamaForCausalLM
        self.real, self.calls, self.step_s, self.fail_at = LlamaForCausalLM.forward, 0, step_s, fail_at

    def install(self, monkeypatch) -> _CountedForward:
        from transformers import LlamaForCausalLM
        monkeypatch.setattr(LlamaForCausalLM, "forward", lambda model, *a, **kw: self(model, *a, **kw))
        return self

    def __call__(self, model, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        time.sleep(self.step_s)
        out = self.real(model, *args, **kwargs)
        out.logits[..., model.config.eos_token_id] = float("-inf")
        return out


@contextlib.contextmanager
def _served(app):
    """The app on a real uvicorn server (lmtune's guarded protocol) on 127.0.0.1, in a thread: a
    client that closes its connection is seen by the server as it is in production."""
    import uvicorn

    from lmtune.serve.protocol import GuardedHttpProtocol
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=GuardedHttpProtocol, log_config=None, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


STREAM_KEY = "k-stream-long-enough-key"


def _stream_app(run_dir: str, monkeypatch, max_new_tokens: int):
    from lmtune.serve.app import ServeSettings, create_app
    monkeypatch.setenv("LMTUNE_API_KEYS", STREAM_KEY)
    return create_app(ServeSettings(run_dir=run_dir, backend="torch", max_new_tokens=max_new_tokens))


def test_a_dropped_stream_stops_the_model_within_two_steps(stream_run, monkeypatch):
    import httpx
    forward = _CountedForward(step_s=0.05).install(monkeypatch)
    app = _stream_app(stream_run, monkeypatch, max_new_tokens=150)  # 150 steps: 7.5 s if nothing stops them
    with _served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/generate", json={"text": "the food was great", "max_new_tokens": 150},
                           headers={"Authorization": f"Bearer {STREAM_KEY}"}) as r:
            assert r.status_code == 200
            time.sleep(0.5)
            assert forward.calls >= 3  # generating
        at_close = forward.calls  # leaving the block closed the connection mid-stream
        time.sleep(1.5)  # 30 more steps if the model kept going
        assert forward.calls - at_close <= 2, (at_close, forward.calls)
        # the gate is free: the next request generates at once, to its end
        monkeypatch.setattr(forward, "step_s", 0.0)
        done = client.post("/v1/generate", json={"text": "the food was great", "max_new_tokens": 5, "stream": False},
                           headers={"Authorization": f"Bearer {STREAM_KEY}"})
        assert done.status_code == 200 and done.json()["tokens"] == 5


def test_a_model_failure_mid_stream_is_an_error_event_within_two_seconds(stream_run, monkeypatch, caplog):
    import httpx
    _CountedForward(step_s=0.02, fail_at=4).install(monkeypatch)
    app = _stream_app(stream_run, monkeypatch, max_new_tokens=50)
    caplog.set_level(logging.INFO, logger="lmtune.serve")
    with _served(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        t0 = time.monotonic()
        r = client.post("/v1/generate", json={"text": "the food was great", "max_new_tokens": 50},
                        headers={"Authorization": f"Bearer {STREAM_KEY}", "X-Request-Id": "req-failing-1"})
        elapsed = time.monotonic() - t0
    assert r.status_code == 200 and elapsed < 2, elapsed
    events = _events(r.text)
    assert events[-1] == ("error", {"request_id": "req-failing-1", "detail": "generation failed"}), events
    failed = [rec.getMessage() for rec in caplog.records if "generation failed" in rec.getMessage()]
    assert len(failed) == 1 and "req-failing-1" in failed[0] and "RuntimeError" in failed[0], failed
    assert not any("the food was great" in rec.getMessage() for rec in caplog.records)


def test_fuzzing_the_generation_servers_schema_gives_no_5xx(stream_run, monkeypatch):
    """schemathesis over the OpenAPI of a generation run's server, /v1/generate and the OpenAI routes (streamed
    and not) included; this run's tokenizer has no chat template, so chat completions are 400s."""

    from lmtune.serve.app import ServeSettings, create_app
    monkeypatch.setenv("LMTUNE_API_KEYS", STREAM_KEY)
    app = create_app(ServeSettings(run_dir=stream_run, backend="torch", max_new_tokens=3, max_chars=200, max_texts=4))
    calls = fuzz_openapi(app, ({"Authorization": f"Bearer {STREAM_KEY}"}, {}), 20,
                         {"/v1/generate", "/v1/predict", "/v1/chat/completions", "/v1/completions", "/healthz", "/readyz", "/metrics"})
    assert ("/v1/generate", 200) in calls and ("/v1/generate", 401) in calls
    assert ("/v1/completions", 200) in calls and ("/v1/chat/completions", 400) in calls
