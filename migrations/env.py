"""Alembic's environment: the app's engine and models, so the CLI and the app agree.

The app runs `upgrade head` on start and passes its own connection in config.attributes,
outside any transaction; the `alembic` command has none and connects with the app's engine
(DATABASE_URL). Either way run_migrations() below begins the transaction and commits it.
"""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from app import BoundedConnection, engine

config = context.config
app_connection = config.attributes.get("connection")
if app_connection is None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Any constant: workers starting together take turns, and the later ones find nothing to do.
MIGRATION_LOCK = 7_243_901


@contextmanager
def settings_for_migrating(connection: Connection) -> Iterator[None]:
    """Connection settings for the migration only; the app's come back after it."""
    driver = connection.connection.driver_connection
    if isinstance(driver, BoundedConnection):
        # The app gives up on an answer after a few seconds; a migration may rightly take
        # longer (an index on a big table, another worker's migration ahead of it).
        driver.answer_timeout = None
    if connection.dialect.name == "sqlite":
        # A batch migration rebuilds a table by copy, drop and rename; with foreign keys on,
        # dropping `conversations` deletes every message (ON DELETE CASCADE). The setting
        # cannot change inside a transaction; check_foreign_keys() runs before the commit.
        # The busy timeout is how long a worker waits for another's migration (10 min).
        connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        busy_timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        connection.exec_driver_sql("PRAGMA busy_timeout = 600000")
        connection.commit()  # SQLAlchemy's own; SQLite has no transaction open
    try:
        yield
    finally:
        if isinstance(driver, BoundedConnection):
            del driver.answer_timeout  # back to the class's bound
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA foreign_keys = ON")
            connection.exec_driver_sql(f"PRAGMA busy_timeout = {busy_timeout}")
            connection.commit()


def take_migration_lock(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        # SQLite's drivers begin a transaction only before INSERT/UPDATE/DELETE, so DDL
        # would run outside one: two workers would both create alembic_version, and a failed
        # migration would stay half done. BEGIN IMMEDIATE starts it now, with the write lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))


def check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name != "sqlite":
        return  # Postgres checks them itself
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        table, rowid, parent, _ = broken[0]
        raise CommandError(
            f"Migration rolled back: it would leave {len(broken)} rows with a foreign key "
            f"to nothing (the first: {table} rowid {rowid}, to {parent})."
        )


# The search index (see the "search" revision): autogenerate cannot reflect an FTS5 table or
# its shadow tables, nor compare a GIN index with operator classes; the models do not hold them.
SEARCH_INDEX = ("messages_fts", "ix_messages_text_trgm")


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    return not (name or "").startswith(SEARCH_INDEX)


def run_migrations(connection: Connection) -> None:
    with settings_for_migrating(connection), connection.begin():
        take_migration_lock(connection)
        # Configured inside the transaction, Alembic leaves it to us: one for all migrations.
        context.configure(
            connection=connection,
            target_metadata=SQLModel.metadata,
            render_as_batch=True,
            include_name=include_name,
        )
        context.run_migrations()
        check_foreign_keys(connection)


async def run_migrations_from_cli() -> None:
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "Offline (--sql) migrations are not set up; run them against a database."
    )
if app_connection is None:
    asyncio.run(run_migrations_from_cli())
else:
    run_migrations(app_connection)
