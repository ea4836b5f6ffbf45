"""`lmtune ui`'s runs page with 200 runs: how long until it is rendered, on this machine.

One real run (the bundled demo config, packaged MiniLM, 1 epoch) is trained and copied to 200 run
directories (each a complete run folder: config, metrics, results, history, model). The UI serves
them through uvicorn; measured: the server's time for GET / (median of 5), and in headless Chromium
(Debian's chromium + chromium-driver through Selenium) the time from navigation start to the load
event (median of 5). The target is 1 s; the ratio printed is against it.

Last line JSON: {"runs_page_200": {"server_ms": S, "browser_load_ms": B, "rows": N}}
Usage: python bench/ui.py [--runs 200]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtune import train  # noqa: E402
from lmtune.ui.app import UiSettings, create_ui  # noqa: E402

DEMO = ROOT / "lmtune" / "demo" / "demo.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ns = ap.parse_args()
    import uvicorn
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        run = train(str(DEMO), {"output_dir": str(runs), "run_name": "run-000", "train.epochs": 1, "train.progress": "none"})
        for i in range(1, ns.runs):  # hard links: 200 copies of the weights and checkpoints would fill the disk
            shutil.copytree(run.run_dir, runs / f"run-{i:03d}", copy_function=os.link)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_ui(UiSettings(runs_dir=str(runs), workdir=tmp)), host="127.0.0.1",
                                               port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        server_ms = []
        for _ in range(5):
            t0 = time.perf_counter()
            body = urllib.request.urlopen(url).read().decode()
            server_ms.append(1000 * (time.perf_counter() - t0))
        rows = body.count("<tr data-run=")
        browser_ms = browser_load(url)
        server.should_exit = True
    s_ms = statistics.median(server_ms)
    print(f"runs page with {rows} runs: server {s_ms:.0f} ms (median of 5); Chromium navigation to load event "
          f"{browser_ms:.0f} ms (median of 5); {browser_ms / 1000:.2f}x the 1 s target", flush=True)
    print(json.dumps({"runs_page_200": {"server_ms": round(s_ms, 1), "browser_load_ms": round(browser_ms, 1), "rows": rows}}))


def browser_load(url: str) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts)
    try:
        times = []
        for _ in range(5):
            b.get(url)  # returns after the load event
            t = b.execute_script("const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;")
            times.append(float(t))
        return statistics.median(times)
    finally:
        b.quit()


if __name__ == "__main__":
    main()
