"""A prototype, not the server's code: the order batch as ONE PL/pgSQL call in autocommit (one
round trip, no BEGIN/COMMIT, no pipeline), measured against OrderPlacement, both without
outbox events (OUTBOX_WRITES off), alternating in one process as tests.bench.order_ab does.

    .venv/bin/python -m tests.bench.order_function [batch sizes, default 1 4 10]

Issue 17 asks whether "one server-side function for the whole batch" is worth wiring. The
function is created in the bench's throwaway database at start-up (no migration), and
tests/integration/test_order_function_prototype.py checks that its outcomes equal
OrderPlacement's (so `allocate`'s) on random batches. Events are left out on both sides:
their protobuf payloads are built in Python from the locked rows, which one statement sent
before the lock cannot do (docs/benchmarks.md, "Experiments").
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import uvloop
from sqlalchemy.exc import DBAPIError, IntegrityError

from server.db.driver import psycopg_sql
from server.db.transactions import (
    FOREIGN_KEY_VIOLATION,
    UNIQUE_VIOLATION,
    is_retryable_conflict,
    retrying_transaction,
    sqlstate,
)
from server.domain.errors import (
    DomainError,
    FailedPrecondition,
    NotFound,
    OutOfStock,
    RequestIdReused,
    StockShortage,
)
from server.domain.identity import Customer
from server.domain.money import Money
from server.domain.orders import Order, OrderLine, OrderRequest, OrderStatus, order_total
from server.events.builders import ORDER_CREATED_SEQUENCE
from server.events.outbox import Outbox
from server.services.orders.placement import OrderPlacement, _is_connection_error
from server.services.orders.records import load_orders
from tests.bench.order_ab import Batch, PlaceBatch, alternate_blocks
from tests.bench.stack import bench_database
from tests.conftest import hot_path_pool, sqlalchemy_engine

# The rules are `allocate`'s (server/domain/orders.py), in arrival order, each order all or
# nothing: NotFound for the first unknown product in request order, OutOfStock listing every
# short line in lock order, MIXED_CURRENCIES. Orders are passed as parallel arrays, lines as
# parallel arrays grouped by order in request order (line_orders: the 1-based order index).
# One row per order comes back; Python builds the domain objects from it.
CREATE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION prototype_place_orders(
    order_ids uuid[], customers text[], emails text[], request_ids text[],
    fingerprints text[], line_orders int[], line_products uuid[], line_quantities int[],
    payment_window double precision
) RETURNS TABLE (
    idx int, outcome text, placed_id uuid, placed_at timestamptz, expires_at timestamptz,
    total_amount numeric, line_skus text[], line_prices numeric[], line_currencies text[],
    short_products uuid[], short_requested int[], short_available bigint[]
) LANGUAGE plpgsql AS $function$
DECLARE
    order_count int := cardinality(order_ids);
    line_count int := cardinality(line_products);
    moment timestamptz := now();
    expiry timestamptz := now() + make_interval(secs => payment_window);
    p_ids uuid[];
    p_stock bigint[];
    p_sku text[];
    p_currency text[];
    p_price numeric[];
    remaining bigint[];
    taken bigint[];
    line_product int[];  -- each line's product as a position in p_*, NULL when unknown
    line_sku text[];
    line_price numeric[];
    line_currency text[];
    first_line int[] := array_fill(1, ARRAY[order_count]);
    last_line int[] := array_fill(0, ARRAY[order_count]);
    outcomes text[] := array_fill(NULL::text, ARRAY[order_count]);
    stored uuid[] := array_fill(NULL::uuid, ARRAY[order_count]);
    totals numeric[] := array_fill(NULL::numeric, ARRAY[order_count]);
    seen record;
    ord int;
    li int;
    pos int;
    next_line int := 1;
    unknown uuid;
    is_short boolean;
    mixed boolean;
    amount numeric;
    any_created boolean := false;
BEGIN
    -- Lock in ascending id order, as every writer does (no cycles between transactions).
    SELECT coalesce(array_agg(l.id ORDER BY l.id), '{{}}'), array_agg(l.stock ORDER BY l.id),
           array_agg(l.sku ORDER BY l.id), array_agg(l.currency ORDER BY l.id),
           array_agg(l.price ORDER BY l.id)
      INTO p_ids, p_stock, p_sku, p_currency, p_price
      FROM (SELECT id, stock, sku::text AS sku, price_currency::text AS currency,
                   price_amount AS price
              FROM products WHERE id = ANY(line_products) ORDER BY id FOR UPDATE) AS l;

    SELECT array_agg(l.pos ORDER BY l.k), array_agg(p_sku[l.pos] ORDER BY l.k),
           array_agg(p_price[l.pos] ORDER BY l.k), array_agg(p_currency[l.pos] ORDER BY l.k)
      INTO line_product, line_sku, line_price, line_currency
      FROM (SELECT k, array_position(p_ids, lp) AS pos
              FROM unnest(line_products) WITH ORDINALITY AS u(lp, k)) AS l;

    -- Planned for its keys on every call (EXECUTE), as the current code sends it unprepared:
    -- a generic plan made while orders was small scans it (tests/integration/test_order_plans.py).
    FOR seen IN EXECUTE
        'SELECT CAST(r.i AS int) AS i, o.id, o.request_fingerprint = $3[CAST(r.i AS int)] AS same
           FROM orders o
           JOIN unnest($1, $2) WITH ORDINALITY AS r(customer_id, request_id, i)
          USING (customer_id, request_id)'
        USING customers, request_ids, fingerprints
    LOOP
        IF seen.same THEN
            outcomes[seen.i] := 'replay';
            stored[seen.i] := seen.id;
        ELSE
            outcomes[seen.i] := 'reused';
        END IF;
    END LOOP;

    remaining := p_stock;
    taken := array_fill(0::bigint, ARRAY[cardinality(p_ids)]);
    FOR ord IN 1..order_count LOOP
        first_line[ord] := next_line;
        WHILE next_line <= line_count AND line_orders[next_line] = ord LOOP
            next_line := next_line + 1;
        END LOOP;
        last_line[ord] := next_line - 1;
        CONTINUE WHEN outcomes[ord] IS NOT NULL;

        unknown := NULL;
        FOR li IN first_line[ord]..last_line[ord] LOOP
            IF line_product[li] IS NULL THEN
                unknown := line_products[li];
                EXIT;
            END IF;
        END LOOP;
        IF unknown IS NOT NULL THEN
            outcomes[ord] := 'not_found';
            RETURN QUERY SELECT ord, 'not_found'::text, NULL::uuid, NULL::timestamptz,
                NULL::timestamptz, NULL::numeric, NULL::text[], NULL::numeric[], NULL::text[],
                ARRAY[unknown], NULL::int[], NULL::bigint[];
            CONTINUE;
        END IF;

        is_short := false;
        mixed := false;
        FOR li IN first_line[ord]..last_line[ord] LOOP
            is_short := is_short OR remaining[line_product[li]] < line_quantities[li];
            mixed := mixed OR line_currency[li] <> line_currency[first_line[ord]];
        END LOOP;
        IF is_short THEN
            outcomes[ord] := 'out_of_stock';
            RETURN QUERY
            SELECT ord, 'out_of_stock'::text, NULL::uuid, NULL::timestamptz, NULL::timestamptz,
                   NULL::numeric, NULL::text[], NULL::numeric[], NULL::text[],
                   array_agg(line_products[s.m] ORDER BY line_products[s.m]),
                   array_agg(line_quantities[s.m] ORDER BY line_products[s.m]),
                   array_agg(remaining[line_product[s.m]] ORDER BY line_products[s.m])
              FROM generate_series(first_line[ord], last_line[ord]) AS s(m)
             WHERE remaining[line_product[s.m]] < line_quantities[s.m];
            CONTINUE;
        END IF;
        IF mixed THEN
            outcomes[ord] := 'mixed_currencies';
            RETURN QUERY SELECT ord, 'mixed_currencies'::text, NULL::uuid, NULL::timestamptz,
                NULL::timestamptz, NULL::numeric, line_sku[first_line[ord]:last_line[ord]],
                line_price[first_line[ord]:last_line[ord]],
                line_currency[first_line[ord]:last_line[ord]],
                NULL::uuid[], NULL::int[], NULL::bigint[];
            CONTINUE;
        END IF;

        amount := 0;
        FOR li IN first_line[ord]..last_line[ord] LOOP
            pos := line_product[li];
            remaining[pos] := remaining[pos] - line_quantities[li];
            taken[pos] := taken[pos] + line_quantities[li];
            amount := amount + line_price[li] * line_quantities[li];
        END LOOP;
        outcomes[ord] := 'created';
        totals[ord] := amount;
        any_created := true;
    END LOOP;

    IF any_created THEN
        -- A plain INSERT: a retry of one of these requests committed by another transaction
        -- since the lookup fails the statement (unique key), and the caller runs it again.
        INSERT INTO orders (id, customer_id, customer_email, request_id, request_fingerprint,
                            status, currency, total, create_time, update_time, expire_time,
                            event_sequence)
        SELECT order_ids[g.n], customers[g.n], emails[g.n], request_ids[g.n],
               fingerprints[g.n], 'PENDING_PAYMENT', line_currency[first_line[g.n]],
               totals[g.n], moment, moment, expiry, {ORDER_CREATED_SEQUENCE}
          FROM generate_series(1, order_count) AS g(n)
         WHERE outcomes[g.n] = 'created';
        UPDATE products p SET stock = p.stock - d.quantity, update_time = moment,
                              event_sequence = p.event_sequence + 1
          FROM unnest(p_ids, taken) AS d(id, quantity)
         WHERE p.id = d.id AND d.quantity > 0;
        INSERT INTO order_lines (order_id, line_no, product_id, sku, quantity, unit_price,
                                 currency)
        SELECT order_ids[line_orders[g.n]], g.n - first_line[line_orders[g.n]] + 1,
               line_products[g.n], line_sku[g.n], line_quantities[g.n], line_price[g.n],
               line_currency[g.n]
          FROM generate_series(1, line_count) AS g(n)
         WHERE outcomes[line_orders[g.n]] = 'created';
    END IF;

    RETURN QUERY
    SELECT g.n, outcomes[g.n], order_ids[g.n], moment, expiry,
           totals[g.n], line_sku[first_line[g.n]:last_line[g.n]],
           line_price[first_line[g.n]:last_line[g.n]],
           line_currency[first_line[g.n]:last_line[g.n]],
           NULL::uuid[], NULL::int[], NULL::bigint[]
      FROM generate_series(1, order_count) AS g(n)
     WHERE outcomes[g.n] = 'created'
    UNION ALL
    SELECT g.n, outcomes[g.n], stored[g.n], NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL
      FROM generate_series(1, order_count) AS g(n)
     WHERE outcomes[g.n] IN ('replay', 'reused');
END
$function$
"""
DROP_FUNCTION = (
    "DROP FUNCTION IF EXISTS prototype_place_orders("
    "uuid[], text[], text[], text[], text[], int[], uuid[], int[], double precision)"
)

