"""The news monitor end to end, against SQLite and a real PostgreSQL server: a synthetic stream of
financial_phrasebank sentences over 48 simulated hours with a negative burst for one company at hour 30;
the alert fires within the burst's first hour, none fires for the calm companies, each alert is
delivered once to a real webhook, and a monitor killed mid-stream and restarted loses and duplicates no item."""
from __future__ import annotations

import csv
import json
import logging
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
from tests.fuzz import fuzz_openapi

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
    assert items[0].key == mon.content_key("f.jsonl", datetime(1970, 1, 1), "a") and items[0].key.startswith("sha256:")
    assert items[1].key == "7" and items[1].ts == datetime(2026, 1, 1, 0, 0)


# ---- issue 46: identity by content, two writers, a watched folder that survives bad files, no 500 ----------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model) -> dict:
    """An NER run and a sentiment run on the tiny random backbone, one short epoch each: real runs for the
    monitor to load, cheap enough for the tests below (which check storage, not the models' quality)."""
    d = tmp_path_factory.mktemp("monitor_tiny_runs")
    sents = _sentences()
    blocks = [f"{COMPANIES[i % 5]} B-ORG\n: O\n" + "\n".join(f"{w} O" for w in sents["neutral"][i].split()[:8]) for i in range(40)]
    (d / "ner.conll").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    common = {"output_dir": str(d), "model": {"name": tiny_model},
              "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "progress": "none", "seed": 1, "calibrate": False}}
    ner = lmtune.train({**common, "task": "ner", "run_name": "ner",
                        "data": {"train": str(d / "ner.conll"), "dev": str(d / "ner.conll"), "max_length": 32}})
    rows = [(t, label) for label in ("negative", "neutral", "positive") for t in sents[label][:30]]
    with open(d / "sent.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])
    sentiment = lmtune.train({**common, "run_name": "sentiment", "data": {"train": str(d / "sent.csv"), "dev": str(d / "sent.csv"),
                                                                          "max_length": 32}})
    return {"ner": str(ner.run_dir), "sentiment": str(sentiment.run_dir)}


def _tiny_monitor(runs: dict, url: str, watch: Path | None = None, **kw) -> mon.Monitor:
    rules = mon.parse_rules([{"name": "burst", "kind": "negative_share", "window": "1h", "threshold": 0.5, "min_items": 2}], "test")
    return mon.Monitor(mon.MonitorConfig(ner=runs["ner"], sentiment=runs["sentiment"], database=url,
                                         watch=str(watch) if watch else None, **kw), rules)


def _app(monitor: mon.Monitor, monkeypatch, watch: bool = False, **settings):
    from lmtune.apps.monitor.server import create_app
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    return create_app(monitor, ServeSettings(run_dir=monitor.cfg.sentiment, **settings), watch=watch)


def _no_id_items(n: int) -> list[dict]:
    """n different items without ids; pairs share a time (different texts), texts repeat at other times."""
    sents = _sentences()["neutral"][:37]
    return [{"time": (START + timedelta(minutes=i // 2)).isoformat() + "Z", "text": f"{COMPANIES[i % 5]} : {sents[i % 37]}"}
            for i in range(n)]


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_items_without_an_id_are_identified_by_their_content(tmp_path, tiny_runs, monkeypatch):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with TestClient(_app(_tiny_monitor(tiny_runs, url), monkeypatch, max_texts=200)) as c:
        # the repro: the same place in two requests, two different items: both stored
        a = {"time": "2026-03-02T10:00:00Z", "text": "A"}
        assert c.post("/v1/items", json={"items": [a]}, headers=AUTH).json()["processed"] == 1
        assert c.post("/v1/items", json={"items": [{**a, "text": "B"}]}, headers=AUTH).json()["processed"] == 1
        assert c.post("/v1/items", json={"items": [a]}, headers=AUTH).json() == {"received": 1, "processed": 0, "skipped": 1,
                                                                                  "alerts": 0}  # re-sent: skipped
        assert c.post("/v1/items", json={"items": [{**a, "time": "2026-03-02T11:00:00+01:00"}]}, headers=AUTH).json()["skipped"] == 1
        assert _counts(url)["items"] == 2
        # 1,000 items without ids in 10 requests, each 100 new ones and 50 sent before (500 re-sent in all)
        items, rng, totals = _no_id_items(1000), random.Random(5), {"processed": 0, "skipped": 0}
        for k in range(10):
            again = items[100 * k: 100 * k + 50] if k == 0 else items[100 * k - 50: 100 * k]
            body = items[100 * k: 100 * (k + 1)] + again
            rng.shuffle(body)
            r = c.post("/v1/items", json={"items": body}, headers=AUTH)
            assert r.status_code == 200, r.text
            for key in totals:
                totals[key] += r.json()[key]
    assert totals == {"processed": 1000, "skipped": 500}
    counts = _counts(url)
    assert counts["items"] == counts["ledger"] == counts["distinct_keys"] == 1002


def _race(monitors: list[mon.Monitor], items: list[mon.Item]) -> list:
    """Each monitor ingests the same items in its own thread, both having found none in the ledger first."""
    barrier, results = threading.Barrier(len(monitors), timeout=120), [None] * len(monitors)
    for m in monitors:
        first = m.processed

        def processed(keys, _first=first, _calls=[]):  # noqa: B006 (per monitor: the first call waits for the other writer)
            done = _first(keys)
            if not _calls:
                _calls.append(1)
                barrier.wait()
            return done
        m.processed = processed

    def run(i: int) -> None:
        try:
            results[i] = monitors[i].ingest(items)
        except Exception as e:  # noqa: BLE001 (the test reports it)
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(monitors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def _new_pg_database(url: str, name: str) -> str:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return url.replace("/postgres?", f"/{name}?")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_writers_on_one_database_both_finish_without_duplicates(tmp_path, tiny_runs, backend, request, caplog):
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else _new_pg_database(request.getfixturevalue("postgres"), "writers")
    # two monitors starting at once on a new database (two processes): one creates the schema, the other waits for it
    code = "import sys; from lmtune.apps.monitor import db; db.connect(sys.argv[1]).dispose()"
    starters = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in starters:
        try:
            _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    monitors = [_tiny_monitor(tiny_runs, url, batch_size=16) for _ in range(2)]  # two engines, two connection pools
    items = mon.items_of_rows(list(enumerate(_no_id_items(200) + [{"id": f"n{i}", "time": 1.7e9 + i, "text": f"Zentrix : item {i}"}
                                                                  for i in range(40)], 1)), "feed.jsonl")
    caplog.set_level(logging.INFO, logger="lmtune.monitor")
    results = _race(monitors, items)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert "another writer stored" in caplog.text  # they did race: a batch met keys the other had committed
    assert sum(r["processed"] for r in results) == 240 and all(r["received"] == 240 for r in results)
    counts = _counts(url)
    assert counts["items"] == counts["ledger"] == counts["distinct_keys"] == 240
    for m in monitors:
        m.engine.dispose()


def test_a_monitor_starting_while_another_process_writes_waits_instead_of_failing(tmp_path):
    # SQLite answers a journal-mode change with "database is locked" at once, without its busy handler, while
    # another process holds a write transaction: the CI race of two monitors starting on one new database
    import sqlite3
    path = tmp_path / "m.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    code = "import sys; from lmtune.apps.monitor import db; db.connect(sys.argv[1]).dispose()"
    starter = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{path}"], stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # the starter meets the lock (it used to exit 1 within this time)
    assert starter.poll() is None
    other.execute("COMMIT")
    other.close()
    _, err = starter.communicate(timeout=120)
    assert starter.returncode == 0, err[-2000:]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _jsonl(path: Path, rows: list[dict], encoding: str = "utf-8", age_s: float = 60) -> Path:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    os.utime(path, (time.time() - age_s,) * 2)  # older than SETTLE_SECONDS: finished by its writer
    return path


def test_one_bad_file_does_not_block_the_watched_folder(tmp_path, tiny_runs):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rows = _no_id_items(8)
    _jsonl(inbox / "00.jsonl", rows[:2])
    (inbox / "01.jsonl").write_text('{"time": "2026-03-02T10:00:00Z", "text": "ok"}\n{"time": \n', encoding="utf-8")
    os.utime(inbox / "01.jsonl", (time.time() - 60,) * 2)
    _jsonl(inbox / "02.jsonl", rows[2:4])
    _jsonl(inbox / "03.jsonl", [{"text": "no time"}], age_s=0)  # just written: perhaps not finished, left for the next poll
    m = _tiny_monitor(tiny_runs, f"sqlite:///{tmp_path / 'm.db'}", inbox)
    out = m.process_folder()
    assert out["processed"] == 4 and [q["file"] for q in out["quarantined"]] == ["01.jsonl"]
    assert "01.jsonl: line 2: not JSON" in out["quarantined"][0]["reason"]
    moved = list((inbox / "quarantine").glob("*-01.jsonl"))
    assert len(moved) == 1 and not (inbox / "01.jsonl").exists()
    assert "line 2: not JSON" in moved[0].with_name(moved[0].name + ".reason.txt").read_text(encoding="utf-8")
    assert (inbox / "03.jsonl").exists()
    again = m.process_folder()  # nothing new, the bad file is not read (nor reported) again
    assert again["processed"] == 0 and again["quarantined"] == []
    os.utime(inbox / "03.jsonl", (time.time() - 60,) * 2)
    later = m.process_folder()
    assert [q["file"] for q in later["quarantined"]] == ["03.jsonl"] and "line 1: no 'time'" in later["quarantined"][0]["reason"]


def test_a_non_utf8_file_is_quarantined_and_the_poller_goes_on(tmp_path, tiny_runs, monkeypatch, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rows = _no_id_items(6)
    _jsonl(inbox / "00.jsonl", rows[:2])
    _jsonl(inbox / "01.jsonl", [{"time": "2026-03-02T10:00:00Z", "text": "Zentrix : Café société secrète"}], encoding="latin-1")
    _jsonl(inbox / "02.jsonl", rows[2:4])
    url = f"sqlite:///{tmp_path / 'm.db'}"
    m = _tiny_monitor(tiny_runs, url, inbox, poll_seconds=0.1)
    caplog.set_level(logging.INFO)

    def wait_for(check, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline and not check():
            time.sleep(0.1)
        return check()
    with TestClient(_app(m, monkeypatch, watch=True)) as c:
        assert wait_for(lambda: _counts(url)["items"] == 4), "the files after the bad one were not ingested"
        assert wait_for(lambda: c.get("/readyz").json()["watch"]["polls"] >= 5)
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        watch = ready.json()["watch"]
        assert watch["poller_alive"] and watch["files_quarantined"] == 1 and watch["recent_quarantined"][0]["file"] == "01.jsonl"
        assert "01.jsonl: line 1: not UTF-8 text (byte 0xe9)" in watch["recent_quarantined"][0]["reason"]
        assert "lmtune_monitor_files_quarantined_total 1.0" in c.get("/metrics", headers=AUTH).text  # once, not once per poll
        assert len(list((inbox / "quarantine").glob("*-01.jsonl"))) == 1
        # a later file is still picked up
        _jsonl(inbox / "03.jsonl", rows[4:6])
        assert wait_for(lambda: _counts(url)["items"] == 6)
        # any failure of a poll (here the folder vanishing): counted, reported by /readyz (503), and the poller goes on
        shutil.move(inbox, tmp_path / "away")
        assert wait_for(lambda: c.get("/readyz").status_code == 503)
        assert "is not a folder" in c.get("/readyz").json()["watch"]["last_error"]
        assert "lmtune_monitor_poll_errors_total" in c.get("/metrics", headers=AUTH).text
        shutil.move(tmp_path / "away", inbox)
        assert wait_for(lambda: c.get("/readyz").status_code == 200)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("01.jsonl: line 1: not UTF-8") == 1 and logged.count("Quarantined:") == 1 and logged.count("poll failed") == 1
    assert "Caf" not in logged and "Zentrix :" not in logged  # never the items' texts


def test_ledger_keys_of_items_without_id_are_rekeyed_by_the_migration(tmp_path):
    """A database of the first schema keyed items without an id by position; 0002 rekeys them by content,
    so reading the same file after the upgrade processes nothing twice."""
    from alembic import command
    from alembic.config import Config
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        ts = datetime(2026, 3, 2, 10, 0, 0, 123456)
        for i, (key, source, text) in enumerate([("feed.jsonl:3", "feed.jsonl", "A"), ("items:1", "items", "B"),
                                                 ("explicit-id", "items", "C"), ("other.jsonl:9", "feed.jsonl", "A")], 1):
            conn.execute(db.items.insert().values(id=i, key=key, ts=ts, text=text, source=source, sentiment="neutral", sentiment_score=1.0))
            conn.execute(db.ledger.insert().values(key=key, item_id=i, processed_at=ts))
    engine.dispose()
    engine = db.connect(url)
    with engine.connect() as conn:
        keys = dict(conn.execute(sa.select(db.ledger.c.item_id, db.ledger.c.key)).all())
        item_keys = dict(conn.execute(sa.select(db.items.c.id, db.items.c.key)).all())
    assert keys == item_keys
    assert keys[1] == mon.content_key("feed.jsonl", ts, "A") and keys[2] == mon.content_key("items", ts, "B")
    assert keys[3] == "explicit-id" and keys[4] == "other.jsonl:9"  # an id stays; a duplicate of item 1 keeps its old key
    again = mon.items_of_rows([(3, {"time": ts.isoformat() + "Z", "text": "A"})], "feed.jsonl")
    assert again[0].key == keys[1]


def test_fuzzing_the_monitor_api_gives_no_5xx(tmp_path, tiny_runs, monkeypatch):
    app = _app(_tiny_monitor(tiny_runs, f"sqlite:///{tmp_path / 'm.db'}"), monkeypatch, max_texts=8, max_chars=300)
    with TestClient(app) as c:  # what a hostile client may send that the schema's generator will hardly find
        for item in ({"time": "2026-03-02T10:00:00Z", "text": "nul \x00 inside"}, {"time": "2026-03-02T10:00:00Z", "text": "\ud800"},
                     {"time": "0001-01-01T00:10:00+05:00", "text": "x"}, {"time": "0001-01-01T00:10:00", "text": "x"},
                     {"time": 1e300, "text": "x"}, {"time": float("nan"), "text": "x"}, {"time": {"a": 1}, "text": "x"},
                     {"time": 1.7e9, "text": "x", "id": "\ud800"}, {"time": 1.7e9, "text": "x", "source": "a\x00b"},
                     {"time": 1.7e9, "text": "x", "id": "i" * 5000}, {"time": 1.7e9, "text": "x", "id": {"nested": [1]}}):
            body = json.dumps({"items": [item]}, allow_nan=True)
            r = c.post("/v1/items", content=body, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code in (200, 422), (item, r.status_code, r.text)
    calls = [code for _, code in fuzz_openapi(app, (AUTH, {}), 15,
                                              {"/v1/items", "/v1/timelines", "/v1/alerts", "/healthz", "/readyz", "/metrics"})]
    assert len(calls) >= 20 and 200 in calls and 401 in calls
