"""The rule that decides which of several concurrent orders the locked stock can fill."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal

import pytest

from server.domain.errors import FailedPrecondition, NotFound, OutOfStock
from server.domain.money import Money
from server.domain.orders import Allocation, ProductStock, allocate, order_request
from server.services.batching import GroupCommitter

pytestmark = pytest.mark.unit

A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"
EURO = "00000000-0000-4000-8000-00000000000e"


def stock(units: int, price: str = "2.50", currency: str = "USD") -> ProductStock:
    return ProductStock(sku="SKU", price=Money(currency, Decimal(price)), stock=units)


def test_orders_are_filled_in_arrival_order_until_stock_runs_out() -> None:
    requests = [order_request(f"r{i}", [(A, 2)]) for i in range(4)]
    outcomes, taken = allocate(requests, {A: stock(5)})
    assert [type(o) for o in outcomes] == [Allocation, Allocation, OutOfStock, OutOfStock]
    assert taken == {A: 4}
    refused = outcomes[2]
    assert isinstance(refused, OutOfStock)
    assert [(s.requested, s.available) for s in refused.shortages] == [(2, 1)]


def test_an_order_is_all_or_nothing_and_a_refused_one_takes_nothing() -> None:
    requests = [
        order_request("big", [(A, 1), (B, 9)]),  # B is short: A must stay available
        order_request("small", [(A, 1)]),
    ]
    outcomes, taken = allocate(requests, {A: stock(1), B: stock(3)})
    assert isinstance(outcomes[0], OutOfStock)
    assert isinstance(outcomes[1], Allocation)
    assert taken == {A: 1}


def test_a_later_smaller_order_still_fits_after_a_larger_one_is_refused() -> None:
    requests = [order_request("r1", [(A, 5)]), order_request("r2", [(A, 3)])]
    outcomes, taken = allocate(requests, {A: stock(4)})
    assert isinstance(outcomes[0], OutOfStock)
    assert isinstance(outcomes[1], Allocation)
    assert taken == {A: 3}


def test_lines_are_priced_and_totalled_in_request_order() -> None:
    [outcome], _ = allocate(
        [order_request("r", [(B, 2), (A, 1)])], {A: stock(9, "2.50"), B: stock(9, "1.25")}
    )
    assert isinstance(outcome, Allocation)
    assert [line.product_id for line in outcome.lines] == [B, A]
    assert outcome.total == Money("USD", Decimal("5.00"))


def test_unknown_products_and_mixed_currencies_are_refused_without_taking_stock() -> None:
    unknown = "00000000-0000-4000-8000-0000000000ff"
    outcomes, taken = allocate(
        [order_request("u", [(A, 1), (unknown, 1)]), order_request("fx", [(A, 1), (EURO, 1)])],
        {A: stock(5), EURO: stock(5, currency="EUR")},
    )
    assert isinstance(outcomes[0], NotFound)
    assert outcomes[0].resource_id == unknown
    assert isinstance(outcomes[1], FailedPrecondition)
    assert outcomes[1].reason == "MIXED_CURRENCIES"
    assert taken == {}


async def test_group_committer_batches_concurrent_callers_and_answers_each() -> None:
    batches: list[Sequence[int]] = []

    async def double(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(item) if item < 0 else item * 2 for item in items]

    sizes: list[int] = []
    committer: GroupCommitter[int, int] = GroupCommitter(
        double, max_batch=8, runners=1, on_batch=sizes.append
    )
    committer.start()
    try:
        results = await asyncio.gather(
            *(committer.submit(n) for n in [1, 2, -3, 4, 5, 6, 7, 8, 9, 10]),
            return_exceptions=True,
        )
    finally:
        await committer.stop()
    assert results[:2] == [2, 4]
    assert isinstance(results[2], ValueError)
    assert results[3:] == [8, 10, 12, 14, 16, 18, 20]
    assert len(batches) < 10, "concurrent callers must share batches"
    assert max(len(b) for b in batches) <= 8
    assert sizes == [len(b) for b in batches], "each batch's size is reported for metrics"


async def test_group_committer_reports_a_failed_batch_to_every_caller() -> None:
    async def broken(items: Sequence[int]) -> list[int | BaseException]:
        raise RuntimeError("database gone")

    committer: GroupCommitter[int, int] = GroupCommitter(broken, max_batch=4, runners=2)
    committer.start()
    try:
        results = await asyncio.gather(
            *(committer.submit(n) for n in range(5)), return_exceptions=True
        )
    finally:
        await committer.stop()
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_failing_batch_size_callback_does_not_stop_the_committer() -> None:
    async def double(items: Sequence[int]) -> list[int | BaseException]:
        return [item * 2 for item in items]

    def broken_metric(size: int) -> None:
        raise RuntimeError("metrics backend gone")

    committer: GroupCommitter[int, int] = GroupCommitter(
        double, max_batch=4, runners=1, on_batch=broken_metric
    )
    committer.start()
    try:
        assert await asyncio.wait_for(committer.submit(1), timeout=5) == 2
        assert await asyncio.wait_for(committer.submit(2), timeout=5) == 4
    finally:
        await committer.stop()
