"""Refunds keep why the provider refused them (failure_code), so a retry of a refused refund
answers with the same precise error as the first call: PAYMENT_UNKNOWN_TO_PROVIDER for a
payment the provider has no record of, REFUND_REJECTED with the provider's code otherwise.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE refunds ADD COLUMN failure_code varchar(64) NOT NULL DEFAULT ''")


def downgrade() -> None:
    op.execute("ALTER TABLE refunds DROP COLUMN failure_code")
