"""The correctness check that ends every scenario."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tests.bench.config import INITIAL_STOCK
from tests.bench.stack import Database

# Every product starts at INITIAL_STOCK, and orders only ever take stock (nothing cancels),
# so for every product: stock >= 0 and stock + units sold == INITIAL_STOCK.
_STOCK_LEDGER = """
SELECT count(*) FILTER (WHERE p.stock < 0),
       count(*) FILTER (WHERE p.stock + coalesce(s.sold, 0) <> %(initial)s),
       count(s.sold)
  FROM products p
  LEFT JOIN (SELECT l.product_id, sum(l.quantity) AS sold
               FROM order_lines l JOIN orders o ON o.id = l.order_id
              WHERE o.status = 'PENDING_PAYMENT'
              GROUP BY l.product_id) s ON s.product_id = p.id
"""
# Orders of this scenario without lines, or whose total is not the sum of their lines.
_BAD_ORDERS = """
SELECT count(*)
  FROM orders o
  LEFT JOIN LATERAL (SELECT count(*) AS n, sum(l.unit_price * l.quantity) AS total
                       FROM order_lines l WHERE l.order_id = o.id) s ON true
 WHERE o.create_time >= %(since)s
   AND (s.n = 0 OR s.total IS DISTINCT FROM o.total OR o.status <> 'PENDING_PAYMENT')
"""
# Lines of this scenario whose SKU, price or currency is not the product's.
_BAD_LINES = """
SELECT count(*)
  FROM orders o
  JOIN order_lines l ON l.order_id = o.id
  JOIN products p ON p.id = l.product_id
 WHERE o.create_time >= %(since)s
   AND (l.sku <> p.sku OR l.unit_price <> p.price_amount OR l.currency <> p.price_currency
        OR l.currency <> o.currency)
"""


# order.created events of this scenario's orders: one per order with events, none without.
_ORDER_EVENTS = """
SELECT count(*) FROM outbox
 WHERE subject = 'marketplace.order.created' AND create_time >= %(since)s
"""


@dataclass(frozen=True)
class Mark:
    """The database before a scenario: its order count and clock."""

    orders: int
    time: datetime


def mark(database: Database) -> Mark:
    with database.connect() as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM orders), clock_timestamp()").fetchone()
    assert row is not None
    return Mark(orders=row[0], time=row[1])


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    orders_created: int
    detail: str

    @property
    def label(self) -> str:
        return "ok" if self.ok else "FAILED"


def check(
    database: Database,
    before: Mark,
    *,
    client_successes: int,
    client_unknown: int = 0,
    events: bool | None = None,
) -> CheckResult:
    """No oversell, stock + sold == initial for every product, and the orders created since
    `before` are exactly the successes the client counted. `client_unknown` is how many
    requests the client abandoned without an answer (wrk at its deadline): each may or may
    not have produced an order. `events`: whether the server writes events (each new order
    then has its order.created; without, none); None: not checked (pgbench)."""
    with database.connect() as conn:
        oversold, unbalanced, touched = conn.execute(
            _STOCK_LEDGER, {"initial": INITIAL_STOCK}
        ).fetchone() or (0, 0, 0)
        orders_now = conn.execute("SELECT count(*) FROM orders").fetchone()[0]  # type: ignore[index]
        bad_orders = conn.execute(_BAD_ORDERS, {"since": before.time}).fetchone()[0]  # type: ignore[index]
        bad_lines = conn.execute(_BAD_LINES, {"since": before.time}).fetchone()[0]  # type: ignore[index]
        order_events = conn.execute(_ORDER_EVENTS, {"since": before.time}).fetchone()[0]  # type: ignore[index]
    created = orders_now - before.orders
    problems = []
    if oversold:
        problems.append(f"{oversold} product(s) below zero stock")
    if unbalanced:
        problems.append(f"{unbalanced} product(s) where stock + sold != initial")
    if bad_orders:
        problems.append(f"{bad_orders} order(s) without lines or with a wrong total/status")
    if bad_lines:
        problems.append(f"{bad_lines} line(s) whose sku/price/currency is not the product's")
    if events is not None and order_events != (created if events else 0):
        problems.append(
            f"{order_events} order.created event(s) for {created} new orders"
            f" (events {'on' if events else 'off'})"
        )
    if not client_successes <= created <= client_successes + client_unknown:
        expected = (
            f"{client_successes}"
            if not client_unknown
            else f"{client_successes}..{client_successes + client_unknown}"
        )
        problems.append(f"{created} orders in the database, the client counted {expected}")
    if problems:
        detail = "; ".join(problems)
    elif client_unknown:
        detail = (
            f"{created} orders = {client_successes} answered OK"
            f" + {created - client_successes} of {client_unknown} left unanswered at stop"
        )
    else:
        detail = f"{created} orders = the client's {client_successes} successes"
    if not problems:
        detail += f"; {touched} products sold from, none oversold, stock + sold = initial"
        if events:
            detail += "; an order.created per order"
    return CheckResult(not problems, created, detail)
