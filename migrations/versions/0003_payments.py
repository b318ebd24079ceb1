"""Payments, refunds, provider webhook events; order expiry and the REFUNDED status.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE orders DROP CONSTRAINT orders_status_known;
        ALTER TABLE orders ADD CONSTRAINT orders_status_known CHECK (
            status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED', 'REFUNDED')
        );
        -- orders placed before this migration get the default payment window
        ALTER TABLE orders ADD COLUMN expire_time timestamptz;
        UPDATE orders SET expire_time = create_time + interval '15 minutes';
        ALTER TABLE orders ALTER COLUMN expire_time SET NOT NULL;
        -- the expiry sweep reads only pending orders, oldest deadline first
        CREATE INDEX orders_pending_expiry ON orders (expire_time)
         WHERE status = 'PENDING_PAYMENT';

        CREATE TABLE payments (
            id                  uuid PRIMARY KEY,
            order_id            uuid NOT NULL REFERENCES orders (id),
            customer_id         varchar(255) NOT NULL,
            request_id          varchar(100) NOT NULL,
            request_fingerprint char(64) NOT NULL,
            status              varchar(32) NOT NULL,
            currency            char(3) NOT NULL,
            amount              numeric(24, 9) NOT NULL,
            amount_refunded     numeric(24, 9) NOT NULL DEFAULT 0,
            provider            varchar(32) NOT NULL,
            payment_method      varchar(255) NOT NULL,
            -- the provider's charge (PaymentIntent) id, recorded before it is confirmed:
            -- what makes a retry, a crash or a concurrent call unable to charge twice
            provider_reference  varchar(255),
            failure_code        varchar(100) NOT NULL DEFAULT '',
            failure_message     text NOT NULL DEFAULT '',
            -- when the reconciler may look at a PENDING payment (a lease: work in flight
            -- pushes it forward)
            next_check_time     timestamptz,
            create_time         timestamptz NOT NULL DEFAULT now(),
            update_time         timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT payments_customer_request_id_key UNIQUE (customer_id, request_id),
            CONSTRAINT payments_status_known CHECK (
                status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'REFUNDED', 'PARTIALLY_REFUNDED')
            ),
            CONSTRAINT payments_refund_within_amount CHECK (
                amount_refunded >= 0 AND amount_refunded <= amount
            )
        );
        -- the last line of defence against charging an order twice: at most one payment
        -- per order is in flight or has taken money
        CREATE UNIQUE INDEX payments_one_live_per_order ON payments (order_id)
         WHERE status IN ('PENDING', 'SUCCEEDED', 'REFUNDED', 'PARTIALLY_REFUNDED');
        CREATE UNIQUE INDEX payments_provider_reference_key ON payments (provider_reference)
         WHERE provider_reference IS NOT NULL;
        CREATE INDEX payments_of_order ON payments (order_id, create_time DESC, id DESC);
        CREATE INDEX payments_to_reconcile ON payments (next_check_time)
         WHERE status = 'PENDING';

        CREATE TABLE refunds (
            id                  uuid PRIMARY KEY,
            payment_id          uuid NOT NULL REFERENCES payments (id),
            actor               varchar(255) NOT NULL,
            request_id          varchar(100) NOT NULL,
            request_fingerprint char(64) NOT NULL,
            currency            char(3) NOT NULL,
            amount              numeric(24, 9) NOT NULL CHECK (amount > 0),
            reason              text NOT NULL DEFAULT '',
            -- a refund that is a step of cancelling a paid order: when it succeeds the
            -- order is cancelled and its stock released, in the same transaction
            cancels_order       boolean NOT NULL DEFAULT false,
            status              varchar(16) NOT NULL,
            provider_reference  varchar(255),
            failure_message     text NOT NULL DEFAULT '',
            next_check_time     timestamptz,
            create_time         timestamptz NOT NULL DEFAULT now(),
            update_time         timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT refunds_actor_request_id_key UNIQUE (actor, request_id),
            CONSTRAINT refunds_status_known CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED'))
        );
        -- one refund of a payment at a time keeps "what is left to refund" exact
        CREATE UNIQUE INDEX refunds_one_pending_per_payment ON refunds (payment_id)
         WHERE status = 'PENDING';
        CREATE INDEX refunds_to_reconcile ON refunds (next_check_time)
         WHERE status = 'PENDING';

        -- provider webhook deliveries already handled (they are retried and may repeat)
        CREATE TABLE provider_events (
            id            varchar(255) PRIMARY KEY,
            type          varchar(100) NOT NULL,
            receive_time  timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE provider_events, refunds, payments;
        DROP INDEX orders_pending_expiry;
        ALTER TABLE orders DROP COLUMN expire_time;
        ALTER TABLE orders DROP CONSTRAINT orders_status_known;
        ALTER TABLE orders ADD CONSTRAINT orders_status_known CHECK (
            status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED')
        );
        """
    )
