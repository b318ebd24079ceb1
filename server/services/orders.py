"""Order use cases. `place_order` is the order + stock transaction."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.driver import DriverPool, HotConnection, psycopg_sql
from server.db.transactions import (
    FOREIGN_KEY_VIOLATION,
    UNIQUE_VIOLATION,
    is_retryable_conflict,
    retrying_transaction,
    sqlstate,
)
from server.domain.errors import DomainError, NotFound, RequestIdReused
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import (
    Allocation,
    Cancellation,
    Order,
    OrderRequest,
    OrderStatus,
    ProductStock,
    allocate,
    cancellation,
)
from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token
from server.domain.payments import payment_in_progress
from server.services.product_cache import ProductsChanged, no_cache
from server.services.rows import LINE_COLUMNS, ORDER_COLUMNS, order_from_rows

# The order + stock transaction, for a batch of orders (a single order is a batch of one).
# Two round trips whatever the batch size, in psycopg's pipeline mode: BEGIN + lock + look up
# retries, then write + COMMIT. The row locks are held for one round trip. The statements
# run on psycopg directly (server/db/driver.py); the `:name` text is the one source of
# truth, converted once for psycopg and imported as is by the benchmark's pgbench baseline.
#
# 1. Lock every product of the batch in ascending id order, in one statement: all writers
#    lock rows in the same global order, so two transactions never wait on each other in a
#    cycle, and the stock read here cannot change until commit.
_LOCK_PRODUCTS = """
    SELECT id, stock, sku, price_currency, price_amount
      FROM products WHERE id = ANY(CAST(:ids AS uuid[]))
     ORDER BY id
       FOR UPDATE
"""
# 2. Which request ids were seen before (AIP-155): those are answered from the stored order.
#    Sent unprepared, so PostgreSQL plans it for each batch's keys and the table as it is
#    now. Prepared, it got a generic plan once psycopg had run it five times and PostgreSQL
#    five more; made while orders was nearly empty, that plan (hash join over a sequential
#    scan) stayed until an ANALYZE of orders, so a server started on an empty table read
#    every order in each batch, with the batch's products locked: 34 ms per lookup at
#    109,000 orders, against 0.4 ms planned for its keys (tests/integration/
#    test_order_plans.py). Planning it costs PostgreSQL about 0.07 ms per batch.
_FIND_BY_REQUEST_IDS = """
    SELECT o.id, o.customer_id, o.request_id, o.request_fingerprint
      FROM orders o
      JOIN unnest(CAST(:customers AS text[]), CAST(:request_ids AS text[]))
           AS r(customer_id, request_id) USING (customer_id, request_id)
"""
# 3. Write the orders that fit, their stock decrements (one per product, summed over the
#    batch) and their lines in one statement. The unique (customer_id, request_id) key is the
#    arbiter of a retry racing in another transaction: if it wins, that order is not
#    inserted, its lines break their foreign key, and the whole transaction is retried,
#    finding the winner's order in step 2. CHECK (stock >= 0) backs the decision made on the
#    locked rows.
_WRITE_ORDERS = """
    WITH new_orders AS (
        INSERT INTO orders (id, customer_id, request_id, request_fingerprint, status,
                            currency, total, create_time, update_time, expire_time)
        SELECT o.id, o.customer_id, o.request_id, o.fingerprint, 'PENDING_PAYMENT',
               o.currency, o.total, now(), now(),
               now() + make_interval(secs => CAST(:payment_window AS double precision))
          FROM unnest(CAST(:order_ids AS uuid[]), CAST(:customers AS text[]),
                      CAST(:request_ids AS text[]), CAST(:fingerprints AS text[]),
                      CAST(:currencies AS text[]), CAST(:totals AS numeric[]))
               AS o(id, customer_id, request_id, fingerprint, currency, total)
        ON CONFLICT (customer_id, request_id) DO NOTHING
        RETURNING id, create_time, expire_time
    ), stock AS (
        UPDATE products p SET stock = p.stock - d.quantity, update_time = now()
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
    )
    SELECT id, create_time, expire_time FROM new_orders
