"""Warehouse-managed products: each product's inventory source, the warehouse's last applied
stock levels, its shipments, and the SHIPPED order status (docs/architecture.md, "The
warehouse").

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE products ADD COLUMN inventory_source varchar(16) NOT NULL
            DEFAULT 'MANAGED_HERE'
            CONSTRAINT products_inventory_source_known
            CHECK (inventory_source IN ('MANAGED_HERE', 'WAREHOUSE'));

        ALTER TABLE orders DROP CONSTRAINT orders_status_known;
        ALTER TABLE orders ADD CONSTRAINT orders_status_known CHECK (
            status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED', 'REFUNDED', 'SHIPPED')
        );
        -- A warehouse product's stock counts the units of its paid orders not yet shipped:
        -- found from here rather than from the product's every order line ever (pending ones
        -- come from orders_pending_expiry). Not on the order transaction's insert path.
        CREATE INDEX orders_paid ON orders (id) WHERE status = 'PAID';

        -- The last level applied per product and warehouse; a level with a version not
        -- greater than `version` changes nothing.
        CREATE TABLE warehouse_levels (
            product_id  uuid NOT NULL REFERENCES products (id),
            warehouse   varchar(64) NOT NULL,
            on_hand     bigint NOT NULL CHECK (on_hand >= 0),
            version     bigint NOT NULL CHECK (version > 0),
            update_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (product_id, warehouse)
        );

        -- The warehouse's shipment id is the key: a repeated shipment changes nothing.
        CREATE TABLE shipments (
            id           varchar(100) PRIMARY KEY,
            order_id     uuid NOT NULL REFERENCES orders (id),
            warehouse    varchar(64) NOT NULL,
            receive_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX shipments_of_order ON shipments (order_id);

        CREATE TABLE shipment_lines (
            shipment_id   varchar(100) NOT NULL REFERENCES shipments (id),
            product_id    uuid NOT NULL REFERENCES products (id),
            -- the shipment's, repeated so the stock formula reads one table
            order_id      uuid NOT NULL,
            warehouse     varchar(64) NOT NULL,
            sku           varchar(64) NOT NULL,
            quantity      integer NOT NULL CHECK (quantity > 0),
            -- the version of this SKU's level at this warehouse that first excludes these
            -- units (the warehouse's word): below it they are subtracted from stock
            level_version bigint NOT NULL CHECK (level_version > 0),
            -- an applied level's version reached level_version; kept so the stock formula
            -- reads only the few lines still in flight, not every shipment ever
            reflected     boolean NOT NULL,
            PRIMARY KEY (shipment_id, product_id)
        );
        CREATE INDEX shipment_lines_in_flight ON shipment_lines (product_id, warehouse)
         WHERE NOT reflected;
        CREATE INDEX shipment_lines_of_order ON shipment_lines (order_id, product_id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE shipment_lines, shipments, warehouse_levels;
        DROP INDEX orders_paid;
        UPDATE orders SET status = 'PAID' WHERE status = 'SHIPPED';
        ALTER TABLE orders DROP CONSTRAINT orders_status_known;
        ALTER TABLE orders ADD CONSTRAINT orders_status_known CHECK (
            status IN ('PENDING_PAYMENT', 'PAID', 'CANCELLED', 'EXPIRED', 'REFUNDED')
        );
        ALTER TABLE products DROP COLUMN inventory_source;
        """
    )
