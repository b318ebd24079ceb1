"""Placing orders: the order + stock transaction, `OrderPlacement.place_orders`.

A batch of orders (a single order is a batch of one) commits in two round trips whatever
its size, in psycopg's pipeline mode: BEGIN + lock + look up retries, then write + COMMIT.
The row locks are held for one round trip. The statements run on psycopg directly
(server/db/driver.py); their `:name` text below is the one source of truth, converted once
for psycopg and used as is by the benchmark's pgbench baseline.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool, HotConnection, psycopg_sql
from server.db.engine import autocommit_reads
from server.db.transactions import (
    FOREIGN_KEY_VIOLATION,
    UNIQUE_VIOLATION,
    is_retryable_conflict,
    retrying_transaction,
    sqlstate,
)
from server.domain.errors import DomainError, RequestIdReused
from server.domain.identity import Customer
from server.domain.money import Money
from server.domain.orders import (
    Allocation,
    Order,
    OrderRequest,
    OrderStatus,
    ProductStock,
    allocate,
)
from server.events.builders import (
    ORDER_CREATED_SEQUENCE,
    StockChangeCause,
    order_created,
    stock_changed,
)
from server.events.outbox import INSERT_EVENTS, Outbox, OutboxEvent, insert_parameters
from server.services.orders.records import load_orders
from server.services.product_cache import ProductsChanged, no_cache

# 1. Lock every product of the batch in ascending id order, in one statement: all writers
#    lock rows in the same global order, so two transactions never wait on each other in a
#    cycle, and the stock read here cannot change until commit.
#    Also the products' event sequence numbers and the transaction's time, for the events
#    the write carries (built in Python meanwhile, see server/events/outbox.py).
LOCK_PRODUCTS = """
    SELECT id, stock, sku, price_currency, price_amount, event_sequence, now()
      FROM products WHERE id = ANY(CAST(:ids AS uuid[]))
     ORDER BY id
       FOR UPDATE
"""
# 2. Which request ids were seen before (AIP-155): those are answered from the stored order.
#    Sent unprepared: a generic plan made while orders was nearly empty scans the whole
#    table under the batch's locks (tests/integration/test_order_plans.py).
FIND_BY_REQUEST_IDS = """
    SELECT o.id, o.customer_id, o.request_id, o.request_fingerprint
      FROM orders o
      JOIN unnest(CAST(:customers AS text[]), CAST(:request_ids AS text[]))
           AS r(customer_id, request_id) USING (customer_id, request_id)
"""
# 3. Write the orders that fit, their stock decrements (one per product, summed over the
#    batch), their lines and their events in one statement. The unique (customer_id,
#    request_id) key is the arbiter of a retry racing in another transaction: if it wins,
#    that order is not inserted, its lines break their foreign key, and the whole
#    transaction is retried, finding the winner's order in step 2. CHECK (stock >= 0) backs
#    the decision made on the locked rows. Each product's event sequence moves by one (its
#    one stock_changed of the batch); a new order's starts at its order.created.
_WRITE_ORDERS_CTES = f"""
    WITH new_orders AS (
        INSERT INTO orders (id, customer_id, customer_email, request_id, request_fingerprint,
                            status, currency, total, create_time, update_time, expire_time,
                            event_sequence)
        SELECT o.id, o.customer_id, o.email, o.request_id, o.fingerprint, 'PENDING_PAYMENT',
               o.currency, o.total, now(), now(),
               now() + make_interval(secs => CAST(:payment_window AS double precision)),
               {ORDER_CREATED_SEQUENCE}
          FROM unnest(CAST(:order_ids AS uuid[]), CAST(:customers AS text[]),
                      CAST(:customer_emails AS text[]), CAST(:request_ids AS text[]),
                      CAST(:fingerprints AS text[]), CAST(:currencies AS text[]),
                      CAST(:totals AS numeric[]))
               AS o(id, customer_id, email, request_id, fingerprint, currency, total)
        ON CONFLICT (customer_id, request_id) DO NOTHING
        RETURNING id, create_time, expire_time
    ), stock AS (
        UPDATE products p SET stock = p.stock - d.quantity, update_time = now(),
                              event_sequence = p.event_sequence + 1
          FROM unnest(CAST(:product_ids AS uuid[]), CAST(:quantities AS bigint[]))
               AS d(id, quantity)
         WHERE p.id = d.id
    ), lines AS (
        INSERT INTO order_lines (order_id, line_no, product_id, sku, quantity, unit_price,
                                 currency)
        SELECT * FROM unnest(CAST(:line_order_ids AS uuid[]), CAST(:line_numbers AS int[]),
                             CAST(:line_product_ids AS uuid[]), CAST(:line_skus AS text[]),
                             CAST(:line_quantities AS int[]), CAST(:line_prices AS numeric[]),
                             CAST(:line_currencies AS text[]))
    )"""
_RETURN_ORDERS = """
    SELECT id, create_time, expire_time FROM new_orders