"""
_BEGIN, _COMMIT = "BEGIN", "COMMIT"
_LOCK_PRODUCTS_SQL = psycopg_sql(_LOCK_PRODUCTS)
_FIND_BY_REQUEST_IDS_SQL = psycopg_sql(_FIND_BY_REQUEST_IDS)
_WRITE_ORDERS_SQL = psycopg_sql(_WRITE_ORDERS)
_INTEGRITY_RACES = frozenset({UNIQUE_VIOLATION, FOREIGN_KEY_VIOLATION})
_GET_ORDER = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = :id")
_GET_ORDERS = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ANY(CAST(:ids AS uuid[]))")
_LOCK_ORDER = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = :id FOR UPDATE")
_LINES_OF = text(
    f"SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = ANY(:order_ids)"
    " ORDER BY order_id, line_no"
)
# Giving stock back, for any number of orders: lock the products in ascending id order (the
# order every writer uses, so no lock cycles), then add back what the orders' lines took.
_LOCK_LINE_PRODUCTS = text(
    """
    SELECT id FROM products
     WHERE id IN (SELECT product_id FROM order_lines WHERE order_id = ANY(:order_ids))
     ORDER BY id FOR UPDATE
    """
)
_RELEASE_STOCK = text(
    """
    UPDATE products p SET stock = p.stock + taken.quantity, update_time = now()
      FROM (SELECT product_id, sum(quantity) AS quantity FROM order_lines
             WHERE order_id = ANY(:order_ids) GROUP BY product_id) AS taken
     WHERE p.id = taken.product_id
    RETURNING p.id
    """
)
_MARK_CANCELLED = text(
    """
    UPDATE orders SET status = 'CANCELLED', cancel_request_id = :request_id,
                      cancelled_by = :actor, update_time = now()
     WHERE id = :id
    """
)
_PAYMENTS_IN_FLIGHT = text(
    "SELECT order_id, id FROM payments WHERE order_id = ANY(:ids) AND status = 'PENDING'"
)
# A cancel request id is taken by a cancelled order, or by a paid order's cancellation still
# refunding (it takes the id when its refund completes).
_FIND_CANCELLATION = text(
    """
    SELECT id FROM orders WHERE cancelled_by = :actor AND cancel_request_id = :request_id
    UNION ALL
    SELECT p.order_id FROM refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.actor = :actor AND r.request_id = :request_id AND r.cancels_order
    """
)
_LIST_ALL = text(
    f"""
    SELECT {ORDER_COLUMNS} FROM orders
     WHERE (create_time, id) < (:before_time, :before_id)
     ORDER BY create_time DESC, id DESC LIMIT :limit
    """
)
_LIST_FOR_CUSTOMER = text(
    f"""
    SELECT {ORDER_COLUMNS} FROM orders
     WHERE customer_id = :customer_id AND (create_time, id) < (:before_time, :before_id)
     ORDER BY create_time DESC, id DESC LIMIT :limit
    """
)
_FAR_FUTURE = datetime.fromisoformat("9999-12-31T00:00:00+00:00")
_MAX_UUID = uuid.UUID(int=(1 << 128) - 1)


class _RequestIdRace(Exception):
    """Another transaction committed one of this batch's request ids first; run again."""


class RefundNeeded(Exception):
    """The order is paid: cancelling it is a refund first (the payments use case)."""

    def __init__(self, order: Order) -> None:
        super().__init__(f"order {order.id} is paid")
        self.order = order


async def payments_in_flight(
    conn: AsyncConnection, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Which of these orders have a payment still PENDING (its charge may yet succeed), and
    one such payment of each. Read by a new statement, so it sees payments committed after
    the transaction's earlier snapshots."""
    rows = await conn.execute(_PAYMENTS_IN_FLIGHT, {"ids": list(order_ids)})
    return {row.order_id: row.id for row in rows}


async def release_stock(conn: AsyncConnection, order_ids: Sequence[uuid.UUID]) -> list[str]:
    """Puts the orders' units back on sale and returns the products' ids. The caller moves
    the orders out of a stock-holding status in the same transaction, under the orders' row
    locks, so each order's stock comes back exactly once."""
    await conn.execute(_LOCK_LINE_PRODUCTS, {"order_ids": list(order_ids)})
    released = await conn.execute(_RELEASE_STOCK, {"order_ids": list(order_ids)})
    return [str(row.id) for row in released]


def _is_connection_error(error: DBAPIError) -> bool:
    return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)


@dataclass
class _Decided:
    """One batch transaction's decisions; the accepted orders' create and expiry times come
    from the write, whose answer arrives with COMMIT's."""

    batch: Sequence[tuple[str, OrderRequest]]
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
                    customer_id=self.batch[index][0],
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


