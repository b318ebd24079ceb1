"""The transactional outbox: every change other systems care about writes an event row here
in the same transaction as the change; a relay publishes the rows to NATS JetStream.
Orders, payments and products number their events (`event_sequence`, the last one written);
an order keeps its customer's email address for notifications.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE outbox (
            position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id       uuid NOT NULL,
            aggregate_type varchar(32) NOT NULL,
            aggregate_id   varchar(64) NOT NULL,
            sequence       bigint NOT NULL,
            subject        varchar(128) NOT NULL,
            type_name      varchar(128) NOT NULL,
            payload        bytea NOT NULL,
            create_time    timestamptz NOT NULL DEFAULT now(),
            publish_time   timestamptz
        );
        -- The relay reads the unpublished rows in position order. No other index: every
        -- row is inserted once and marked once, and each index costs both (dropping the
        -- unique event_id and (aggregate, sequence) keys and a publish_time index halved
        -- the relay's PostgreSQL CPU per event, docs/benchmarks.md). Event ids are random
        -- UUIDs; an aggregate's sequence is bumped under its row lock, and
        -- tests/integration/test_outbox_writes.py checks it has no gaps or repeats under
        -- concurrency. Pruning walks the primary key from the oldest row.
        CREATE INDEX outbox_unpublished ON outbox (position) WHERE publish_time IS NULL;

        -- The sequence number of the aggregate's last event, bumped by the UPDATE that makes
        -- a change with an event (under the row lock it takes anyway). Rows from before
        -- events start at 0, so their first event is 1.
        ALTER TABLE orders ADD COLUMN event_sequence bigint NOT NULL DEFAULT 0;
        ALTER TABLE payments ADD COLUMN event_sequence bigint NOT NULL DEFAULT 0;
        ALTER TABLE products ADD COLUMN event_sequence bigint NOT NULL DEFAULT 0;
        -- The `email` claim of the token that placed the order (NULL without one): where
        -- the order's notifications go. 254: the longest address SMTP can carry (RFC 5321).
        ALTER TABLE orders ADD COLUMN customer_email varchar(254);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE orders DROP COLUMN customer_email;
        ALTER TABLE products DROP COLUMN event_sequence;
        ALTER TABLE payments DROP COLUMN event_sequence;
        ALTER TABLE orders DROP COLUMN event_sequence;
        DROP TABLE outbox;
        """
    )