PLACE_ORDERS = """
    SELECT idx, outcome, placed_id, placed_at, expires_at, total_amount, line_skus,
           line_prices, line_currencies, short_products, short_requested, short_available
      FROM prototype_place_orders(
           CAST(:order_ids AS uuid[]), CAST(:customers AS text[]), CAST(:emails AS text[]),
           CAST(:request_ids AS text[]), CAST(:fingerprints AS text[]),
           CAST(:line_orders AS int[]), CAST(:line_products AS uuid[]),
           CAST(:line_quantities AS int[]), CAST(:payment_window AS double precision))
"""
_PLACE_ORDERS_SQL = psycopg_sql(PLACE_ORDERS)
_INTEGRITY_RACES = frozenset({UNIQUE_VIOLATION, FOREIGN_KEY_VIOLATION})


def install_function(database_url: str) -> None:
    """Creates (or replaces) the prototype in the database at `database_url`."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(CREATE_FUNCTION)


def drop_function(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(DROP_FUNCTION)


class _RequestIdRace(Exception):
    """Another transaction committed one of this batch's request ids first; run again."""


Outcome = Order | DomainError | uuid.UUID


class FunctionPlacement(OrderPlacement):
    """OrderPlacement.place_orders' outcomes (without events: the prototype writes none)
    from one call of prototype_place_orders: copies of one request inside the batch are
    resolved here, as OrderPlacement does, and only the first copies are sent. Only the
    transaction differs; construction, place_order and place_orders are OrderPlacement's."""

    async def _place_orders(
        self, batch: Sequence[tuple[Customer, OrderRequest]]
    ) -> list[Order | DomainError]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        fingerprints = [request.fingerprint() for _, request in batch]
        first_of: dict[tuple[str, str], int] = {}
        copies: dict[int, int] = {}
        for index, (customer, request) in enumerate(batch):
            key = (customer.id, request.request_id)
            if key in first_of:
                if fingerprints[first_of[key]] == fingerprints[index]:
                    copies[index] = first_of[key]
                else:
                    outcomes[index] = RequestIdReused(request.request_id)
            else:
                first_of[key] = index
        firsts = sorted(first_of.values())
        params = self._parameters(batch, fingerprints, firsts)
        try:
            async for attempt in retrying_transaction(extra=_RequestIdRace):
                with attempt:
                    try:
                        async with self._hot_path.connection() as driver:
                            cursor = await driver.execute_reusing_cursor(_PLACE_ORDERS_SQL, params)
                            rows = await cursor.fetchall()
                    except IntegrityError as error:
                        if sqlstate(error) in _INTEGRITY_RACES:
                            raise _RequestIdRace from error
                        raise
        except DBAPIError as error:
            if len(batch) == 1 or is_retryable_conflict(error) or _is_connection_error(error):
                raise
            isolated: list[Order | DomainError] = []
            for single in batch:
                isolated.extend(await self._place_orders([single]))
            return isolated

        taken: set[str] = set()
        for row in rows:
            index = firsts[row[0] - 1]
            outcomes[index] = self._outcome(batch[index], row)
            if row[1] == "created":
                taken.update(line.product_id for line in batch[index][1].lines)
        self._products_changed(taken)
        for index, first_index in copies.items():
            outcomes[index] = outcomes[first_index]
        replayed = [outcome for outcome in outcomes if isinstance(outcome, uuid.UUID)]
        stored: dict[uuid.UUID, Order] = {}
        if replayed:
            async with self._reads.connect() as conn:
                stored = await load_orders(conn, replayed)
        results: list[Order | DomainError] = []
        for outcome in outcomes:
            assert outcome is not None
            results.append(stored[outcome] if isinstance(outcome, uuid.UUID) else outcome)
        return results

    def _parameters(
        self,
        batch: Sequence[tuple[Customer, OrderRequest]],
        fingerprints: Sequence[str],
        firsts: Sequence[int],
    ) -> dict[str, Any]:
        line_orders: list[int] = []
        line_products: list[uuid.UUID] = []
        line_quantities: list[int] = []
        for position, index in enumerate(firsts, start=1):
            for line in batch[index][1].lines:
                line_orders.append(position)
                line_products.append(uuid.UUID(line.product_id))
                line_quantities.append(line.quantity)
        return {
            "order_ids": [uuid.uuid4() for _ in firsts],
            "customers": [batch[i][0].id for i in firsts],
            "emails": [batch[i][0].email for i in firsts],
            "request_ids": [batch[i][1].request_id for i in firsts],
            "fingerprints": [fingerprints[i] for i in firsts],
            "line_orders": line_orders,
            "line_products": line_products,
            "line_quantities": line_quantities,
            "payment_window": self._payment_window_seconds,
        }

    @staticmethod
    def _outcome(placed: tuple[Customer, OrderRequest], row: Sequence[Any]) -> Outcome:
        customer, request = placed
        (_, kind, order_id, moment, expiry, total, skus, prices, currencies) = row[:9]
        shorts, requested, available = row[9:]
        if kind == "replay":
            assert isinstance(order_id, uuid.UUID)
            return order_id
        if kind == "reused":
            return RequestIdReused(request.request_id)
        if kind == "not_found":
            return NotFound("product", str(shorts[0]))
        if kind == "out_of_stock":
            return OutOfStock(
                [
                    StockShortage(str(p), r, a)
                    for p, r, a in zip(shorts, requested, available, strict=True)
                ]
            )
        lines = _lines(request, skus, prices, currencies)
        if kind == "mixed_currencies":
            try:
                order_total(lines)  # builds the domain's error, with its details
            except FailedPrecondition as error:
                return error
            raise RuntimeError("the function refused an order in a single currency")
        if kind != "created":
            raise RuntimeError(f"unknown outcome {kind!r}")
        assert isinstance(moment, datetime)
        assert isinstance(expiry, datetime)
        return Order(
            id=str(order_id),
            customer_id=customer.id,
            status=OrderStatus.PENDING_PAYMENT,
            lines=lines,
            total=Money(currencies[0], total),
            create_time=moment,
            update_time=moment,
            expire_time=expiry,
        )


