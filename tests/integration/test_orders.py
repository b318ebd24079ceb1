"""The order + stock transaction on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.errors import FailedPrecondition, NotFound, OutOfStock, RequestIdReused
from server.domain.identity import Principal, Role
from server.domain.orders import OrderStatus, cancel_request, order_request
from server.services.orders.placement import OrderPlacement
from server.services.use_cases import UseCases
from tests.conftest import hot_path_pool, insert_product, stock_of, table_snapshot

pytestmark = pytest.mark.integration


def customer(name: str | None = None) -> Principal:
    return Principal(name or f"cust-{uuid.uuid4().hex[:8]}", frozenset({Role.CUSTOMER}))


ADMIN = Principal("root", frozenset({Role.ADMIN}))


async def test_order_decrements_every_line_and_captures_prices(
    use_cases: UseCases, database_url: str
) -> None:
    mug = insert_product(database_url, stock=10, price="12.50")
    tee = insert_product(database_url, stock=5, price="19.99")
    buyer = customer()
    order = await use_cases.placement.place_order(
        buyer.subject, order_request("r-1", [(mug, 2), (tee, 1)])
    )
    assert order.status is OrderStatus.PENDING_PAYMENT
    assert [(line.product_id, line.quantity) for line in order.lines] == [(mug, 2), (tee, 1)]
    assert str(order.total.amount.normalize()) == "44.99"
    assert order.total.currency == "USD"
    assert stock_of(database_url, mug) == 8
    assert stock_of(database_url, tee) == 4


async def test_a_short_line_rolls_back_the_whole_order_and_reports_every_short_line(
    use_cases: UseCases, database_url: str
) -> None:
    plenty = insert_product(database_url, stock=100)
    scarce = insert_product(database_url, stock=1)
    empty = insert_product(database_url, stock=0)
    before = table_snapshot(database_url)
    with pytest.raises(OutOfStock) as refused:
        await use_cases.placement.place_order(
            customer().subject,
            order_request("r-short", [(plenty, 5), (scarce, 2), (empty, 1)]),
        )
    shortages = {(s.product_id, s.requested, s.available) for s in refused.value.shortages}
    assert shortages == {(scarce, 2, 1), (empty, 1, 0)}
    assert refused.value.reason == "OUT_OF_STOCK"
    assert table_snapshot(database_url) == before


async def test_an_unknown_product_writes_nothing(use_cases: UseCases, database_url: str) -> None:
    known = insert_product(database_url, stock=3)
    unknown = str(uuid.uuid4())
    before = table_snapshot(database_url)
    with pytest.raises(NotFound):
        await use_cases.placement.place_order(
            customer().subject, order_request("r-unknown", [(known, 1), (unknown, 1)])
        )
    assert table_snapshot(database_url) == before


async def test_mixed_currencies_are_refused_and_write_nothing(
    use_cases: UseCases, database_url: str
) -> None:
    dollars = insert_product(database_url, stock=3, currency="USD")
    euros = insert_product(database_url, stock=3, currency="EUR")
    before = table_snapshot(database_url)
    with pytest.raises(FailedPrecondition) as refused:
        await use_cases.placement.place_order(
            customer().subject, order_request("r-fx", [(dollars, 1), (euros, 1)])
        )
    assert refused.value.reason == "MIXED_CURRENCIES"
    assert table_snapshot(database_url) == before


async def test_a_retry_returns_the_same_order_and_moves_stock_once(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=1)
    buyer = customer()
    first = await use_cases.placement.place_order(
        buyer.subject, order_request("same", [(product, 1)])
    )
    # The stock is gone now, yet the retry must still succeed with the original order.
    again = await use_cases.placement.place_order(
        buyer.subject, order_request("same", [(product, 1)])
    )
    assert again.id == first.id
    assert stock_of(database_url, product) == 0


async def test_a_request_id_reused_with_other_lines_is_refused(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    await use_cases.placement.place_order(buyer.subject, order_request("reuse", [(product, 1)]))
    with pytest.raises(RequestIdReused):
        await use_cases.placement.place_order(buyer.subject, order_request("reuse", [(product, 2)]))
    assert stock_of(database_url, product) == 9


async def test_request_ids_are_scoped_per_customer(use_cases: UseCases, database_url: str) -> None:
    product = insert_product(database_url, stock=10)
    one = await use_cases.placement.place_order(
        customer().subject, order_request("shared", [(product, 1)])
    )
    two = await use_cases.placement.place_order(
        customer().subject, order_request("shared", [(product, 1)])
    )
    assert one.id != two.id
    assert stock_of(database_url, product) == 8


async def test_cancel_restocks_once_and_is_idempotent(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    order = await use_cases.placement.place_order(
        buyer.subject, order_request("c-1", [(product, 4)])
    )
    cancelled = await use_cases.cancellation.cancel_order(
        buyer, cancel_request(order.id, "cancel-1")
    )
    assert cancelled.status is OrderStatus.CANCELLED
    assert stock_of(database_url, product) == 10
    again = await use_cases.cancellation.cancel_order(buyer, cancel_request(order.id, "cancel-2"))
    assert again.status is OrderStatus.CANCELLED
    assert again.update_time == cancelled.update_time
    assert stock_of(database_url, product) == 10


async def test_concurrent_cancels_release_stock_exactly_once(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    order = await use_cases.placement.place_order(
        buyer.subject, order_request("cc", [(product, 3)])
    )
    results = await asyncio.gather(
        *(
            use_cases.cancellation.cancel_order(buyer, cancel_request(order.id, ""))
            for _ in range(10)
        )
    )
    assert {r.status for r in results} == {OrderStatus.CANCELLED}
    assert stock_of(database_url, product) == 10


async def test_expired_orders_cannot_be_cancelled(use_cases: UseCases, database_url: str) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    order = await use_cases.placement.place_order(
        buyer.subject, order_request("expired", [(product, 1)])
    )
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE orders SET status = 'EXPIRED' WHERE id = %s", (order.id,))
    with pytest.raises(FailedPrecondition) as refused:
        await use_cases.cancellation.cancel_order(buyer, cancel_request(order.id, ""))
    assert refused.value.reason == "ORDER_NOT_CANCELLABLE"
    assert stock_of(database_url, product) == 9


async def test_cancelling_a_paid_order_refunds_it_first_and_changes_nothing_without_a_payment(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    order = await use_cases.placement.place_order(
        buyer.subject, order_request("paid", [(product, 1)])
    )
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE orders SET status = 'PAID' WHERE id = %s", (order.id,))
    # A paid order is cancelled by refunding its payment; this one has none to refund.
    with pytest.raises(FailedPrecondition) as refused:
        await use_cases.cancellation.cancel_order(buyer, cancel_request(order.id, ""))
    assert refused.value.reason == "PAYMENT_NOT_REFUNDABLE"
    with psycopg.connect(database_url) as conn:
        status = conn.execute("SELECT status FROM orders WHERE id = %s", (order.id,)).fetchone()
    assert status == ("PAID",)
    assert stock_of(database_url, product) == 9


async def test_other_customers_orders_are_not_found(use_cases: UseCases, database_url: str) -> None:
    product = insert_product(database_url, stock=10)
    owner, stranger = customer(), customer()
    order = await use_cases.placement.place_order(
        owner.subject, order_request("mine", [(product, 1)])
    )
    with pytest.raises(NotFound):
        await use_cases.order_reads.get_order(stranger, order.id)
    with pytest.raises(NotFound):
        await use_cases.cancellation.cancel_order(stranger, cancel_request(order.id, ""))
    assert (await use_cases.order_reads.get_order(ADMIN, order.id)).id == order.id
    assert stock_of(database_url, product) == 9


async def test_list_orders_pages_newest_first_within_the_callers_scope(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=100)
    buyer, other = customer(), customer()
    placed = [
        await use_cases.placement.place_order(
            buyer.subject, order_request(f"l-{i}", [(product, 1)])
        )
        for i in range(7)
    ]
    await use_cases.placement.place_order(other.subject, order_request("other", [(product, 1)]))
    seen: list[str] = []
    token = ""
    while True:
        page, token = await use_cases.order_reads.list_orders(buyer, 3, token)
        assert len(page) <= 3
        seen += [o.id for o in page]
        if not token:
            break
    assert seen == [o.id for o in reversed(placed)]
    _, admin_token = await use_cases.order_reads.list_orders(ADMIN, 1, "")
    with pytest.raises(Exception, match="page_token"):
        await use_cases.order_reads.list_orders(buyer, 1, admin_token)


def test_the_schema_refuses_negative_stock(database_url: str) -> None:
    product = insert_product(database_url, stock=1)
    with (
        pytest.raises(psycopg.errors.CheckViolation),
        psycopg.connect(database_url) as conn,
    ):
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = %s", (product,))
    assert stock_of(database_url, product) == 1


async def test_a_batch_fills_orders_in_arrival_order_each_all_or_nothing(
    use_cases: UseCases, database_url: str
) -> None:
    hot = insert_product(database_url, stock=3)
    other = insert_product(database_url, stock=10)
    buyers = [customer() for _ in range(5)]
    batch = [
        (buyers[0].customer, order_request("b0", [(hot, 2)])),
        (buyers[1].customer, order_request("b1", [(hot, 2), (other, 1)])),  # short on hot
        (buyers[2].customer, order_request("b2", [(other, 4), (hot, 1)])),
        (buyers[2].customer, order_request("b2", [(other, 4), (hot, 1)])),  # copy in batch
        (buyers[3].customer, order_request("b2", [(other, 1)])),  # same id, other customer
        (buyers[4].customer, order_request("b4", [(hot, 1)])),  # nothing left
    ]
    outcomes = await use_cases.placement.place_orders(batch)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["Order", "OutOfStock", "Order", "Order", "Order", "OutOfStock"]
    assert outcomes[2] == outcomes[3]
    assert stock_of(database_url, hot) == 0
    assert stock_of(database_url, other) == 5
    replay = await use_cases.placement.place_orders(batch[:1] + batch[2:3])
    assert [getattr(o, "id", None) for o in replay] == [
        getattr(outcomes[0], "id", None),
        getattr(outcomes[2], "id", None),
    ]
    assert stock_of(database_url, hot) == 0


async def test_a_cancel_request_id_reused_for_another_order_is_refused(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    first = await use_cases.placement.place_order(
        buyer.subject, order_request("x-1", [(product, 2)])
    )
    second = await use_cases.placement.place_order(
        buyer.subject, order_request("x-2", [(product, 3)])
    )
    await use_cases.cancellation.cancel_order(buyer, cancel_request(first.id, "cancel-once"))
    before = table_snapshot(database_url)
    with pytest.raises(RequestIdReused):
        await use_cases.cancellation.cancel_order(buyer, cancel_request(second.id, "cancel-once"))
    assert table_snapshot(database_url) == before
    replay = await use_cases.cancellation.cancel_order(
        buyer, cancel_request(first.id, "cancel-once")
    )
    assert replay.id == first.id
    assert replay.status is OrderStatus.CANCELLED
    assert stock_of(database_url, product) == 7


async def test_concurrent_cancels_of_two_orders_under_one_request_id_cancel_one(
    use_cases: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    buyer = customer()
    placed = [
        await use_cases.placement.place_order(
            buyer.subject, order_request(f"y-{i}", [(product, 1)])
        )
        for i in range(2)
    ]
    results = await asyncio.gather(
        *(
            use_cases.cancellation.cancel_order(buyer, cancel_request(o.id, "same-cancel"))
            for o in placed
        ),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Order", "RequestIdReused"]
    assert stock_of(database_url, product) == 9


async def _race_with_an_uncommitted_order(
    placement: OrderPlacement, database_url: str, *, same_lines: bool
) -> tuple[str, object]:
    """Another transaction has inserted this customer's order under request id R but not
    committed when our transaction looks R up (and finds nothing); it commits while ours
    waits on R's unique key. Returns the other order's id and our outcome."""
    theirs, ours = insert_product(database_url, stock=5), insert_product(database_url, stock=5)
    buyer = customer()
    their_request = order_request("raced", [(theirs, 1)])
    our_request = order_request("raced", [(theirs, 1)] if same_lines else [(ours, 2)])
    other_id = str(uuid.uuid4())
    async with await psycopg.AsyncConnection.connect(database_url) as other:
        await other.execute(
            "INSERT INTO orders (id, customer_id, request_id, request_fingerprint, status,"
            " currency, total, create_time, update_time, expire_time)"
            " VALUES (%s, %s, 'raced', %s, 'PENDING_PAYMENT', 'USD', 10, now(), now(),"
            "         now() + interval '15 minutes')",
            (other_id, buyer.subject, their_request.fingerprint()),
        )
        await other.execute(
            "INSERT INTO order_lines (order_id, line_no, product_id, sku, quantity,"
            " unit_price, currency) SELECT %s, 1, id, sku, 1, 10, 'USD'"
            " FROM products WHERE id = %s",
            (other_id, theirs),
        )
        await other.execute("UPDATE products SET stock = stock - 1 WHERE id = %s", (theirs,))
        placing = asyncio.ensure_future(placement.place_order(buyer.subject, our_request))
        await asyncio.sleep(0.5)  # ours is now waiting on their lock (product or request id)
        assert not placing.done()
        await other.commit()
    outcome = await asyncio.gather(placing, return_exceptions=True)
    assert stock_of(database_url, ours) == 5
    assert stock_of(database_url, theirs) == 4
    return other_id, outcome[0]


async def test_a_request_id_committed_meanwhile_with_other_lines_is_reused_not_internal(
    use_cases: UseCases, database_url: str
) -> None:
    _, outcome = await _race_with_an_uncommitted_order(
        use_cases.placement, database_url, same_lines=False
    )
    assert isinstance(outcome, RequestIdReused), outcome


async def test_a_retry_racing_its_first_attempt_gets_the_first_attempts_order(
    use_cases: UseCases, database_url: str
) -> None:
    other_id, outcome = await _race_with_an_uncommitted_order(
        use_cases.placement, database_url, same_lines=True
    )
    assert getattr(outcome, "id", None) == other_id, outcome


async def test_a_write_that_failed_at_commit_leaves_the_connection_clean_for_the_next_order(
    engine: AsyncEngine, database_url: str
) -> None:
    """The write goes out with COMMIT in one pipeline; when it fails (here on the foreign
    key, a retry having won), the one pooled connection must come back usable."""
    async with hot_path_pool(database_url, size=1) as pool:
        placement = OrderPlacement(engine, pool)
        _, outcome = await _race_with_an_uncommitted_order(
            placement, database_url, same_lines=False
        )
        assert isinstance(outcome, RequestIdReused), outcome
        async with pool.connection() as driver:
            assert driver.info.transaction_status is TransactionStatus.IDLE
        product = insert_product(database_url, stock=3)
        placed = await placement.place_order(
            customer().subject, order_request("next", [(product, 1)])
        )
        assert placed.status is OrderStatus.PENDING_PAYMENT
        assert stock_of(database_url, product) == 2
