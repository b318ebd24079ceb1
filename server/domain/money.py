"""Money as an ISO 4217 currency code and an exact decimal amount."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

NANOS_PER_UNIT = 1_000_000_000
# A unit price above a billion is a typo, and bounding it keeps any order total
# (100 lines x 1,000 units) inside the database's NUMERIC(24, 9).
MAX_UNIT_PRICE_UNITS = 1_000_000_000

# Active ISO 4217 codes (2024). Kept inline: a constant list needs no dependency.
ISO_4217_CODES = frozenset(
    [
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "ANG",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BGN",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "UYU",
        "UZS",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XCD",
        "XCG",
        "XOF",
        "XPF",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
    ]
)


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
