"""Load test: `lmtune serve` vs a naive FastAPI endpoint that calls a transformers pipeline per
request; same fine-tuned model, same machine, loopback only, one run.

The model: all-MiniLM-L6-v2 fine-tuned by lmtune (1 epoch, seeded 2,000-sentence sample of
../shared/data/sst2 train) and exported (`lmtune export --quantize int8`). Servers (each alone,
one after the other, one uvicorn worker each):
- lmtune: `lmtune serve RUN_DIR` with its defaults (API key auth, dynamic batching, the int8 ONNX
  export it finds in the run);
- lmtune_torch: the same service forced onto the PyTorch model (`--backend torch`), to show what
  batching alone gives;
- naive: FastAPI + `pipeline("text-classification", model=RUN_DIR/model)` called in the endpoint
  for each request (no batching, no auth).
Load: 2,000 requests of one SST-2 dev sentence each from 32 concurrent asyncio clients (aiohttp;
`pip install -e .[bench]`), in this process, on the same 2 cores as the server; the CPU seconds of
the server and of the load generator are printed.
Reported: requests/s over the whole run, p50/p99 latency, errors (anything but HTTP 200), peak
RSS of the server process tree (sampled every 50 ms).

- lmtune_poisoned: the lmtune service again, with 5% of the requests (--poison) carrying a lone
  surrogate as raw bytes: those must get 4xx and every other request 200 (errors counts the
  clean requests that did not get 200).
Last line JSON: {"lmtune": {"rps": X, "p50_ms": L, "p99_ms": L, "errors": N, "peak_rss_mb": M}, "naive": {...},
"lmtune_torch": {...}, "lmtune_poisoned": {..., "poisoned": N, "poisoned_4xx": N}}
Usage: python bench/serve_load.py [--requests 2000] [--clients 32] [--run RUN_DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

SEED = 42
KEY = "bench-key-" + "x" * 24

NAIVE = '''
import sys
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

pipe = pipeline("text-classification", model=sys.argv[1], device="cpu")
app = FastAPI()


class Req(BaseModel):
    texts: list[str]


@app.post("/v1/predict")
def predict(req: Req):
    return {"predictions": pipe(req.texts)}

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_sst2(name: str) -> list[tuple[str, str]]:
    with open(SHARED / "sst2" / name, encoding="utf-8") as fh:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_csv(path: Path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, False

    def run(self) -> None:
        while not self.stop:
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)


POISON = b'{"texts": ["\xed\xa0\x80"]}'  # a lone surrogate as raw bytes: must cost its own request a 4xx, nothing else


async def load(url: str, texts: list[str], n: int, clients: int, headers: dict, poison: float = 0.0) -> tuple[list[float], int, float, dict]:
    # aiohttp, not httpx: the load generator shares the 2 cores with the server under test, and
    # aiohttp's C HTTP parser costs it far less CPU per request than httpx's pure-Python h11
    import aiohttp
    latencies: list[float] = []
    errors = 0
    poisoned = {"sent": 0, "4xx": 0}
    every = round(1 / poison) if poison else 0
    counter = iter(range(n))
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def worker():
            nonlocal errors
            for i in counter:
                bad = bool(every) and i % every == every - 1
                t0 = time.perf_counter()
                try:
                    if bad:
                        poisoned["sent"] += 1
                        async with client.post(url, data=POISON, headers={**headers, "Content-Type": "application/json"}) as r:
                            await r.read()
                            poisoned["4xx"] += 400 <= r.status < 500
                        continue
                    async with client.post(url, json={"texts": [texts[i % len(texts)]]}, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                    if bad:
                        continue
                latencies.append(time.perf_counter() - t0)
                errors += not ok
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - t0, poisoned


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def wait_ready(port: int, proc: subprocess.Popen, path: str) -> None:
    import httpx
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def measure(name: str, cmd: list[str], ready_path: str, texts: list[str], args, headers: dict, env: dict, poison: float = 0.0) -> dict:
    port = free_port()
    cmd = [c if c != "PORT" else str(port) for c in cmd]
    # the server's log goes to a file: an unread pipe fills up (one access-log line per request) and blocks it
    log_file = open(Path(tempfile.gettempdir()) / f"serve_load_{name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        wait_ready(port, proc, ready_path)
        sampler = RssSampler(proc.pid)
        sampler.start()
        url = f"http://127.0.0.1:{port}/v1/predict"
        asyncio.run(load(url, texts, 64, args.clients, headers))  # warm-up, not counted
        server_cpu0, client_cpu0 = _cpu_seconds(proc.pid), time.process_time()
        lat, errors, wall, poisoned = asyncio.run(load(url, texts, args.requests, args.clients, headers, poison))
        server_cpu, client_cpu = _cpu_seconds(proc.pid) - server_cpu0, time.process_time() - client_cpu0
        sampler.stop = True
        sampler.join()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    ms = np.array(lat) * 1000
    out = {"rps": round(args.requests / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
           "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": int(errors), "peak_rss_mb": round(sampler.peak / 2**20, 1)}
    if poison:
        out.update(poisoned=poisoned["sent"], poisoned_4xx=poisoned["4xx"])
        print(f"{name}: {poisoned['sent']} poisoned requests, {poisoned['4xx']} answered 4xx; "
              f"{len(lat)} clean requests, {errors} not 200", flush=True)
    print(f"{name:<13} {out['rps']:7.1f} req/s | p50 {out['p50_ms']:7.1f} ms | p99 {out['p99_ms']:7.1f} ms | "
          f"errors {out['errors']} | peak RSS {out['peak_rss_mb']:.0f} MB ({args.requests} requests, {args.clients} clients, {wall:.1f}s; "
          f"CPU s: server {server_cpu:.1f}, load generator {client_cpu:.1f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--run", help="reuse a fine-tuned (and exported) run directory")
    ap.add_argument("--poison", type=float, default=0.05, help="share of requests with a lone surrogate in the lmtune_poisoned run")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the lmtune service (threads split among them)")
    args = ap.parse_args()
    import lmtune
    from lmtune.export.onnx import export_run
    dev = [t for t, _ in read_sst2("dev.tsv")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.run:
            run_dir = Path(args.run)
        else:
            train = random.Random(SEED).sample(read_sst2("train.tsv"), 2000)
            run_dir = lmtune.train({"output_dir": str(tmp / "runs"), "run_name": "sst2",
                                    "data": {"train": write_csv(tmp / "train.csv", train), "dev": write_csv(tmp / "dev.csv", read_sst2("dev.tsv"))},
                                    "train": {"epochs": 1, "progress": "none", "seed": SEED}}).run_dir
        if not (run_dir / "export" / "model.int8.onnx").is_file():
            export_run(run_dir, quantize="int8")
        (tmp / "naive.py").write_text(NAIVE)
        env = {**os.environ, "LMTUNE_API_KEYS": KEY, "PYTHONPATH": str(ROOT)}
        auth = {"Authorization": f"Bearer {KEY}"}
        result = {}
        lm = [sys.executable, "-m", "lmtune", "serve", str(run_dir), "--port", "PORT", "--workers", str(args.workers)]
        result["lmtune"] = measure("lmtune", lm, "/readyz", dev, args, auth, env)
        result["lmtune_poisoned"] = measure("lmtune_poisoned", lm, "/readyz", dev, args, auth, env, poison=args.poison)
        result["lmtune_torch"] = measure("lmtune_torch", lm + ["--backend", "torch"], "/readyz", dev, args, auth, env)
        result["naive"] = measure("naive", [sys.executable, str(tmp / "naive.py"), str(run_dir / "model"), "PORT"],
                                  "/docs", dev, args, {}, env)
    a, b = result["lmtune"], result["naive"]
    print(f"lmtune vs naive: {a['rps'] / b['rps']:.2f}x requests/s, p99 {a['p99_ms']:.0f} vs {b['p99_ms']:.0f} ms, "
          f"errors {a['errors']} vs {b['errors']}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
