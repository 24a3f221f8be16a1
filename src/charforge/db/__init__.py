"""Persistence: SQLAlchemy 2 models, engine, migrations and owner-scoped repositories."""
