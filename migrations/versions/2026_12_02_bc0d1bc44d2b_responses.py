"""responses: input items, options, finish_reason and piece lengths of each turn

Revision ID: bc0d1bc44d2b
Revises: 5d1f0c7a9e21
Create Date: 2026-12-02 02:06:43.847255

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "bc0d1bc44d2b"
down_revision: str | Sequence[str] | None = "5d1f0c7a9e21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Turns stored so far keep every value: a null finish_reason reads as `completed`, no
    # input items as the prompt alone, no piece lengths as one delta for the whole reply.
    # Plain ALTER TABLEs, not a batch: on SQLite a batch rebuilds `messages`, which would drop
    # the search revision's triggers.
    op.add_column(
        "messages",
        sa.Column(
            "finish_reason", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True
        ),
    )
    op.add_column("messages", sa.Column("piece_lengths", sa.Text(), nullable=True))
    op.add_column("messages", sa.Column("input_items", sa.JSON(), nullable=True))
    op.add_column("messages", sa.Column("response_options", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    for column in ("response_options", "input_items", "piece_lengths", "finish_reason"):
        op.drop_column("messages", column)