class Orders:
    def __init__(
        self,
        engine: AsyncEngine,
        hot_path: DriverPool,
        *,
        payment_window_seconds: float = 900.0,
        products_changed: ProductsChanged = no_cache,
    ) -> None:
        self._engine = engine
        self._hot_path = hot_path
        self._products_changed = products_changed
        self._payment_window_seconds = payment_window_seconds
        # Single-statement reads run in autocommit: no BEGIN/ROLLBACK round trips around them.
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def place_order(self, customer_id: str, request: OrderRequest) -> Order:
        """One order on its own; see place_orders."""
        [outcome] = await self.place_orders([(customer_id, request)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def place_orders(
        self, batch: Sequence[tuple[str, OrderRequest]]
    ) -> list[Order | DomainError]:
        """Places several customers' orders in one transaction, each all or nothing.

        Every order gets its own outcome: the order (the stored one when its customer sent
        this request_id before with the same lines), or RequestIdReused, NotFound for an
        unknown product, OutOfStock listing every short line, MIXED_CURRENCIES.
        """
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
                        # these orders committed meanwhile (see _WRITE_ORDERS).
                        if sqlstate(error) in _INTEGRITY_RACES:
                            raise _RequestIdRace from error
                        raise
        except DBAPIError as error:
            if len(batch) == 1 or is_retryable_conflict(error) or _is_connection_error(error):
                raise
            # Something in one order broke the statement for all; isolate it.
            outcomes: list[Order | DomainError] = []
            for single in batch:
                try:
                    outcomes.append(await self.place_order(*single))
                except DomainError as failure:
                    outcomes.append(failure)
            return outcomes
        # Retries are answered with the order they stored, read after the transaction: it
        # was committed by an earlier one, and a replay returns its current state anyway.
        replayed = [outcome for outcome in placed if isinstance(outcome, uuid.UUID)]
        stored: dict[uuid.UUID, Order] = {}
        if replayed:
            async with self._reads.connect() as conn:
                stored = await self._load_many(conn, replayed)
        return [
            stored[outcome] if isinstance(outcome, uuid.UUID) else outcome for outcome in placed
        ]

    async def _place_batch(
        self,
        driver: HotConnection,
        pipeline: psycopg.AsyncPipeline,
        batch: Sequence[tuple[str, OrderRequest]],
    ) -> _Decided:
        """Locks, decides and queues the write; a retry's outcome is its stored order's id."""
        outcomes: list[Order | DomainError | uuid.UUID | None] = [None] * len(batch)
        fingerprints = [request.fingerprint() for _, request in batch]  # hashed once each
        # Copies of one request inside the batch share the first copy's outcome.
        first_of: dict[tuple[str, str], int] = {}
        copies: dict[int, int] = {}
        for index, (customer_id, request) in enumerate(batch):
            key = (customer_id, request.request_id)
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
                "customers": [batch[i][0] for i in firsts],
                "request_ids": [batch[i][1].request_id for i in firsts],
            },
            prepare=False,  # see _FIND_BY_REQUEST_IDS
        )
        # A Sync, so the backend waits "idle in transaction" while we decide, and the hot
        # path's idle_in_transaction_session_timeout (server/db/driver.py) ends a batch whose
        # process froze here, releasing its row locks. Without BEGIN and COMMIT, with these
        # results fetched on a flush request (PostgreSQL commits a pipeline's statements at
        # its Sync), the batch measured 4-9% less client CPU, but that wait was bounded by
        # no timeout at all.
        await pipeline.sync()
        locked = await locking.fetchall()
        seen = await finding.fetchall()
        products = {
            str(product_id): ProductStock(sku, Money(currency, amount), stock)
            for product_id, stock, sku, currency, amount in locked
        }

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
            written = await self._write(driver, batch, fingerprints, accepted, taken)
        return _Decided(batch, outcomes, copies, accepted, written)

    async def _write(
        self,
        driver: HotConnection,
        batch: Sequence[tuple[str, OrderRequest]],
        fingerprints: Sequence[str],
        accepted: Sequence[tuple[int, uuid.UUID, Allocation]],
        taken: dict[str, int],
    ) -> psycopg.AsyncCursor[Any]:
        """Queues the write in the pipeline; its rows are read once COMMIT is answered."""
        lines = [
            (order_id, number, line)
            for _, order_id, allocation in accepted
            for number, line in enumerate(allocation.lines, start=1)
        ]
        params: dict[str, Any] = {
            "order_ids": [order_id for _, order_id, _ in accepted],
            "customers": [batch[index][0] for index, _, _ in accepted],
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
        return await driver.execute_reusing_cursor(_WRITE_ORDERS_SQL, params)

    async def _load_many(
        self, conn: AsyncConnection, order_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, Order]:
        rows = (await conn.execute(_GET_ORDERS, {"ids": list(order_ids)})).all()
        return {
            row.id: order
            for row, order in zip(rows, await self._with_lines(conn, rows), strict=True)
        }

    async def get_order(self, principal: Principal, order_id: str) -> Order:
        async with self._reads.connect() as conn:
            return await self._load_visible(conn, principal, order_id, lock=False)

    async def cancel_order(self, principal: Principal, order_id: str, request_id: str) -> Order:
        """Cancels a pending order and releases its stock in the same transaction.

        A `request_id` this caller already used to cancel another order is RequestIdReused;
        the unique (cancelled_by, cancel_request_id) index decides concurrent attempts.
        """
        try:
            async for attempt in retrying_transaction():
                with attempt:
                    async with self._engine.begin() as conn:
                        cancelled, released = await self._cancel(
                            conn, principal, order_id, request_id
                        )
                    self._products_changed(released)
                    return cancelled
        except IntegrityError as error:
            if sqlstate(error) == UNIQUE_VIOLATION:
                raise RequestIdReused(request_id) from None
            raise
        raise AssertionError("unreachable: retrying_transaction re-raises")

    async def _cancel(
        self, conn: AsyncConnection, principal: Principal, order_id: str, request_id: str
    ) -> tuple[Order, list[str]]:
        """The order after the cancel, and the products whose stock came back (none when it
        was cancelled or expired already)."""
        if request_id:
            previous = (
                await conn.execute(
                    _FIND_CANCELLATION, {"actor": principal.subject, "request_id": request_id}
                )
            ).all()
            if any(str(row.id) != order_id for row in previous):
                raise RequestIdReused(request_id)
        order = await self._load_visible(conn, principal, order_id, lock=True)
        plan = cancellation(order.id, order.status)
        if plan is Cancellation.NOTHING:
            return order, []
        if plan is Cancellation.REFUND_FIRST:
            raise RefundNeeded(order)
        in_flight = await payments_in_flight(conn, [uuid.UUID(order.id)])
        if in_flight:
            # Its charge may still succeed: cancelling now could keep money for nothing.
            raise payment_in_progress(order.id, str(next(iter(in_flight.values()))))
        released = await release_stock(conn, [uuid.UUID(order.id)])
        await conn.execute(
            _MARK_CANCELLED,
            {
                "id": uuid.UUID(order.id),
                "request_id": request_id or None,
                "actor": principal.subject,
            },
        )
        return await self._load(conn, uuid.UUID(order.id)), released

    async def list_orders(
        self, principal: Principal, page_size: int, page_token: str
    ) -> tuple[list[Order], str]:
        scope = "*" if principal.is_admin else principal.subject
        position = decode_page_token(page_token, kind="orders", scope=scope)
        params: dict[str, Any] = {"limit": page_size + 1}
        params["before_time"], params["before_id"] = _FAR_FUTURE, _MAX_UUID
        if position is not None:
            try:
                params["before_time"] = datetime.fromisoformat(str(position["t"]))
                params["before_id"] = uuid.UUID(str(position["id"]))
            except (KeyError, ValueError):
                raise invalid_page_token() from None
        async with self._reads.connect() as conn:
            if principal.is_admin:
                rows = (await conn.execute(_LIST_ALL, params)).all()
            else:
                params["customer_id"] = principal.subject
                rows = (await conn.execute(_LIST_FOR_CUSTOMER, params)).all()
            page = rows[:page_size]
            orders = await self._with_lines(conn, page)
        next_token = ""
        if len(rows) > page_size:
            last = page[-1]
            next_token = encode_page_token(
                "orders", scope, {"t": last.create_time.isoformat(), "id": str(last.id)}
            )
        return orders, next_token

    async def _load_visible(
        self, conn: AsyncConnection, principal: Principal, order_id: str, *, lock: bool
    ) -> Order:
        statement = _LOCK_ORDER if lock else _GET_ORDER
        row = (await conn.execute(statement, {"id": uuid.UUID(order_id)})).first()
        # Another customer's order is reported as absent: its existence is not theirs to know.
        if row is None or not principal.may_see_customer(row.customer_id):
            raise NotFound("order", order_id)
        return (await self._with_lines(conn, [row]))[0]

    async def _load(self, conn: AsyncConnection, order_id: uuid.UUID) -> Order:
        row = (await conn.execute(_GET_ORDER, {"id": order_id})).one()
        return (await self._with_lines(conn, [row]))[0]

    async def _with_lines(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Order]:
        if not rows:
            return []
        line_rows = (await conn.execute(_LINES_OF, {"order_ids": [row.id for row in rows]})).all()
        lines_by_order: dict[Any, list[Any]] = defaultdict(list)
        for line_row in line_rows:
            lines_by_order[line_row.order_id].append(line_row)
        return [order_from_rows(row, lines_by_order[row.id]) for row in rows]