"""
WRITE_ORDERS = _WRITE_ORDERS_CTES + ", events AS (" + INSERT_EVENTS + ")" + _RETURN_ORDERS
# With OUTBOX_WRITES off (the benchmark's comparison, and its pgbench baseline's), the same
# without the events.
WRITE_ORDERS_WITHOUT_EVENTS = _WRITE_ORDERS_CTES + _RETURN_ORDERS
_BEGIN, _COMMIT = "BEGIN", "COMMIT"
_LOCK_PRODUCTS_SQL = psycopg_sql(LOCK_PRODUCTS)
_FIND_BY_REQUEST_IDS_SQL = psycopg_sql(FIND_BY_REQUEST_IDS)
_WRITE_ORDERS_SQL = psycopg_sql(WRITE_ORDERS)
_WRITE_ORDERS_WITHOUT_EVENTS_SQL = psycopg_sql(WRITE_ORDERS_WITHOUT_EVENTS)
_INTEGRITY_RACES = frozenset({UNIQUE_VIOLATION, FOREIGN_KEY_VIOLATION})


class _RequestIdRace(Exception):
    """Another transaction committed one of this batch's request ids first; run again."""


def _is_connection_error(error: DBAPIError) -> bool:
    return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)


@dataclass
class _Decided:
    """One batch transaction's decisions; the accepted orders' create and expiry times come
    from the write, whose answer arrives with COMMIT's."""

    batch: Sequence[tuple[Customer, OrderRequest]]
    decided: list[Order | DomainError | uuid.UUID | None]
    copies: dict[int, int]  # a copy of a request in the batch -> its first copy
    accepted: list[tuple[int, uuid.UUID, Allocation]]
    written: psycopg.AsyncCursor[Any] | None

    def products_taken(self) -> set[str]:
        return {line.product_id for _, _, allocation in self.accepted for line in allocation.lines}

    async def outcomes(self) -> list[Order | DomainError | uuid.UUID]:
        outcomes = list(self.decided)
        if self.written is not None:
            created = {
                order_id: (moment, expiry)
                for order_id, moment, expiry in await self.written.fetchall()
            }
            # Every accepted order was inserted: one skipped by ON CONFLICT would have left
            # its lines without an order, failing the foreign key and the whole transaction.
            if len(created) != len(self.accepted):
                raise RuntimeError("an accepted order was not written, yet the batch committed")
            for index, order_id, allocation in self.accepted:
                moment, expiry = created[order_id]
                outcomes[index] = Order(
                    id=str(order_id),
                    customer_id=self.batch[index][0].id,
                    status=OrderStatus.PENDING_PAYMENT,
                    lines=allocation.lines,
                    total=allocation.total,
                    create_time=moment,
                    update_time=moment,
                    expire_time=expiry,
                )
        for index, first_index in self.copies.items():
            outcomes[index] = outcomes[first_index]
        results: list[Order | DomainError | uuid.UUID] = []
        for outcome in outcomes:
            assert outcome is not None
            results.append(outcome)
        return results


