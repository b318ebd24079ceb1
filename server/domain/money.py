"""Money as an ISO 4217 currency code and an exact decimal amount."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType

import iso4217

NANOS_PER_UNIT = 1_000_000_000
# A unit price above a billion is a typo, and bounding it keeps any order total
# (100 lines x 1,000 units) inside the database's NUMERIC(24, 9).
MAX_UNIT_PRICE_UNITS = 1_000_000_000


def _chargeable_minor_units() -> dict[str, int]:
    """ISO 4217's list one as the iso4217 package ships it: each currency's minor-unit
    exponent, less the fund codes and the units without a minor unit (gold, the SDR, XTS),
    which no price is ever charged in."""
    funds = {
        entry.findtext("Ccy")
        for entry in iso4217.raw_xml.iter("CcyNtry")
        if (name := entry.find("CcyNm")) is not None and name.get("IsFund")
    }
    return {
        currency.code: currency.exponent
        for currency in iso4217.Currency
        if currency.exponent is not None and currency.code not in funds
    }


MINOR_UNITS = MappingProxyType(_chargeable_minor_units())
ISO_4217_CODES = frozenset(MINOR_UNITS)
# For amounts stored before ISO withdrew their code (ANG, BGN): two decimals, as most have.
_WITHDRAWN_CODE_EXPONENT = 2


@dataclass(frozen=True, slots=True)
class Money:
    currency: str
    amount: Decimal

    @classmethod
    def from_units_nanos(cls, currency: str, units: int, nanos: int) -> Money:
        return cls(currency, Decimal(units) + Decimal(nanos).scaleb(-9))

    def units_nanos(self) -> tuple[int, int]:
        """Splits the amount as google.type.Money does: same sign, |nanos| < 1e9."""
        total_nanos = int((self.amount * NANOS_PER_UNIT).to_integral_value())
        sign = -1 if total_nanos < 0 else 1
        units, nanos = divmod(abs(total_nanos), NANOS_PER_UNIT)
        return sign * units, sign * nanos

    def times(self, quantity: int) -> Money:
        return Money(self.currency, self.amount * quantity)

    def plus(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(self.currency, self.amount + other.amount)


def money_problems(currency: str, units: int, nanos: int) -> list[str]:
    """What is wrong with a price given as google.type.Money fields, if anything."""
    problems = []
    if currency not in ISO_4217_CODES:
        problems.append(f"currency_code {currency[:8]!r} is not an ISO 4217 code")
    if not -NANOS_PER_UNIT < nanos < NANOS_PER_UNIT:
        problems.append("nanos must be between -999,999,999 and 999,999,999")
    elif (units > 0 and nanos < 0) or (units < 0 and nanos > 0):
        problems.append("units and nanos must have the same sign")
    if units < 0 or nanos < 0:
        problems.append("amount must not be negative")
    if units >= MAX_UNIT_PRICE_UNITS:
        problems.append(f"amount must be below {MAX_UNIT_PRICE_UNITS:,}")
    return problems


def minor_unit_exponent(currency: str) -> int:
    """Decimals of the currency's minor unit (ISO 4217): 2 for USD, 0 for JPY, 3 for KWD."""
    return MINOR_UNITS.get(currency, _WITHDRAWN_CODE_EXPONENT)


def is_whole_minor_units(money: Money) -> bool:
    return is_whole_at(money, minor_unit_exponent(money.currency))


def is_whole_at(money: Money, decimals: int) -> bool:
    """Whether the amount has no digits beyond `decimals` places."""
    scaled = money.amount.scaleb(decimals)
    return scaled == scaled.to_integral_value()
