"""The news monitor end to end, against SQLite and a real PostgreSQL server: a synthetic stream of
financial_phrasebank sentences over 48 simulated hours with a negative burst for one company at hour 30;
the alert fires within the burst's first hour, none fires for the calm companies, each alert is
delivered once to a real webhook, and a monitor killed mid-stream and restarted loses and duplicates no item."""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient

import lmtune
from lmtune.apps import monitor as mon
from lmtune.apps.monitor import db
from lmtune.config import DEFAULT_MODEL
from lmtune.errors import InputError
from lmtune.models import resolve_model
from lmtune.serve.app import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
PHRASEBANK = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
COMPANIES = ["Zentrix", "Morvale", "Quorbit", "Velantis", "Hexacore"]
BURST, START = "Zentrix", datetime(2026, 3, 2, 0, 0)
BURST_AT = START + timedelta(hours=30)
KEY = "test-key-0123456789abcdef"

pytestmark = pytest.mark.skipif(not PHRASEBANK.is_file(), reason="../shared/data/financial_phrasebank is not here")


def _sentences() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in PHRASEBANK.read_text(encoding="latin-1").splitlines():
        if "@" in line:
            text, label = line.rsplit("@", 1)
            out.setdefault(label.strip(), []).append(text.strip())
    return out


