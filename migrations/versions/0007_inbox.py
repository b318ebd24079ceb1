"""The consumers' inbox: a message a consumer applied, recorded in the same transaction as
its effect, so a redelivery (or a replayed dead letter) is not applied twice. Replays of dead
letters keep their answer by request id (AIP-155), so a retried replay answers the same.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE inbox (
            consumer     varchar(64) NOT NULL,
            message_id   varchar(200) NOT NULL,
            process_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, message_id)
        );
        -- Pruning deletes rows by age.
        CREATE INDEX inbox_process_time ON inbox (process_time);
        -- A replayed dead letter as it was (it is gone from the stream), for the answer to
        -- a retry of the same request.
        CREATE TABLE dead_letter_replays (
            caller         varchar(255) NOT NULL,
            request_id     varchar(100) NOT NULL,
            dead_letter_id bigint NOT NULL,
            subject        varchar(255) NOT NULL,
            headers        jsonb NOT NULL,
            data           bytea NOT NULL,
            create_time    timestamptz NOT NULL,
            replay_time    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (caller, request_id)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE dead_letter_replays; DROP TABLE inbox")
