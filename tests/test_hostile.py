"""Hostile HTTP traffic against a real `lmtune serve` process (uvicorn on a free localhost port, as
users run it): a poisoned batch, slow clients, oversize chunked bodies, the key checked before the
body is parsed, and unicode edge cases. Issue 17, defects 1, 2, 11 and 12."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

import lmtune
from lmtune.cli import main
from lmtune.serve.batcher import Batcher
from tests.conftest import toy_rows, write_csv

KEY = "hostile-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model) -> str:
    d = tmp_path_factory.mktemp("hostile")
    run = lmtune.train({"output_dir": str(d), "run_name": "h",
                        "data": {"train": str(write_csv(d / "train.csv", toy_rows(64, 1))),
                                 "dev": str(write_csv(d / "dev.csv", toy_rows(16, 2))), "max_length": 32},
                        "model": {"name": tiny_model}, "train": {"max_steps": 2, "batch_size": 8, "progress": "none"}})
    return str(run.run_dir)


class Server:
    def __init__(self, run_dir: str, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(run_dir).parent / f"serve-{self.port}.log"
        env = {**os.environ, "LMTUNE_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lmtune", "serve", run_dir, "--port", str(self.port), "--backend",
                                      "torch", "--max-wait-ms", "20", *flags], env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start:\n" + self.log.read_text())

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.log.read_text()


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--header-timeout", "1.5", "--body-timeout", "1.5", "--max-connections", "40")
    yield s
    s.stop()


def _raw_post(port: int, body: bytes, headers: dict[str, str], chunked: bool = False) -> tuple[int, dict, bytes]:
    """A request as raw bytes (httpx would refuse to send invalid UTF-8 or a lone surrogate)."""
    head = ["POST /v1/predict HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096]) for i in range(0, len(body), 4096)) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_raw, _, rest = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), hdrs, rest


def test_poisoned_request_gets_its_own_4xx_and_its_batch_mates_200(server):
    lone = b'{"texts": ["\xed\xa0\x80"]}'  # a lone surrogate as raw bytes
    escaped = b'{"texts": ["fine", "\\ud800"]}'
    good = [{"texts": [f"the food was {w}"]} for w in ("great", "awful", "fine") * 10]
    with ThreadPoolExecutor(32) as pool:
        bad = [pool.submit(_raw_post, server.port, b, AUTH) for b in (lone, escaped)]
        ok = [pool.submit(httpx.post, server.url + "/v1/predict", json=g, headers=AUTH, timeout=60) for g in good]
        for f in bad:
            status, hdrs, body = f.result()
            assert status == 422 and "x-request-id" in hdrs, (status, body)
            assert b"lone surrogate" in body
        assert [f.result().status_code for f in ok] == [200] * len(good)
    with httpx.Client(headers=AUTH, timeout=30) as c:  # the keep-alive connection survives a refused request
        assert c.post(server.url + "/v1/predict", content=escaped, headers={"content-type": "application/json"}).status_code == 422
        assert c.post(server.url + "/v1/predict", json={"texts": ["still here"]}).status_code == 200


def test_a_failing_batch_does_not_fail_its_other_requests():
    def predict(texts):
        if any(t == "boom" for t in texts):
            raise RuntimeError("the model cannot take this")
        return [{"label": t} for t in texts]

    async def scenario():
        b = Batcher(predict, max_batch_size=64, max_wait_ms=50)
        b.start()
        jobs = [b.submit([f"t{i}"]) for i in range(10)] + [b.submit(["boom"]), b.submit(["x", "y"])]
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(scenario())
    assert isinstance(out[10], RuntimeError)
    assert out[:10] == [[{"label": f"t{i}"}] for i in range(10)] and out[11] == [{"label": "x"}, {"label": "y"}]


def test_slow_clients_are_cut_off_and_healthz_keeps_answering(server):
    socks = []
    for _ in range(50):  # more than --max-connections 40: the oldest waiting ones are dropped to make room
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # a partial head, then silence
        socks.append(s)
    stop = threading.Event()

    def dribble():  # one byte per socket every 0.25 s, like a slowloris
        while not stop.is_set():
            for s in socks:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            time.sleep(0.25)

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            r = httpx.get(server.url + "/healthz", timeout=5)
            assert r.status_code == 200 and time.perf_counter() - t0 < 2
            time.sleep(0.2)
        time.sleep(2.5)  # past the 1.5 s header timeout: every slow socket is closed by the server
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                closed += s.recv(1024) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(socks)
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_slow_body_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n{\"texts\"".encode())
        s.settimeout(5)
        t0 = time.perf_counter()
        data = s.recv(1024)
        assert time.perf_counter() - t0 < 4.5 and (data == b"" or b"HTTP/1.1" in data)


def test_oversize_chunked_body_is_413(server):
    big = json.dumps({"texts": ["word " * 1000] * 300}).encode()  # 1.5 MB, over the 1 MB default
    status, hdrs, body = _raw_post(server.port, big, AUTH, chunked=True)
    assert status == 413 and "x-request-id" in hdrs, body[:200]
    status, _, _ = _raw_post(server.port, json.dumps({"texts": ["a small one"]}).encode(), AUTH, chunked=True)
    assert status == 200


def test_key_is_checked_before_the_body_is_parsed(server):
    assert _raw_post(server.port, b"{not json", {})[0] == 401
    assert _raw_post(server.port, b"{not json", {"Authorization": "Bearer wrong-key-0123456789"})[0] == 401
    assert _raw_post(server.port, b"x" * 2_000_000, {})[0] == 401  # no key: not even the size is looked at
    assert _raw_post(server.port, b"{not json", AUTH)[0] == 422


@pytest.mark.parametrize("text,status", [("line\u2028separator", 200), ("مرحبا بالعالم", 200), ("\u202eevil\u202c text", 200),
                                         ("\x00\x00", 422), ("\u200b\u200c\u200d", 422), ("   ", 422), ("a\x00b", 200)])
def test_unicode_edge_cases(server, text, status):
    r = httpx.post(server.url + "/v1/predict", json={"texts": [text]}, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")


def test_log_keeps_status_latency_and_ids_and_never_the_texts(run_dir):
    s = Server(run_dir)
    try:
        r = httpx.post(s.url + "/v1/predict", json={"texts": ["call +1 (415) 555-0134 about my order"]}, headers=AUTH, timeout=30)
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
    finally:
        log = s.stop()
    lines = [line for line in log.splitlines() if f"id={rid}" in line]
    assert len(lines) == 1 and " 200 " in lines[0] and lines[0].split()[-2].endswith("ms"), log
    assert "<phone>" not in log and "127.0.0.1" in log  # the bind address is not mistaken for a phone number
    assert "555-0134" not in log and "my order" not in log


def test_no_auth_on_a_public_host_needs_insecure(run_dir, capsys):
    assert main(["serve", run_dir, "--host", "0.0.0.0", "--no-auth"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_a_model_error_is_one_500_with_its_id_and_the_log_never_quotes_the_text(run_dir, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    from lmtune.api import Run
    from lmtune.serve.app import ServeSettings, create_app
    real = Run.predict

    def failing(self, texts):
        if any("secret" in t for t in texts):
            raise ValueError(f"cannot tokenize {texts}")  # an error message that quotes the user's text
        return real(self, texts)

    monkeypatch.setattr(Run, "predict", failing)
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    with caplog.at_level(logging.INFO), TestClient(create_app(ServeSettings(run_dir=run_dir, backend="torch"))) as client:
        bad = client.post("/v1/predict", json={"texts": ["my secret order 4411"]}, headers=AUTH)
        good = client.post("/v1/predict", json={"texts": ["fine words"]}, headers=AUTH)
    assert bad.status_code == 500 and bad.json()["request_id"] == bad.headers["x-request-id"]
    assert good.status_code == 200
    assert "ValueError" in caplog.text and "secret" not in caplog.text and "4411" not in caplog.text


PLANTED_PASSWORD, PLANTED_TOKEN = "Planted-Pw-4711", "planted-tok-9876"


def test_no_planted_password_or_token_in_any_artifact_of_a_run(tiny_config, monkeypatch, caplog):
    """Issue 46, defect 8: a database password and a URL token in the config never reach a file of
    the run (config.yaml, model/lmtune.json that `lmtune push` uploads, report, results), the MLflow
    store (params) or the log; the config in memory keeps them for use."""
    from mlflow.tracking import MlflowClient

    from lmtune.artifacts import comparable
    from lmtune.config import build_config
    storage = f"postgresql://lmtune:{PLANTED_PASSWORD}@db.internal:5432/studies"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's local store, inside the output folder
    cfg = {**tiny_config, "tune": {"storage": storage},
           "retrieval": {"corpus": f"https://data.example/corpus.jsonl?token={PLANTED_TOKEN}&part=1"}}
    cfg["train"] = {**cfg["train"], "epochs": 2, "trackers": ["mlflow"]}
    caplog.set_level(logging.DEBUG)
    run = lmtune.train(cfg)
    assert run.config.tune.storage == storage
    out = Path(tiny_config["output_dir"])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name == "mlflow.db" for p in files)
    leaked = [str(p) for p in files if PLANTED_PASSWORD.encode() in p.read_bytes() or PLANTED_TOKEN.encode() in p.read_bytes()]
    assert not leaked
    assert PLANTED_PASSWORD not in caplog.text and PLANTED_TOKEN not in caplog.text
    # masked, not dropped: a reader still sees which database and which file
    meta = json.loads((Path(run.run_dir) / "model" / "lmtune.json").read_text())
    assert meta["config"]["tune"]["storage"] == "postgresql://lmtune:***@db.internal:5432/studies"
    assert meta["config"]["retrieval"]["corpus"] == "https://data.example/corpus.jsonl?token=***&part=1"
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    mlrun = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])[0]
    assert mlrun.data.params["tune.storage"] == "postgresql://lmtune:***@db.internal:5432/studies"
    # --resume compares the saved (masked) config with the given one: the same config still matches
    assert comparable(build_config(cfg)) == comparable(build_config(yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text())))


@pytest.mark.parametrize("text, masked", [
    ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
    ("postgresql+psycopg2://u:p@ss@h:5432/db?sslmode=require", "postgresql+psycopg2://u:***@h:5432/db?sslmode=require"),
    ("https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://s3.example/f?X-Amz-Signature=abc&X-Amz-Credential=def&v=1", "https://s3.example/f?X-Amz-Signature=***&X-Amz-Credential=***&v=1"),
    ("host=db dbname=x password=sekret user=u", "host=db dbname=x password=*** user=u"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
    ("Label each token: PER or LOC", "Label each token: PER or LOC"),  # prose (an instruction) is left alone
    ("mail a@b.com about max_new_tokens=5", "mail a@b.com about max_new_tokens=5"),
])
def test_redact_masks_credentials_and_leaves_the_rest(text, masked):
    from lmtune.redact import redact
    assert redact(text) == masked
    assert redact({"hub_token": "hf_x", "api_key": "k", "max_new_tokens": 5, "nested": [text]}) == \
        {"hub_token": "***", "api_key": "***", "max_new_tokens": 5, "nested": [masked]}
