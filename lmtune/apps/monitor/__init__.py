"""A financial news sentiment monitor on lmtune: `lmtune monitor CONFIG` ingests news items (JSONL files
dropped into a watched folder, and POST /v1/items), finds the companies in each with an NER run, scores
it with a sentiment run, stores items, entities and scores in a database (SQLAlchemy: a SQLite file by
default, PostgreSQL by URL, schema by Alembic migrations), evaluates alert rules per company and time
window, delivers each alert once per episode (log, webhook, e-mail), and serves a page of per-company
sentiment timelines and alerts (lmtune/apps/monitor/server.py).

Exactly once across crashes: an item, its entities, its ledger row and any alert it raises are written
in one transaction; an item whose key is in the ledger is skipped, so a restart re-reads the folder and
processes only what was not committed. Alerts are delivered after the commit and marked delivered; on
start, alerts left undelivered by a crash are delivered then.

An item's key is its `id` when it has one, otherwise a hash of its source, time and text (`content_key`,
the way log shippers fingerprint events): a re-sent identical item is skipped, a different item at the
same place in a request or file is stored. Two monitors may write to one database: a key the other
committed first makes the batch's transaction fail on the ledger's primary key, and the batch is written
again without it (`_write_racing`).

The watched folder: a file that cannot be read (not UTF-8, not JSONL, an item without text or time) or
whose items make the models fail is moved to `quarantine/` inside the folder with a `.reason.txt` beside
it, and the poll goes on with the next file; a file changed in the last SETTLE_SECONDS is left for the
next poll (a feed may still be writing it).

Time is the items' own (event time): a rule is evaluated at each item's timestamp over the window
before it, so a replayed stream raises the same alerts as a live one.

Rules (YAML list, each {name, kind, window, min_items, threshold, ...}):
- negative_share: the share of the company's items in the window that are negative >= threshold;
- zscore: that share's z-score against the company's own windows over the `baseline` before (its mean
  and standard deviation, the deviation floored at `min_std`, 0.1) >= threshold, once at least half
  of the baseline's windows hold items.
An episode starts when a rule becomes true for a company (one alert) and ends when it is false again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import smtplib
import time as _time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from lmtune.apps import load_app_config
from lmtune.apps.monitor import db
from lmtune.errors import InputError
from lmtune.io import write_text

log = logging.getLogger("lmtune.monitor")
EXAMPLE = Path(__file__).with_name("example.yaml")
KINDS = ("negative_share", "zscore")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
KEY_CHARS = 255  # the ledger's key column
EARLIEST, LATEST = datetime(1900, 1, 1), datetime(2200, 1, 1)  # item times outside are refused (rule windows stay in range)
SETTLE_SECONDS = 2.0  # a watched file changed this recently may still be being written: a failure waits for the next poll
WRITE_ATTEMPTS = 8  # a batch's transaction, retried when another writer committed some of its keys first or held a lock
QUARANTINE = "quarantine"  # the watched folder's subfolder for files that cannot be ingested


def duration(value: Any, where: str) -> timedelta:
    m = _DURATION.match(str(value).strip())
    if not m:
        raise InputError(f"{where}: {value!r} is not a duration; write e.g. 30m, 1h, 2d.")
    return timedelta(seconds=float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


@dataclass
class Rule:
    name: str
    kind: str
    window: timedelta
    threshold: float
    min_items: int = 5
    baseline: timedelta = timedelta(hours=24)
    min_std: float = 0.1


@dataclass
class MonitorConfig:
    ner: str = ""  # run dir of an NER run
    sentiment: str = ""  # run dir of a classification run
    database: str = "sqlite:///monitor.db"
    watch: str | None = None  # folder of *.jsonl files: {"id"?, "time", "text", "source"?}
    entity_labels: list = field(default_factory=lambda: ["ORG"])
    negative_label: str = "negative"
    rules: list = field(default_factory=list)
    webhook: str | None = None
    smtp: dict | None = None  # {host, port, sender, to: [..], username?, password_env?, starttls?}
    log_alerts: bool = True
    batch_size: int = 64
    poll_seconds: float = 5.0


def load_config(path: str | Path) -> tuple[MonitorConfig, list[Rule]]:
    path = Path(path)
    cfg = load_app_config(path, MonitorConfig, ("ner", "sentiment", "watch"), EXAMPLE)
    if cfg.database.startswith("sqlite:///") and not cfg.database.startswith("sqlite:////"):
        rel = cfg.database[len("sqlite:///"):]
        if rel and rel != ":memory:":
            cfg.database = f"sqlite:///{path.parent / rel}"
    return cfg, parse_rules(cfg.rules, str(path))


def parse_rules(rows: list, where: str) -> list[Rule]:
    rules = []
    for i, r in enumerate(rows or []):
        at = f"{where}: rules[{i}]"
        if not isinstance(r, dict) or r.get("kind") not in KINDS:
            raise InputError(f"{at}: kind must be one of {', '.join(KINDS)}.")
        extra = set(r) - {"name", "kind", "window", "threshold", "min_items", "baseline", "min_std"}
        if extra:
            raise InputError(f"{at}: unknown key(s) {', '.join(sorted(extra))}.")
        if "threshold" not in r or "window" not in r:
            raise InputError(f"{at}: give window and threshold.")
        rules.append(Rule(str(r.get("name") or f"{r['kind']}_{i}"), r["kind"], duration(r["window"], at), float(r["threshold"]),
                          int(r.get("min_items", 5)), duration(r.get("baseline", "24h"), at), float(r.get("min_std", 0.1))))
    if len({r.name for r in rules}) != len(rules):
        raise InputError(f"{where}: two rules share a name; names identify alert episodes.")
    return rules


def parse_time(value: Any, where: str) -> datetime:
    """ISO 8601 (a trailing Z allowed) or epoch seconds, stored as naive UTC."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            t = _utc(value)
        else:
            t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            if t.tzinfo is not None:
                t = (t - t.utcoffset()).replace(tzinfo=None)
    except (ValueError, OSError, OverflowError):
        raise InputError(f"{where}: time {str(value)[:64]!r} is not an ISO 8601 time or epoch seconds.") from None
    if not EARLIEST <= t < LATEST:
        raise InputError(f"{where}: time {t.isoformat()} is outside {EARLIEST.year}..{LATEST.year - 1}; give the item's publication time.")
    return t


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class Item:
    key: str
    ts: datetime
    text: str
    source: str


