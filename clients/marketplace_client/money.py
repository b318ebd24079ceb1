"""Conversions between Decimal amounts and google.type.Money."""

from __future__ import annotations

from decimal import Decimal

from google.type import money_pb2

_NANOS_PER_UNIT = 1_000_000_000


def to_money(amount: Decimal | str | int, currency: str) -> money_pb2.Money:
    """`amount` as google.type.Money; refuses more than nine decimal places."""
    value = Decimal(amount)
    scaled = value.scaleb(9)
    # Rounding a price silently would charge a different amount than the caller wrote.
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount!r} has more than nine decimal places")
    total_nanos = int(scaled)
    sign = -1 if total_nanos < 0 else 1
    units, nanos = divmod(abs(total_nanos), _NANOS_PER_UNIT)
    return money_pb2.Money(currency_code=currency, units=sign * units, nanos=sign * nanos)


def to_decimal(money: money_pb2.Money) -> Decimal:
    """The exact amount of a google.type.Money (its currency is `money.currency_code`)."""
    return Decimal(money.units) + Decimal(money.nanos).scaleb(-9)
