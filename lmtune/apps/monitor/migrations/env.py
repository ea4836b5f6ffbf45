"""Alembic environment of the monitor's schema: run on the connection lmtune.apps.monitor.db hands over."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
