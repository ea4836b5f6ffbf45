"""The monitor's first schema: items, their entities, the processed-items ledger, alert episodes and alerts.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("items",
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("key", sa.String(255), nullable=False),
                    sa.Column("ts", sa.DateTime, nullable=False, index=True),
                    sa.Column("text", sa.Text, nullable=False),
                    sa.Column("source", sa.String(255), nullable=False),
                    sa.Column("sentiment", sa.String(64), nullable=False),
                    sa.Column("sentiment_score", sa.Float, nullable=False))
    op.create_table("entities",
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True),
                    sa.Column("name", sa.String(255), nullable=False, index=True),
                    sa.Column("label", sa.String(64), nullable=False))
    # the ledger: one row per item key, written in the same transaction as the item, so a crash either
    # keeps both or neither and a restart processes every item exactly once
    op.create_table("ledger",
                    sa.Column("key", sa.String(255), primary_key=True),
                    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
                    sa.Column("processed_at", sa.DateTime, nullable=False))
    op.create_table("episodes",
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("rule", sa.String(128), nullable=False),
                    sa.Column("entity", sa.String(255), nullable=False),
                    sa.Column("started_at", sa.DateTime, nullable=False),
                    sa.Column("ended_at", sa.DateTime, nullable=True),
                    sa.Index("ix_episodes_open", "rule", "entity", "ended_at"))
    op.create_table("alerts",
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("episode_id", sa.Integer, sa.ForeignKey("episodes.id", ondelete="CASCADE"), nullable=False, unique=True),
                    sa.Column("rule", sa.String(128), nullable=False),
                    sa.Column("entity", sa.String(255), nullable=False),
                    sa.Column("fired_at", sa.DateTime, nullable=False),
                    sa.Column("value", sa.Float, nullable=False),
                    sa.Column("detail", sa.Text, nullable=False),
                    sa.Column("delivered_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    for table in ("alerts", "episodes", "ledger", "entities", "items"):
        op.drop_table(table)
