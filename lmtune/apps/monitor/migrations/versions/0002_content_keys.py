"""Ledger keys of items without an id: from their position to their content.

Before this revision an item without an `id` was keyed by its place (`FILE.jsonl:LINE` in the watched
folder, `items:N` in a POST), so a different item at the same place later was taken for it and dropped.
Now such an item is keyed by a hash of its source, time and text (lmtune.apps.monitor.content_key). This
revision rekeys the positional ledger rows the same way, so items already stored are still recognised
when a file is read again after the upgrade. A row whose content key is already taken (the same item
stored twice from two places) keeps its old key. The hash is written out here, not imported, so the
revision stays what it was if the app's code changes.

Revision ID: 0002
Revises: 0001
"""
import hashlib
import json
import re

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

POSITIONAL = re.compile(r"^(items|[^/\\]+\.jsonl):\d+$")  # the keys 0001's code made for items without an id
CHUNK = 1000


def content_key(source: str, ts, text: str) -> str:
    return "sha256:" + hashlib.sha256(json.dumps([source, ts.isoformat(), text], ensure_ascii=True).encode("ascii")).hexdigest()


def upgrade() -> None:
    conn = op.get_bind()
    ledger = sa.table("ledger", sa.column("key", sa.String), sa.column("item_id", sa.Integer))
    items = sa.table("items", sa.column("id", sa.Integer), sa.column("key", sa.String), sa.column("source", sa.String), sa.column("ts", sa.DateTime),
                     sa.column("text", sa.Text))
    last = -1
    while True:  # a chunk at a time, in item order: a large ledger is never held in memory whole
        rows = conn.execute(sa.select(ledger.c.key, items.c.id, items.c.source, items.c.ts, items.c.text)
                            .join(items, items.c.id == ledger.c.item_id).where(items.c.id > last)
                            .order_by(items.c.id).limit(CHUNK)).all()
        if not rows:
            break
        last = rows[-1].id
        for key, item_id, source, ts, text in rows:
            if not POSITIONAL.match(key):
                continue
            new = content_key(source, ts, text)
            if conn.execute(sa.select(ledger.c.key).where(ledger.c.key == new)).first() is None:
                conn.execute(ledger.update().where(ledger.c.key == key).values(key=new))
                conn.execute(items.update().where(items.c.id == item_id).values(key=new))


def downgrade() -> None:
    pass  # content keys stay valid keys: nothing to undo
