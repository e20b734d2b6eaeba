"""conversation threads: how a /v1 call finds the conversation it continues, in one lookup

Revision ID: 2b8d356d0649
Revises: bb608e99419b
Create Date: 2026-11-26 17:49:52.845386

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "2b8d356d0649"
down_revision: str | Sequence[str] | None = "bb608e99419b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Existing conversations get no thread: none of them was continued through /v1 yet.
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
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_conversation_id_live",
            ["conversation_id"],
            unique=False,
            postgresql_where=sa.text("live"),
            sqlite_where=sa.text("live"),
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_messages_conversation_id_live",
            postgresql_where=sa.text("live"),
            sqlite_where=sa.text("live"),
        )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_thread_updated_at_id")
        batch_op.drop_column("thread")
