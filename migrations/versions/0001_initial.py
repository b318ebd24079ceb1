"""Products, orders with their lines, and the stock adjustment audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE products (
            id             uuid PRIMARY KEY,
            sku            varchar(64) NOT NULL UNIQUE,
            name           varchar(200) NOT NULL,
            description    text NOT NULL DEFAULT '',
            price_currency char(3) NOT NULL,
            price_amount   numeric(24, 9) NOT NULL,
            stock          bigint NOT NULL,
            create_time    timestamptz NOT NULL DEFAULT now(),
            update_time    timestamptz NOT NULL DEFAULT now(),
            -- the last line of defence against overselling: no code path may go below zero
            CONSTRAINT products_stock_not_negative CHECK (stock >= 0),
            CONSTRAINT products_price_not_negative CHECK (price_amount >= 0)
        );

        CREATE TABLE orders (
            id                  uuid PRIMARY KEY,
            customer_id         varchar(255) NOT NULL,
            request_id          varchar(100) NOT NULL,
            request_fingerprint char(64) NOT NULL,
            status              varchar(32) NOT NULL,
            currency            char(3) NOT NULL,
            total               numeric(24, 9) NOT NULL,
            cancel_request_id   varchar(100),
            create_time         timestamptz NOT NULL DEFAULT now(),
            update_time         timestamptz NOT NULL DEFAULT now(),
            -- decides concurrent retries of one CreateOrder (AIP-155): the second insert waits
            -- for the first transaction and then sees its row
            CONSTRAINT orders_customer_request_id_key UNIQUE (customer_id, request_id),
            CONSTRAINT orders_status_known CHECK (
                status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED')
            )
        );
        -- ListOrders for one customer and for an admin, newest first
        CREATE INDEX orders_customer_newest ON orders (customer_id, create_time DESC, id DESC);
        CREATE INDEX orders_newest ON orders (create_time DESC, id DESC);

        CREATE TABLE order_lines (
            order_id   uuid NOT NULL REFERENCES orders (id),
            line_no    integer NOT NULL,
            product_id uuid NOT NULL REFERENCES products (id),
            sku        varchar(64) NOT NULL,
            quantity   integer NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
            unit_price numeric(24, 9) NOT NULL,
            currency   char(3) NOT NULL,
            PRIMARY KEY (order_id, line_no),
            CONSTRAINT order_lines_product_once UNIQUE (order_id, product_id)
        );
        CREATE INDEX order_lines_product ON order_lines (product_id);

        CREATE TABLE stock_adjustments (
            id                  uuid PRIMARY KEY,
            product_id          uuid NOT NULL REFERENCES products (id),
            actor               varchar(255) NOT NULL,
            request_id          varchar(100) NOT NULL,
            request_fingerprint char(64) NOT NULL,
            delta               bigint NOT NULL,
            reason              text NOT NULL,
            create_time         timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT stock_adjustments_actor_request_id_key UNIQUE (actor, request_id)
        );
        CREATE INDEX stock_adjustments_product ON stock_adjustments (product_id, create_time);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE stock_adjustments, order_lines, orders, products")
