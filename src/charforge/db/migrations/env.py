"""Alembic environment: the engine comes from charforge (see charforge.db.migrate)."""

from __future__ import annotations

from alembic import context

from charforge.db.models import Base

engine = context.config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copy
    )
    with context.begin_transaction():
        context.run_migrations()
