"""Alembic's environment: the app's engine and models, so the CLI and the app agree.

The app runs `upgrade head` on start and passes its own connection in config.attributes;
the `alembic` command has none and connects with the app's engine (DATABASE_URL).
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from app import engine

config = context.config
app_connection = config.attributes.get("connection")
if app_connection is None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Any constant: workers starting together take turns, and the later ones find nothing to do.
MIGRATION_LOCK = 7_243_901


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        context.run_migrations()


async def run_migrations_from_cli() -> None:
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "Offline (--sql) migrations are not set up; run them against a database."
    )
if app_connection is None:
    asyncio.run(run_migrations_from_cli())
else:
    run_migrations(app_connection)