def _lines(
    request: OrderRequest,
    skus: Sequence[str],
    prices: Sequence[Decimal],
    currencies: Sequence[str],
) -> tuple[OrderLine, ...]:
    return tuple(
        OrderLine(line.product_id, sku, line.quantity, Money(currency, price))
        for line, sku, price, currency in zip(request.lines, skus, prices, currencies, strict=True)
    )


# --- the measurement ------------------------------------------------------------------------


async def _compare(url: str, postmaster_pid: int, sizes: list[int]) -> None:
    engine = sqlalchemy_engine(url, pool_size=2)
    try:
        async with hot_path_pool(url, size=2) as pool:
            current = OrderPlacement(engine, pool, outbox=Outbox(enabled=False))
            function = FunctionPlacement(engine, pool)

            async def checked(name: str, orders: Placement, batch: Batch) -> None:
                outcomes = await orders.place_orders(batch)
                if not all(isinstance(outcome, Order) for outcome in outcomes):
                    raise RuntimeError(f"{name} refused a bench order: {outcomes}")

            versions: dict[str, PlaceBatch] = {
                "current": lambda batch: checked("current", current, batch),
                "function": lambda batch: checked("function", function, batch),
            }
            await alternate_blocks(versions, postmaster_pid, sizes)
    finally:
        await engine.dispose()


Placement = OrderPlacement | FunctionPlacement


def main() -> int:
    sizes = [int(arg) for arg in sys.argv[1:]] or [1, 4, 10]
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-order-function-") as scratch,
        bench_database(Path(scratch), os.environ.get("BENCH_DATABASE_URL") or None) as db,
    ):
        if db.postmaster_pid is None:
            print("PostgreSQL CPU needs the embedded database", file=sys.stderr)
            return 2
        install_function(db.url)
        print("current = OrderPlacement without events, function = prototype_place_orders")
        uvloop.run(_compare(db.url, db.postmaster_pid, sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
