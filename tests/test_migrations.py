"""The server upgrades an empty or older database by itself, keeping older characters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from charforge.api.app import create_app
from charforge.container import build_container
from charforge.db.engine import make_engine
from charforge.db.migrate import current_revision, head_revision, upgrade
from charforge.services import users
from charforge.simulator import A1111Simulator
from tests.conftest import make_settings
from tests.helpers import LiveServer


def test_older_database_is_upgraded_on_start_and_its_characters_work(
    tmp_path: Path, database_url: str, sims: tuple[A1111Simulator, A1111Simulator]
) -> None:
    # A database from before jobs and images existed, holding a character with no style.
    engine = make_engine(database_url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (name, password_hash, is_admin, created_at) "
                "VALUES ('old', NULL, false, '2024-01-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO characters (id, owner_id, name, description, appearance, "
                "primary_style, model, created_at, updated_at) VALUES ('legacy-1', "
                "(SELECT id FROM users WHERE name='old'), 'Hana', '', 'black hair', NULL, NULL, "
                "'2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )
        )
    engine.dispose()

    settings = make_settings(tmp_path / "data", database_url, sims[0].url, sims[1].url)
    container = build_container(settings)
    server = LiveServer(create_app(container)).start()
    try:
        assert current_revision(container.db.engine) == head_revision(container.db.engine)
        with container.db.session() as session:
            _, token = users.create_token(session, users.require_user(session, "old"))
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as client:
            hana: dict[str, Any] = client.get("/api/characters/legacy-1").json()
            assert hana["artStyle"] is None and hana["appearance"] == "black hair"
            response = client.post(
                "/api/image-generation/generate",
                json={"prompt": "Hana in the rain", "characterId": "legacy-1"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "diving.safetensors"
            assert client.get("/api/characters/legacy-1").json()["artStyle"] == {
                "primaryStyle": "anime"
            }
    finally:
        server.stop()


def test_empty_database_is_created_at_head(tmp_path: Path, database_url: str) -> None:
    engine = make_engine(database_url)
    assert current_revision(engine) is None
    upgrade(engine)
    upgrade(engine)  # idempotent
    assert current_revision(engine) == head_revision(engine) == "0009"
    engine.dispose()


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from charforge.db.models import Base

    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []
