"""search: a substring index over ended turns' text, kept by the database itself

SQLite: an FTS5 trigram table whose content is the messages table (external content), kept
by triggers that skip live rows, so checkpoints of a reply being written cost it nothing.
Postgres: a pg_trgm GIN index over ended turns' prompt and reply. Either way the index is
written in the same transaction as the turn, so it cannot drift from the table. Both also
get an index of ended turns newest first, which a search of a common term walks. Autogenerate
cannot see the FTS5 table, its triggers or the GIN index: migrations/env.py leaves them out.

A later SQLite batch migration that rebuilds `messages` drops these triggers with the old
table: it must create them again (SQLITE_TRIGGERS below).

Revision ID: 5d1f0c7a9e21
Revises: 3b35a6bab885
Create Date: 2026-12-02 02:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "5d1f0c7a9e21"
down_revision: str | Sequence[str] | None = "3b35a6bab885"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# With external content, FTS5 deletes a row's entries given the text it indexed: the old one.
INDEX_NEW = (
    "INSERT INTO messages_fts (rowid, prompt_content, response_content)"
    " SELECT new.id, new.prompt_content, new.response_content WHERE NOT new.live;"
)
UNINDEX_OLD = (
    "INSERT INTO messages_fts (messages_fts, rowid, prompt_content, response_content)"
    " SELECT 'delete', old.id, old.prompt_content, old.response_content WHERE NOT old.live;"
)
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN {INDEX_NEW} END",
    f"CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN {UNINDEX_OLD} END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF prompt_content, response_content,"
    f" live ON messages BEGIN {UNINDEX_OLD} {INDEX_NEW} END",
]
SQLITE_INDEX = [
    "CREATE VIRTUAL TABLE messages_fts USING fts5(prompt_content, response_content,"
    " content='messages', content_rowid='id', tokenize='trigram')",
    "INSERT INTO messages_fts (rowid, prompt_content, response_content)"
    " SELECT id, prompt_content, response_content FROM messages WHERE NOT live",
    *SQLITE_TRIGGERS,
]
POSTGRES_INDEX = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX ix_messages_text_trgm ON messages USING gin"
    " (prompt_content gin_trgm_ops, response_content gin_trgm_ops) WHERE NOT live",
]


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        "ix_messages_ended_created_at_id",
        "messages",
        ["created_at", "id"],
        postgresql_where=sa.text("NOT live"),
        sqlite_where=sa.text("NOT live"),
    )
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_INDEX if sqlite else POSTGRES_INDEX:
        op.execute(statement)


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER messages_fts_{trigger}")
        op.execute("DROP TABLE messages_fts")
    else:
        op.execute(
            "DROP INDEX ix_messages_text_trgm"
        )  # pg_trgm stays: others may use it
    op.drop_index(
        "ix_messages_ended_created_at_id",
        "messages",
        postgresql_where=sa.text("NOT live"),
        sqlite_where=sa.text("NOT live"),
    )