class OrderPlacement:
    def __init__(
        self,
        engine: AsyncEngine,
        hot_path: DriverPool,
        *,
        payment_window_seconds: float = 900.0,
        products_changed: ProductsChanged = no_cache,
        on_placed: Callable[[int], None] = lambda count: None,
        outbox: Outbox | None = None,
    ) -> None:
        """`on_placed(n)` hears how many orders a batch answered with an order (a new one
        or a retry's stored one), for the business metrics."""
        self._hot_path = hot_path
        self._events = (outbox or Outbox()).enabled
        self._products_changed = products_changed
        self._on_placed = on_placed
        self._payment_window_seconds = payment_window_seconds
        self._reads = autocommit_reads(engine)

    async def place_order(
        self, customer_id: str, request: OrderRequest, *, customer_email: str | None = None
    ) -> Order:
        """One order on its own; see place_orders."""
        [outcome] = await self.place_orders([(Customer(customer_id, customer_email), request)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def place_orders(
        self, batch: Sequence[tuple[Customer, OrderRequest]]
    ) -> list[Order | DomainError]:
        """Places several customers' orders in one transaction, each all or nothing, with
        an order.created per order and a stock_changed per product.

        Every order gets its own outcome: the order (the stored one when its customer sent
        this request_id before with the same lines), or RequestIdReused, NotFound for an
        unknown product, OutOfStock listing every short line, MIXED_CURRENCIES.
        """
        outcomes = await self._place_orders(batch)
        self._on_placed(sum(1 for outcome in outcomes if isinstance(outcome, Order)))
        return outcomes

    async def _place_orders(
        self, batch: Sequence[tuple[Customer, OrderRequest]]
    ) -> list[Order | DomainError]:
        try:
            async for attempt in retrying_transaction(extra=_RequestIdRace):
                with attempt:
                    try:
                        async with self._hot_path.connection() as driver:
                            # BEGIN and COMMIT are queued by hand: psycopg's transaction()
                            # would sync the pipeline on entry and exit (5 round trips).
                            # BEGIN goes out with the locks; COMMIT with the write, and
                            # leaving the pipeline sends them and waits for their answers
                            # (a sync of our own before leaving would cost a third round
                            # trip). On any error the pool rolls the connection back.
                            async with driver.pipeline() as pipeline:
                                await driver.execute_reusing_cursor(_BEGIN)
                                decided = await self._place_batch(driver, pipeline, batch)
                                await driver.execute_reusing_cursor(_COMMIT)
                            placed = await decided.outcomes()
                        self._products_changed(decided.products_taken())
                    except IntegrityError as error:
                        # The write's violation surfaces with its COMMIT: a retry of one of
                        # these orders committed meanwhile (see WRITE_ORDERS).
                        if sqlstate(error) in _INTEGRITY_RACES:
                            raise _RequestIdRace from error
                        raise
        except DBAPIError as error:
            if len(batch) == 1 or is_retryable_conflict(error) or _is_connection_error(error):
                raise
            # Something in one order broke the statement for all; isolate it.
            outcomes: list[Order | DomainError] = []
            for single in batch:
                outcomes.extend(await self._place_orders([single]))
            return outcomes
        # Retries are answered with the order they stored, read after the transaction: it
        # was committed by an earlier one, and a replay returns its current state anyway.
        replayed = [outcome for outcome in placed if isinstance(outcome, uuid.UUID)]
        stored: dict[uuid.UUID, Order] = {}
        if replayed:
            async with self._reads.connect() as conn:
                stored = await load_orders(conn, replayed)
        return [
            stored[outcome] if isinstance(outcome, uuid.UUID) else outcome for outcome in placed
        ]

    async def _place_batch(
        self,
        driver: HotConnection,
        pipeline: psycopg.AsyncPipeline,
        batch: Sequence[tuple[Customer, OrderRequest]],
    ) -> _Decided:
        """Locks, decides and queues the write; a retry's outcome is its stored order's id."""
        outcomes: list[Order | DomainError | uuid.UUID | None] = [None] * len(batch)
        fingerprints = [request.fingerprint() for _, request in batch]  # hashed once each
        # Copies of one request inside the batch share the first copy's outcome.
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

        product_ids = sorted({line.product_id for _, request in batch for line in request.lines})
        firsts = sorted(first_of.values())
        locking = await driver.execute_reusing_cursor(
            _LOCK_PRODUCTS_SQL, {"ids": [uuid.UUID(p) for p in product_ids]}
        )
        finding = await driver.execute_reusing_cursor(
            _FIND_BY_REQUEST_IDS_SQL,
            {
                "customers": [batch[i][0].id for i in firsts],
                "request_ids": [batch[i][1].request_id for i in firsts],
            },
            prepare=False,  # see FIND_BY_REQUEST_IDS
        )
        # A Sync, so the backend waits "idle in transaction" while we decide, and the hot
        # path's idle_in_transaction_session_timeout ends a batch whose process froze here.
        await pipeline.sync()
        locked = await locking.fetchall()
        seen = await finding.fetchall()
        products = {
            str(product_id): ProductStock(sku, Money(currency, amount), stock)
            for product_id, stock, sku, currency, amount, _, _ in locked
        }
        sequences = {str(row[0]): row[5] for row in locked}
        now: datetime | None = locked[0][6] if locked else None

        replays: dict[int, uuid.UUID] = {}
        for order_id, customer_id, request_id, fingerprint in seen:
            index = first_of[(customer_id, request_id)]
            if fingerprint == fingerprints[index]:
                replays[index] = order_id
            else:
                outcomes[index] = RequestIdReused(request_id)

        fresh = [i for i in firsts if i not in replays and outcomes[i] is None]
        allocations, taken = allocate([batch[i][1] for i in fresh], products)
        accepted: list[tuple[int, uuid.UUID, Allocation]] = []
        for index, allocation in zip(fresh, allocations, strict=True):
            if isinstance(allocation, Allocation):
                accepted.append((index, uuid.uuid4(), allocation))
            else:
                outcomes[index] = allocation

        for index, order_id in replays.items():
            outcomes[index] = order_id
        written = None
        if accepted:
            assert now is not None  # an accepted order locked its products
            events = (
                self._events_of(batch, accepted, taken, products, sequences, now)
                if self._events
                else None
            )
            written = await self._write(driver, batch, fingerprints, accepted, taken, events)
        return _Decided(batch, outcomes, copies, accepted, written)

    def _events_of(
        self,
        batch: Sequence[tuple[Customer, OrderRequest]],
        accepted: Sequence[tuple[int, uuid.UUID, Allocation]],
        taken: dict[str, int],
        products: dict[str, ProductStock],
        sequences: dict[str, int],
        now: datetime,
    ) -> list[OutboxEvent]:
        """The batch's events, from what the lock step read: the write's now() is `now`
        (one transaction), and each product's event sequence moves by one under its lock."""
        expire_time = now + timedelta(seconds=self._payment_window_seconds)
        events = [
            order_created(
                order_id=str(order_id),
                customer_id=batch[index][0].id,
                lines=allocation.lines,
                total=allocation.total,
                expire_time=expire_time,
                occur_time=now,
            )
            for index, order_id, allocation in accepted
        ]
        orders_of: dict[str, list[str]] = {product_id: [] for product_id in taken}
        for _, order_id, allocation in accepted:
            for line in allocation.lines:
                orders_of[line.product_id].append(str(order_id))
        events += [
            stock_changed(
                product_id=product_id,
                sku=products[product_id].sku,
                stock=products[product_id].stock - quantity,
                delta=-quantity,
                cause=StockChangeCause.ORDER_PLACED,
                sequence=sequences[product_id] + 1,
                occur_time=now,
                order_ids=orders_of[product_id],
            )
            for product_id, quantity in sorted(taken.items())
        ]
        return events

    async def _write(
        self,
        driver: HotConnection,
        batch: Sequence[tuple[Customer, OrderRequest]],
        fingerprints: Sequence[str],
        accepted: Sequence[tuple[int, uuid.UUID, Allocation]],
        taken: dict[str, int],
        events: Sequence[OutboxEvent] | None,
    ) -> psycopg.AsyncCursor[Any]:
        """Queues the write in the pipeline, with `events` unless None (OUTBOX_WRITES off);
        its rows are read once COMMIT is answered."""
        lines = [
            (order_id, number, line)
            for _, order_id, allocation in accepted
            for number, line in enumerate(allocation.lines, start=1)
        ]
        params: dict[str, Any] = {
            "order_ids": [order_id for _, order_id, _ in accepted],
            "customers": [batch[index][0].id for index, _, _ in accepted],
            "customer_emails": [batch[index][0].email for index, _, _ in accepted],
            "request_ids": [batch[index][1].request_id for index, _, _ in accepted],
            "fingerprints": [fingerprints[index] for index, _, _ in accepted],
            "currencies": [allocation.total.currency for _, _, allocation in accepted],
            "totals": [allocation.total.amount for _, _, allocation in accepted],
            "product_ids": [uuid.UUID(p) for p in sorted(taken)],
            "quantities": [taken[p] for p in sorted(taken)],
            "line_order_ids": [order_id for order_id, _, _ in lines],
            "line_numbers": [number for _, number, _ in lines],
            "line_product_ids": [uuid.UUID(line.product_id) for _, _, line in lines],
            "line_skus": [line.sku for _, _, line in lines],
            "line_quantities": [line.quantity for _, _, line in lines],
            "line_prices": [line.unit_price.amount for _, _, line in lines],
            "line_currencies": [line.unit_price.currency for _, _, line in lines],
            "payment_window": self._payment_window_seconds,
        }
        if events is None:
            return await driver.execute_reusing_cursor(_WRITE_ORDERS_WITHOUT_EVENTS_SQL, params)
        params.update(insert_parameters(events))
        return await driver.execute_reusing_cursor(_WRITE_ORDERS_SQL, params)