def _stream(sents: dict[str, list[str]]) -> list[dict]:
    """6 items per company per hour (calm: 95% positive or neutral), and 12 negative items for BURST
    in the half hour after BURST_AT."""
    rng = random.Random(7)
    items = []
    for h in range(48):
        for c in COMPANIES:
            for k in range(6):
                label = "negative" if rng.random() < 0.05 else rng.choice(["positive", "neutral"])
                t = START + timedelta(hours=h, seconds=rng.randrange(3600))
                items.append({"id": f"{c}-{h}-{k}", "time": t.isoformat() + "Z", "text": f"{c} : {rng.choice(sents[label])}"})
    for k in range(12):
        t = BURST_AT + timedelta(seconds=150 * k)
        items.append({"id": f"burst-{k}", "time": t.isoformat() + "Z", "text": f"{BURST} : {rng.choice(sents['negative'])}"})
    return sorted(items, key=lambda r: r["time"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict:
    d = tmp_path_factory.mktemp("monitor_runs")
    sents = _sentences()
    rng = random.Random(3)
    blocks = []
    for i in range(240):  # companies (and not the words after them) are organisations
        words = rng.choice(sents[rng.choice(list(sents))]).split()[:12]
        blocks.append("\n".join([f"{COMPANIES[i % 5]} B-ORG", ": O"] + [f"{w} O" for w in words]))
    (d / "ner.conll").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    ner = lmtune.train({"task": "ner", "output_dir": str(d), "run_name": "ner", "model": {"name": tiny_model},
                        "data": {"train": str(d / "ner.conll"), "dev": str(d / "ner.conll"), "max_length": 48},
                        "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "progress": "none", "seed": 1, "calibrate": False}})
    rows = [(t, lab) for lab, ts in sents.items() for t in ts]
    random.Random(1).shuffle(rows)
    with open(d / "sent.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    sentiment = lmtune.train({"output_dir": str(d), "run_name": "sentiment", "model": {"name": resolve_model(DEFAULT_MODEL)},
                              "data": {"train": str(d / "sent.csv"), "max_length": 64},
                              "train": {"epochs": 2, "batch_size": 32, "progress": "none", "seed": 1}})
    assert sentiment.metrics["test"]["accuracy"] > 0.8
    return {"ner": str(ner.run_dir), "sentiment": str(sentiment.run_dir)}


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", _Hook.received
    server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server from Debian's package, in a temp folder, run as the postgres user."""
    bindir = Path("/usr/lib/postgresql")
    versions = sorted(bindir.glob("*/bin/initdb")) if bindir.is_dir() else []
    if not versions or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) or runuser is missing")
    bin_ = versions[-1].parent
    root = Path(tempfile.mkdtemp(prefix="lmtune-pg-"))
    os.chmod(root, 0o777)
    data, port = root / "data", _free_port()

    def as_pg(*cmd):
        return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], capture_output=True, text=True, check=False)
    r = as_pg(bin_ / "initdb", "-D", data, "-A", "trust", "-U", "postgres")
    if r.returncode:
        pytest.skip(f"initdb failed: {r.stderr[-300:]}")
    r = as_pg(bin_ / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-o", f"-p {port} -k {root} -c listen_addresses=''", "start")
    if r.returncode:
        pytest.skip(f"PostgreSQL did not start: {r.stderr[-300:]}")
    yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    as_pg(bin_ / "pg_ctl", "-D", data, "-m", "fast", "stop")
    shutil.rmtree(root, ignore_errors=True)


def _config(tmp_path: Path, runs: dict, url: str, hook: str) -> Path:
    conf = tmp_path / "monitor.yaml"
    conf.write_text(yaml.safe_dump({"ner": runs["ner"], "sentiment": runs["sentiment"], "database": url, "watch": "inbox",
                                    "webhook": hook, "rules": [
                                        {"name": "negative_burst", "kind": "negative_share", "window": "1h", "threshold": 0.75, "min_items": 6},
                                        {"name": "unusual", "kind": "zscore", "window": "1h", "baseline": "24h", "threshold": 5, "min_items": 6}]}),
                    encoding="utf-8")
    return conf


def _counts(url: str) -> dict:
    engine = sa.create_engine(url)
    with engine.connect() as c:
        out = {t: c.execute(sa.select(sa.func.count()).select_from(getattr(db, t))).scalar() for t in ("items", "ledger", "alerts")}
        out["distinct_keys"] = c.execute(sa.select(sa.func.count(sa.distinct(db.items.c.key)))).scalar()
    engine.dispose()
    return out


def _replay_with_a_crash(tmp_path: Path, runs: dict, url: str, hook: str) -> tuple[Path, int]:
    conf = _config(tmp_path, runs, url, hook)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stream = _stream(_sentences())
    for h in range(48):  # one file per simulated hour, as a feed drops them
        hour = [r for r in stream if r["time"].startswith((START + timedelta(hours=h)).strftime("%Y-%m-%dT%H"))]
        (inbox / f"{h:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hour), encoding="utf-8")
    mon.db.connect(url).dispose()  # the schema exists before the first process polls it
    cmd = [sys.executable, "-m", "lmtune", "monitor", str(conf), "--once"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _counts(url)["items"] < 400:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stream, mid-transaction perhaps
    proc.wait()
    killed_at = _counts(url)["items"]
    assert 0 < killed_at < len(stream)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return conf, len(stream)


def _check(conf: Path, url: str, n_items: int, received: list) -> None:
    counts = _counts(url)
    assert counts["items"] == counts["ledger"] == counts["distinct_keys"] == n_items  # nothing lost, nothing twice
    cfg, rules = mon.load_config(conf)
    m = mon.Monitor(cfg, rules)
    alerts = m.alerts()
    assert alerts and {a["entity"] for a in alerts} == {BURST}, alerts  # no alert for a calm company
    first = min(datetime.fromisoformat(a["fired_at"]) for a in alerts)
    assert BURST_AT <= first <= BURST_AT + timedelta(hours=1)
    assert all(a["delivered"] for a in alerts)
    mine = [a for a in received if a["fired_at"] in {x["fired_at"] for x in alerts}]
    assert len(mine) == len(alerts)  # one delivery per episode
    # a second pass over the same folder changes nothing
    assert m.process_folder()["processed"] == 0 and _counts(url) == counts


@pytest.mark.slow
def test_monitor_on_sqlite(tmp_path, runs, webhook):
    url, (hook, received) = f"sqlite:///{tmp_path / 'monitor.db'}", webhook
    received.clear()
    conf, n = _replay_with_a_crash(tmp_path, runs, url, hook)
    _check(conf, url, n, received)
    # the service: the page, the JSON behind it, posting items (auth, bad items, duplicates)
    cfg, rules = mon.load_config(conf)
    from lmtune.apps.monitor.server import create_app
    os.environ["LMTUNE_API_KEYS"] = KEY
    try:
        app = create_app(mon.Monitor(cfg, rules), ServeSettings(run_dir=cfg.sentiment), watch=False)
    finally:
        del os.environ["LMTUNE_API_KEYS"]
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as c:
        assert c.get("/").status_code == 200 and "/v1/alerts" in c.get("/").text
        assert c.get("/v1/alerts").status_code == 401
        assert c.get("/v1/alerts", headers=auth).json()[0]["entity"] == BURST
        assert len(c.get("/v1/timelines", headers=auth).json()[BURST]) == 48
        item = {"id": "new-1", "time": "2026-03-04T01:00:00Z", "text": "Morvale : Operating profit rose to EUR 13.1 mn ."}
        assert c.post("/v1/items", json={"items": [item]}).status_code == 401
        assert c.post("/v1/items", json={"items": [item]}, headers=auth).json()["processed"] == 1
        assert c.post("/v1/items", json={"items": [item]}, headers=auth).json()["skipped"] == 1
        bad = c.post("/v1/items", json={"items": [{"text": "no time"}]}, headers=auth)
        assert bad.status_code == 422 and "item 1" in bad.json()["detail"]
    assert _counts(url)["items"] == n + 1


@pytest.mark.slow
def test_monitor_on_postgresql(tmp_path, runs, webhook, postgres):
    hook, received = webhook
    received.clear()
    conf, n = _replay_with_a_crash(tmp_path, runs, postgres, hook)
    _check(conf, postgres, n, received)


def test_rules_and_config_errors(tmp_path):
    with pytest.raises(InputError, match="kind must be one of"):
        mon.parse_rules([{"kind": "spike", "window": "1h", "threshold": 1}], "m.yaml")
    with pytest.raises(InputError, match="not a duration"):
        mon.parse_rules([{"kind": "zscore", "window": "an hour", "threshold": 1}], "m.yaml")
    rules = mon.parse_rules([{"kind": "negative_share", "window": "90m", "threshold": 0.5}], "m.yaml")
    assert rules[0].window == timedelta(minutes=90) and rules[0].min_items == 5
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"time": "2026-01-01T00:00:00Z", "text": "ok"}\n{"time": "yesterday", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"in.jsonl: line 2: time 'yesterday'"):
        mon.read_items_file(bad)
    items = mon.items_of_rows([(1, {"time": 0, "text": "a"}), (2, {"id": 7, "time": "2026-01-01T01:00:00+01:00", "text": "b"})], "f.jsonl")
    assert items[0].key == "f.jsonl:1" and items[1].key == "7" and items[1].ts == datetime(2026, 1, 1, 0, 0)