def _sha256(value: Any) -> str:
    # JSON of a list: fields cannot run into each other ("ab","c" and "a","bc" differ)
    return "sha256:" + hashlib.sha256(json.dumps(value, ensure_ascii=True).encode("ascii")).hexdigest()


def content_key(source: str, ts: datetime, text: str) -> str:
    """The identity of an item without an id: its source (as stored), time (UTC) and text, hashed. The
    same item sent again gets the same key (skipped); any other item gets another (stored)."""
    return _sha256([source, ts.isoformat(), text])


def id_key(item_id: Any) -> str:
    """The identity of an item with an id: the id itself, or its hash when longer than the ledger's
    column (cutting it would make two ids one)."""
    key = str(item_id)
    return key if len(key) <= KEY_CHARS else _sha256(["id", key])


def _storable(value: str, where: str, field_name: str) -> str:
    """Refuse what a database cannot store: NUL (PostgreSQL text) and lone surrogates (not UTF-8)."""
    if "\x00" in value:
        raise InputError(f"{where}: '{field_name}' contains a NUL character; remove it.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: '{field_name}' is not valid Unicode (a lone surrogate); send UTF-8 text.") from None
    return value


def items_of_rows(rows: list[tuple[int, dict]], name: str) -> list[Item]:
    out = []
    for line, row in rows:
        where = f"{name}: line {line}"
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise InputError(f"{where}: no text. Each item needs a non-empty 'text'.")
        if "time" not in row:
            raise InputError(f"{where}: no 'time'. Give each item its publication time (ISO 8601 or epoch seconds).")
        text = _storable(row["text"], where, "text")
        source = _storable(str(row.get("source") or Path(name).name), where, "source")[:KEY_CHARS]
        ts = parse_time(row["time"], where)
        key = id_key(_storable(str(row["id"]), where, "id")) if row.get("id") not in (None, "") else content_key(source, ts, text)
        out.append(Item(key, ts, text, source))
    return out


def read_items_file(path: Path) -> list[Item]:
    data = path.read_bytes()
    try:
        content = data.decode("utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}). Save the file as UTF-8 "
                         "and put it in the folder again.") from None
    rows = []
    for n, line in enumerate(content.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and the like
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not JSON ({e.msg}). Write one JSON object per line.") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {n}: not a JSON object.")
        rows.append((n, row))
    return items_of_rows(rows, str(path))


def file_error(path: Path, e: Exception) -> str:
    """Why a watched file was not ingested, fit for the log: an InputError names the file, line and fix; any
    other error only by its type, as its message may quote the items' texts."""
    if isinstance(e, InputError):
        return str(e)
    return f"{path}: processing its items failed ({type(e).__name__}); put the file in the folder again to retry it."


