"""Every committed change to products is announced on a NOTIFY channel, so server processes
can keep products in memory for GetProduct (server/services/product_cache.py).

Statement-level triggers: an order batch's one stock UPDATE sends one notification listing
its products, not one per row. NOTIFY delivers only on commit, and PostgreSQL drops
duplicates within a transaction.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION notify_product_changes() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            ids text;
        BEGIN
            -- A NOTIFY payload stops at 8,000 bytes: 200 ids of 37 characters per message.
            FOR ids IN
                SELECT string_agg(CAST(id AS text), ',')
                  FROM (SELECT id, (row_number() OVER () - 1) / 200 AS part
                          FROM changed_products) AS numbered
                 GROUP BY part
            LOOP
                PERFORM pg_notify('marketplace_product_changes', ids);
            END LOOP;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER products_updated_notify AFTER UPDATE ON products
            REFERENCING NEW TABLE AS changed_products
            FOR EACH STATEMENT EXECUTE FUNCTION notify_product_changes();
        CREATE TRIGGER products_deleted_notify AFTER DELETE ON products
            REFERENCING OLD TABLE AS changed_products
            FOR EACH STATEMENT EXECUTE FUNCTION notify_product_changes();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER products_deleted_notify ON products;
        DROP TRIGGER products_updated_notify ON products;
        DROP FUNCTION notify_product_changes();
        """
    )
