"""The monitor's database through SQLAlchemy: a SQLite file by default, PostgreSQL (or any SQLAlchemy URL)
when given; the schema is created and upgraded by the Alembic migrations in ./migrations."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmtune.errors import InputError

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6C6D74756E65  # "lmtune": the PostgreSQL advisory lock's id, held while one process migrates
metadata = sa.MetaData()
# the tables as the migrations create them (reflected shapes, declared once here for queries)
items = sa.Table("items", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("key", sa.String(255)),
                 sa.Column("ts", sa.DateTime), sa.Column("text", sa.Text), sa.Column("source", sa.String(255)),
                 sa.Column("sentiment", sa.String(64)), sa.Column("sentiment_score", sa.Float))
entities = sa.Table("entities", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("item_id", sa.Integer),
                    sa.Column("name", sa.String(255)), sa.Column("label", sa.String(64)))
ledger = sa.Table("ledger", metadata, sa.Column("key", sa.String(255), primary_key=True), sa.Column("item_id", sa.Integer),
                  sa.Column("processed_at", sa.DateTime))
episodes = sa.Table("episodes", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("rule", sa.String(128)),
                    sa.Column("entity", sa.String(255)), sa.Column("started_at", sa.DateTime), sa.Column("ended_at", sa.DateTime))
alerts = sa.Table("alerts", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("episode_id", sa.Integer),
                  sa.Column("rule", sa.String(128)), sa.Column("entity", sa.String(255)), sa.Column("fired_at", sa.DateTime),
                  sa.Column("value", sa.Float), sa.Column("detail", sa.Text), sa.Column("delivered_at", sa.DateTime))


def connect(url: str) -> Engine:
    """An engine on `url` with the schema migrated to the newest revision."""
    try:
        # hide_parameters: a database error's message never carries the items' texts into a log
        engine = sa.create_engine(url, future=True, hide_parameters=True, **_sqlite_args(url))
    except (sa.exc.ArgumentError, ImportError) as e:
        raise InputError(f"database: cannot use {url.split('@')[-1]!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        raise InputError(f"database: cannot connect to {engine.url.render_as_string(hide_password=True)}: {e.orig}") from None
    return engine


def _sqlite_args(url: str) -> dict:
    # a second writer (another monitor on the same file) waits for the lock up to 30 s instead of 5
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}


def _sqlite_pragmas(conn, _) -> None:  # a writer and the page's readers at once; foreign keys enforced
    _patiently(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA foreign_keys=ON")


def _patiently(statement, seconds: float = 30.0):
    """Run `statement`, retrying while the database is locked. SQLite skips its busy handler where waiting
    could deadlock: a journal-mode change needs the lock another process's write transaction holds, which a
    second monitor starting on a new database meets (it failed at once with "database is locked")."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest revision, one process at a time: two monitors starting together on
    a new database would otherwise both create the tables, and the second would fail. PostgreSQL: an
    advisory lock held for the migration's transaction. SQLite: the migration in a BEGIN IMMEDIATE
    transaction (pysqlite otherwise runs DDL outside any transaction), on a connection of its own."""
    from alembic import command
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    own = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")  # (one connection in memory)
    if own:
        engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool, hide_parameters=True, connect_args={"timeout": 60})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "connect", _sqlite_driver_autocommit)
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        if own:
            engine.dispose()


def _sqlite_driver_autocommit(conn, _) -> None:
    conn.isolation_level = None  # SQLAlchemy's "begin" event emits BEGIN itself (SQLAlchemy's pysqlite recipe)
