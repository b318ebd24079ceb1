"""CancelOrder request ids are unique per caller (AIP-155: a reused id is refused).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE orders ADD COLUMN cancelled_by varchar(255);
        -- decides two concurrent cancels of different orders under one request id
        CREATE UNIQUE INDEX orders_cancel_request_id_key
            ON orders (cancelled_by, cancel_request_id)
         WHERE cancel_request_id IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP INDEX orders_cancel_request_id_key; ALTER TABLE orders DROP COLUMN cancelled_by"
    )
