"""Every committed change to products is announced on a NOTIFY channel, so server processes
can keep products in memory for GetProduct (server/services/product_cache.py).

Statement-level triggers: an order batch's one stock UPDATE sends one notification listing
its products, not one per row; TRUNCATE sends `*` (everything changed). NOTIFY delivers
only on commit, and PostgreSQL drops duplicates within a transaction. The cost: a
transaction that notifies takes a cluster-wide lock from its commit until the commit is
flushed, so such commits no longer share a flush. The server group-commits orders, and
measured no loss; a client committing each order on its own (the benchmark's pgbench
baseline) lost 20-28% of its throughput, which is why the benchmark disables the trigger
while pgbench runs.

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
        CREATE FUNCTION notify_products_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('marketplace_product_changes', '*');
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER products_truncated_notify AFTER TRUNCATE ON products
            FOR EACH STATEMENT EXECUTE FUNCTION notify_products_truncated();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER products_truncated_notify ON products;
        DROP FUNCTION notify_products_truncated();
        DROP TRIGGER products_deleted_notify ON products;
        DROP TRIGGER products_updated_notify ON products;
        DROP FUNCTION notify_product_changes();
        """
    )
