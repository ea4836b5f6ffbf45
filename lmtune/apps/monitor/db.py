"""The monitor's database through SQLAlchemy: a SQLite file by default, PostgreSQL (or any SQLAlchemy URL)
when given; the schema is created and upgraded by the Alembic migrations in ./migrations."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmtune.errors import InputError

MIGRATIONS = Path(__file__).with_name("migrations")
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
    from alembic import command
    from alembic.config import Config
    try:
        engine = sa.create_engine(url, future=True)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise InputError(f"database: cannot use {url.split('@')[-1]!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn, _):  # a writer and the page's readers at once; foreign keys enforced
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except sa.exc.OperationalError as e:
        raise InputError(f"database: cannot connect to {engine.url.render_as_string(hide_password=True)}: {e.orig}") from None
    return engine