def _transient(e: sa.exc.OperationalError) -> bool:
    """A lock wait that timed out (SQLite) or a deadlock / serialization failure (PostgreSQL): worth a retry."""
    return getattr(e.orig, "sqlstate", None) in ("40001", "40P01") or "database is locked" in str(e.orig)


class Monitor:
    def __init__(self, cfg: MonitorConfig, rules: list[Rule], engine=None) -> None:
        import lmtune
        if not cfg.ner or not cfg.sentiment:
            raise InputError("monitor: give the NER run (ner) and the sentiment run (sentiment).")
        self.cfg, self.rules = cfg, rules
        self.engine = engine or db.connect(cfg.database)
        self.ner, self.sentiment = lmtune.load(cfg.ner), lmtune.load(cfg.sentiment)
        for run in (self.ner, self.sentiment):
            run.config.train.progress = "none"
        if cfg.negative_label not in self.sentiment.labels:
            raise InputError(f"monitor: negative_label {cfg.negative_label!r} is not a label of {cfg.sentiment} "
                             f"({', '.join(self.sentiment.labels)}).")
        self._unmovable: dict[Path, tuple[int, int]] = {}  # failed files that could not be quarantined: (mtime, size)
        self.deliver_pending()

    # ---- ingestion ------------------------------------------------------------------------------
    def processed(self, keys: list[str], chunk: int = 500) -> set[str]:
        """The keys already in the ledger (asked a chunk at a time: SQLite bounds a statement's parameters)."""
        with self.engine.connect() as conn:
            return {r[0] for i in range(0, len(keys), chunk)
                    for r in conn.execute(sa.select(db.ledger.c.key).where(db.ledger.c.key.in_(keys[i:i + chunk])))}

    def ingest(self, items: list[Item]) -> dict:
        """Process the items not yet in the ledger, a batch per transaction; returns counts."""
        done = self.processed([it.key for it in items])
        todo, seen = [], set(done)
        for it in items:
            if it.key not in seen:
                seen.add(it.key)
                todo.append(it)
        processed = fired = 0
        for i in range(0, len(todo), self.cfg.batch_size):
            n, f = self._process(todo[i:i + self.cfg.batch_size])
            processed, fired = processed + n, fired + f
        if fired:
            self.deliver_pending()
        return {"received": len(items), "processed": processed, "skipped": len(items) - processed, "alerts": fired}

    def _process(self, batch: list[Item]) -> tuple[int, int]:
        """Predict the batch, then write it; returns (items written, alerts raised)."""
        texts = [it.text for it in batch]
        predictions = {it.key: p for it, p in zip(batch, zip(self.ner.predict(texts), self.sentiment.predict(texts)))}
        return self._write_racing(batch, predictions)

    def _write_racing(self, batch: list[Item], predictions: dict) -> tuple[int, int]:
        """Write the batch in one transaction. Another monitor on the same database may commit some of its
        keys first: the ledger's primary key then fails this transaction (IntegrityError), and the batch is
        written again without the keys now in the ledger. A lock wait that timed out or a deadlock (two
        writers taking keys in different orders) is retried too."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return len(batch), self._write(batch, predictions)
            except sa.exc.IntegrityError:
                done = self.processed([it.key for it in batch])
                if not done:  # not a race on the ledger: a real error
                    raise
                log.info("another writer stored %d of this batch's %d items first; writing the rest", len(done), len(batch))
                batch = [it for it in batch if it.key not in done]
                if not batch:
                    return 0, 0
            except sa.exc.OperationalError as e:
                if not _transient(e) or attempt == WRITE_ATTEMPTS:
                    raise
                _time.sleep(0.05 * attempt)
        raise RuntimeError(f"a batch could not be written in {WRITE_ATTEMPTS} attempts")  # keys taken each time: not expected

    def _write(self, batch: list[Item], predictions: dict) -> int:
        fired = 0
        with self.engine.begin() as conn:  # items, entities, ledger and alerts of the batch: all or nothing
            for it in batch:
                ents, sent = predictions[it.key]
                item_id = conn.execute(db.items.insert().values(key=it.key, ts=it.ts, text=it.text, source=it.source,
                                                                sentiment=sent["label"], sentiment_score=float(sent.get("score", 0.0)))
                                       ).inserted_primary_key[0]
                names = sorted({e["text"].strip() for e in ents["entities"] if e["label"] in self.cfg.entity_labels and e["text"].strip()})
                if names:
                    conn.execute(db.entities.insert(), [{"item_id": item_id, "name": n[:255], "label": "ORG"} for n in names])
                conn.execute(db.ledger.insert().values(key=it.key, item_id=item_id, processed_at=_now()))
                for name in names:
                    fired += self._evaluate(conn, name, it.ts)
        return fired

    def process_folder(self, folder: str | Path | None = None) -> dict:
        """Every *.jsonl file of the watched folder, in name order, each read whole and checked first. A file
        that cannot be ingested is quarantined (moved to quarantine/ with its reason) and the next one is
        read; a database error stops the poll (the files are fine, the next poll tries them again)."""
        folder = Path(folder or self.cfg.watch or "")
        if not folder.is_dir():
            raise InputError(f"watch: {folder} is not a folder.")
        total: dict = {"received": 0, "processed": 0, "skipped": 0, "alerts": 0, "quarantined": []}
        for path in sorted(folder.glob("*.jsonl")):
            try:
                stat = path.stat()
            except FileNotFoundError:  # taken away since the listing
                continue
            if self._unmovable.get(path) == (stat.st_mtime_ns, stat.st_size):
                continue  # failed before, could not be moved, unchanged: reported once already
            try:
                counts = self.ingest(read_items_file(path))
            except FileNotFoundError:
                continue
            except sa.exc.DBAPIError:
                raise
            except Exception as e:  # noqa: BLE001 (any failure of one file must not stop the folder)
                if _time.time() - stat.st_mtime < SETTLE_SECONDS:
                    continue  # perhaps still being written: the next poll reads it again
                total["quarantined"].append(self._quarantine(path, folder, file_error(path, e), stat))
                continue
            for k, v in counts.items():
                total[k] += v
        return total

    def _quarantine(self, path: Path, folder: Path, reason: str, stat: os.stat_result) -> dict:
        """Move a file that cannot be ingested out of the way, with its reason beside it (logged once)."""
        target = folder / QUARANTINE / f"{_now():%Y%m%dT%H%M%S%f}-{path.name}"
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            write_text(target.with_name(target.name + ".reason.txt"), reason + "\n")
            where = str(target)
        except OSError as e:  # a read-only folder: skip the file while it stays as it is
            self._unmovable[path] = (stat.st_mtime_ns, stat.st_size)
            where = f"left in place ({type(e).__name__}: cannot move it), skipped until it changes"
        log.error("watched folder: %s Quarantined: %s", reason, where)  # the reason names the file and line
        return {"file": path.name, "reason": reason, "moved_to": where}

    # ---- rules and episodes ----------------------------------------------------------------------
    def _window_rows(self, conn, entity: str, start: datetime, end: datetime) -> list[tuple[datetime, bool]]:
        q = (sa.select(db.items.c.ts, db.items.c.sentiment).join(db.entities, db.entities.c.item_id == db.items.c.id)
             .where(db.entities.c.name == entity, db.items.c.ts > start, db.items.c.ts <= end))
        return [(ts, s == self.cfg.negative_label) for ts, s in conn.execute(q)]

    def rule_value(self, conn, rule: Rule, entity: str, now: datetime) -> tuple[bool, float, dict]:
        rows = self._window_rows(conn, entity, now - rule.window, now)
        n = len(rows)
        share = sum(neg for _, neg in rows) / n if n else 0.0
        detail: dict = {"items": n, "negative_share": round(share, 4), "window_s": rule.window.total_seconds()}
        if n < rule.min_items:
            return False, share, detail
        if rule.kind == "negative_share":
            return share >= rule.threshold, share, detail
        past = self._window_rows(conn, entity, now - rule.window - rule.baseline, now - rule.window)
        buckets: dict[int, list[bool]] = {}
        for ts, neg in past:
            buckets.setdefault(int((now - rule.window - ts) / rule.window), []).append(neg)
        shares = [float(np.mean(v)) for v in buckets.values() if v]
        mean = float(np.mean(shares)) if shares else 0.0
        std = max(float(np.std(shares)) if len(shares) > 1 else 0.0, rule.min_std)
        z = (share - mean) / std
        detail.update({"baseline_mean": round(mean, 4), "baseline_std": round(std, 4), "baseline_windows": len(shares), "z": round(z, 3)})
        # a baseline needs history: at least half of its windows must hold items (a new company has none)
        enough = len(shares) >= max(3, int(rule.baseline / rule.window) // 2)
        return enough and z >= rule.threshold, z, detail

    def _evaluate(self, conn, entity: str, now: datetime) -> int:
        fired = 0
        for rule in self.rules:
            on, value, detail = self.rule_value(conn, rule, entity, now)
            open_ep = conn.execute(sa.select(db.episodes.c.id).where(db.episodes.c.rule == rule.name, db.episodes.c.entity == entity,
                                                                   db.episodes.c.ended_at.is_(None))).first()
            if on and open_ep is None:
                ep = conn.execute(db.episodes.insert().values(rule=rule.name, entity=entity, started_at=now)).inserted_primary_key[0]
                conn.execute(db.alerts.insert().values(episode_id=ep, rule=rule.name, entity=entity, fired_at=now, value=float(value),
                                                       detail=json.dumps(detail)))
                fired += 1
            elif not on and open_ep is not None:
                conn.execute(db.episodes.update().where(db.episodes.c.id == open_ep[0]).values(ended_at=now))
        return fired

    # ---- delivery ----------------------------------------------------------------------------------
    def deliver_pending(self) -> int:
        """Deliver every alert not yet delivered (after a commit, and on start after a crash)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.alerts).where(db.alerts.c.delivered_at.is_(None)).order_by(db.alerts.c.id)).mappings().all()
        for a in rows:
            alert = {"rule": a["rule"], "entity": a["entity"], "fired_at": a["fired_at"].isoformat(), "value": a["value"],
                     **json.loads(a["detail"])}
            self._deliver(alert)
            with self.engine.begin() as conn:
                conn.execute(db.alerts.update().where(db.alerts.c.id == a["id"]).values(delivered_at=_now()))
        return len(rows)

    def _deliver(self, alert: dict) -> None:
        if self.cfg.log_alerts:
            log.warning("ALERT %s: %s at %s (value %.3f, %d items)", alert["rule"], alert["entity"], alert["fired_at"], alert["value"],
                        alert["items"])
        if self.cfg.webhook:
            import httpx
            try:
                httpx.post(self.cfg.webhook, json=alert, timeout=10).raise_for_status()
            except httpx.HTTPError as e:
                log.error("alert webhook failed: %s", type(e).__name__)
        if self.cfg.smtp:
            self._mail(alert)

    def _mail(self, alert: dict) -> None:
        import os
        s = self.cfg.smtp
        msg = EmailMessage()
        msg["Subject"] = f"[lmtune monitor] {alert['rule']}: {alert['entity']}"
        msg["From"], msg["To"] = s["sender"], ", ".join(s["to"])
        msg.set_content(json.dumps(alert, indent=2))
        try:
            with smtplib.SMTP(s["host"], int(s.get("port", 25)), timeout=10) as smtp:
                if s.get("starttls"):
                    smtp.starttls()
                if s.get("username"):
                    smtp.login(s["username"], os.environ.get(s.get("password_env", "LMTUNE_SMTP_PASSWORD"), ""))
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as e:
            log.error("alert e-mail failed: %s", type(e).__name__)

    # ---- reading back --------------------------------------------------------------------------------
    def timelines(self, bucket: timedelta = timedelta(hours=1), limit: int = 20) -> dict[str, list[dict]]:
        """Per entity (the `limit` most mentioned): items and negative share per time bucket."""
        with self.engine.connect() as conn:
            top = [r[0] for r in conn.execute(sa.select(db.entities.c.name, sa.func.count()).group_by(db.entities.c.name)
                                              .order_by(sa.func.count().desc()).limit(limit))]
            rows = conn.execute(sa.select(db.entities.c.name, db.items.c.ts, db.items.c.sentiment)
                                .join(db.items, db.entities.c.item_id == db.items.c.id).where(db.entities.c.name.in_(top))).all()
        out: dict[str, dict[datetime, list[bool]]] = {n: {} for n in top}
        step = bucket.total_seconds()
        for name, ts, s in rows:
            start = _utc((ts - datetime(1970, 1, 1)).total_seconds() // step * step)
            out[name].setdefault(start, []).append(s == self.cfg.negative_label)
        return {n: [{"start": t.isoformat(), "items": len(v), "negative_share": round(float(np.mean(v)), 4)} for t, v in sorted(b.items())]
                for n, b in out.items()}

    def alerts(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.alerts).order_by(db.alerts.c.fired_at.desc())).mappings().all()
        return [{"rule": a["rule"], "entity": a["entity"], "fired_at": a["fired_at"].isoformat(), "value": round(a["value"], 4),
                 "delivered": a["delivered_at"] is not None, **json.loads(a["detail"])} for a in rows]
