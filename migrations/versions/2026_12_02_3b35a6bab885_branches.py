"""branches: turns follow turns, conversations keep their leaf, /v1 turns their path

Each conversation's turns become one branch in their order (created_at, then id), the last
its leaf; a conversation's /v1 thread becomes the path of its newest successful turn, so an
OpenAI client resending that history goes on in it. Nothing else changes.

Revision ID: 3b35a6bab885
Revises: 2b8d356d0649
Create Date: 2026-12-02 02:06:56.011609

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "3b35a6bab885"
down_revision: str | Sequence[str] | None = "2b8d356d0649"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARENT_KEY = "fk_messages_parent_id_messages"

# Each turn follows the one before it in its conversation.
CHAIN = """
UPDATE messages SET parent_id = ordered.previous, on_branch = true
FROM (
    SELECT id, lag(id) OVER (
        PARTITION BY conversation_id ORDER BY created_at, id
    ) AS previous
    FROM messages
) AS ordered
WHERE messages.id = ordered.id
"""
LEAVES = """
UPDATE conversations SET leaf_id = (
    SELECT id FROM messages WHERE messages.conversation_id = conversations.id
    ORDER BY created_at DESC, id DESC LIMIT 1
)
"""
# The thread was the hash of the last successful /v1 call's messages plus its reply: the
# path of the conversation's newest successful turn.
PATHS = """
UPDATE messages SET path_hash = conversations.thread
FROM conversations
WHERE conversations.thread IS NOT NULL AND messages.id = (
    SELECT id FROM messages AS turn
    WHERE turn.conversation_id = conversations.id AND turn.is_success
    ORDER BY turn.created_at DESC, turn.id DESC LIMIT 1
)
"""


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "on_branch", sa.Boolean(), server_default=sa.false(), nullable=False
            )
        )
        batch_op.add_column(
            sa.Column(
                "path_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
            )
        )
        batch_op.drop_index("ix_messages_conversation_id_is_success_created_at_id")
        batch_op.drop_index(
            "ix_messages_conversation_id_live",
            postgresql_where=sa.text("live"),
            sqlite_where=sa.text("live"),
        )
        batch_op.create_foreign_key(PARENT_KEY, "messages", ["parent_id"], ["id"])
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leaf_id", sa.Integer(), nullable=True))
    op.execute(CHAIN)
    op.execute(LEAVES)
    op.execute(PATHS)
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_thread_updated_at_id")
        batch_op.drop_column("thread")
    # Built after the data is in: one pass each.
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_conversation_id_created_at_id_on_branch",
            ["conversation_id", "created_at", "id"],
            unique=False,
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        )
        batch_op.create_index(
            "ix_messages_conversation_id_is_success_created_at_id_on_branch",
            ["conversation_id", "is_success", "created_at", "id"],
            unique=False,
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        )
        batch_op.create_index("ix_messages_parent_id", ["parent_id"], unique=False)
        batch_op.create_index(
            "ix_messages_path_hash_id",
            ["path_hash", "id"],
            unique=False,
            postgresql_where=sa.text("path_hash IS NOT NULL"),
            sqlite_where=sa.text("path_hash IS NOT NULL"),
        )


def downgrade() -> None:
    """Downgrade schema: every turn stays, in one list again; the newest path is the thread."""
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "thread", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
            )
        )
        batch_op.create_index(
            "ix_conversations_thread_updated_at_id",
            ["thread", "updated_at", "id"],
            unique=False,
        )
    op.execute(
        "UPDATE conversations SET thread = (SELECT path_hash FROM messages"
        " WHERE messages.conversation_id = conversations.id AND path_hash IS NOT NULL"
        " ORDER BY id DESC LIMIT 1)"
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("leaf_id")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_constraint(PARENT_KEY, type_="foreignkey")
        batch_op.drop_index(
            "ix_messages_path_hash_id",
            postgresql_where=sa.text("path_hash IS NOT NULL"),
            sqlite_where=sa.text("path_hash IS NOT NULL"),
        )
        batch_op.drop_index("ix_messages_parent_id")
        batch_op.drop_index(
            "ix_messages_conversation_id_is_success_created_at_id_on_branch",
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        )
        batch_op.drop_index(
            "ix_messages_conversation_id_created_at_id_on_branch",
            postgresql_where=sa.text("on_branch"),
            sqlite_where=sa.text("on_branch"),
        )
        batch_op.create_index(
            "ix_messages_conversation_id_live",
            ["conversation_id"],
            unique=False,
            postgresql_where=sa.text("live"),
            sqlite_where=sa.text("live"),
        )
        batch_op.create_index(
            "ix_messages_conversation_id_is_success_created_at_id",
            ["conversation_id", "is_success", "created_at", "id"],
            unique=False,
        )
        batch_op.drop_column("path_hash")
        batch_op.drop_column("on_branch")
        batch_op.drop_column("parent_id")
