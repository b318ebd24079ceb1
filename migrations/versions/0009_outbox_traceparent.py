"""Each outbox row keeps the W3C trace context of the work that wrote it, so the relay,
publishing later from another task or process, continues that trace in the NATS message's
`traceparent` header (docs/architecture.md, "Tracing"). NULL with tracing off.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 55 characters: a version-00 traceparent, the only one this server writes. Adding a
    # nullable column without a default rewrites no rows.
    op.execute("ALTER TABLE outbox ADD COLUMN traceparent varchar(55)")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox DROP COLUMN traceparent")
