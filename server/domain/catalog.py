"""Products: what a valid product is and how it may change."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from server.domain.inventory import SKU_PATTERN, InventorySource
from server.domain.money import Money, money_problems
from server.domain.payments import chargeable_exponent, is_chargeable
from server.domain.validation import (
    Violations,
    check_request_id,
    check_resource_id,
    check_text,
)

MAX_NAME = 200
MAX_DESCRIPTION = 5_000
MAX_REASON = 500
# A single adjustment beyond this is a fat finger, not a delivery.
MAX_STOCK_DELTA = 1_000_000_000
MAX_INITIAL_STOCK = MAX_STOCK_DELTA
UPDATABLE_FIELDS = frozenset({"sku", "name", "description", "price", "inventory_source"})


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    sku: str
    name: str
    description: str
    price: Money
    stock: int
    create_time: datetime
    update_time: datetime
    inventory_source: InventorySource = InventorySource.MANAGED_HERE


@dataclass(frozen=True, slots=True)
class ProductDraft:
    """The caller-supplied fields of a product, validated."""

    sku: str
    name: str
    description: str
    price: Money
    stock: int
    inventory_source: InventorySource = InventorySource.MANAGED_HERE


@dataclass(frozen=True, slots=True)
class PriceInput:
    currency: str
    units: int
    nanos: int


def _check_fields(
    violations: Violations,
    prefix: str,
    *,
    sku: str | None,
    name: str | None,
    description: str | None,
    price: PriceInput | None,
) -> None:
    if sku is not None and not SKU_PATTERN.fullmatch(sku):
        violations.add(f"{prefix}sku", "must be 1-64 characters of [A-Za-z0-9._-]")
    if name is not None:
        check_text(violations, f"{prefix}name", name, min_len=1, max_len=MAX_NAME)
    if description is not None:
        check_text(
            violations, f"{prefix}description", description, min_len=0, max_len=MAX_DESCRIPTION
        )
    if price is not None:
        for problem in price_problems(price):
            violations.add(f"{prefix}price", problem)


def price_problems(price: PriceInput) -> list[str]:
    """A price must be a well-formed amount that can be charged: above zero, in whole
    units of what the currency's smallest coin is (ISO 4217) and the provider counts."""
    problems = money_problems(price.currency, price.units, price.nanos)
    if problems:
        return problems
    money = Money.from_units_nanos(price.currency, price.units, price.nanos)
    if money.amount == 0:
        return ["amount must be greater than zero"]
    if not is_chargeable(money):
        smallest = Decimal(1).scaleb(-chargeable_exponent(money.currency))
        return [f"amount must be a whole multiple of {smallest} {money.currency}"]
    return []


def new_product(
    *,
    sku: str,
    name: str,
    description: str,
    price: PriceInput | None,
    stock: int,
    inventory_source: InventorySource | None = None,
) -> ProductDraft:
    """`inventory_source` None (unset) is MANAGED_HERE."""
    violations = Violations()
    if price is None:
        violations.add("product.price", "is required")
    _check_fields(violations, "product.", sku=sku, name=name, description=description, price=price)
    source = inventory_source or InventorySource.MANAGED_HERE
    if not 0 <= stock <= MAX_INITIAL_STOCK:
        violations.add("product.stock", f"must be between 0 and {MAX_INITIAL_STOCK:,}")
    elif stock and source is InventorySource.WAREHOUSE:
        violations.add(
            "product.stock", "must be 0 for a warehouse-managed product: the warehouse counts it"
        )
    violations.raise_if_any()
    assert price is not None
    return ProductDraft(
        sku=sku,
        name=name,
        description=description,
        price=Money.from_units_nanos(price.currency, price.units, price.nanos),
        stock=stock,
        inventory_source=source,
    )


@dataclass(frozen=True, slots=True)
class ProductChanges:
    sku: str | None = None
    name: str | None = None
    description: str | None = None
    price: Money | None = None
    inventory_source: InventorySource | None = None

    def apply_to(self, product: Product) -> Product:
        return replace(
            product,
            sku=product.sku if self.sku is None else self.sku,
            name=product.name if self.name is None else self.name,
            description=product.description if self.description is None else self.description,
            price=product.price if self.price is None else self.price,
            inventory_source=self.inventory_source or product.inventory_source,
        )


def product_changes(
    mask: Iterable[str],
    *,
    sku: str,
    name: str,
    description: str,
    price: PriceInput | None,
    inventory_source: InventorySource | None = None,
) -> ProductChanges:
    """Validates an update limited to the fields in `mask` (AIP-134 paths);
    `inventory_source` None is unset."""
    violations = Violations()
    paths = list(mask)
    if not paths:
        violations.add("update_mask", "names no field to update")
    unknown = [p for p in paths if p not in UPDATABLE_FIELDS]
    for path in unknown:
        detail = "is changed only by AdjustStock" if path == "stock" else "cannot be updated"
        violations.add("update_mask", f"{path!r} {detail}")
    wanted = set(paths)
    if "price" in wanted and price is None:
        violations.add("product.price", "is required when in update_mask")
    if "inventory_source" in wanted and inventory_source is None:
        violations.add("product.inventory_source", "is required when in update_mask")
    _check_fields(
        violations,
        "product.",
        sku=sku if "sku" in wanted else None,
        name=name if "name" in wanted else None,
        description=description if "description" in wanted else None,
        price=price if "price" in wanted else None,
    )
    violations.raise_if_any()
    return ProductChanges(
        sku=sku if "sku" in wanted else None,
        name=name if "name" in wanted else None,
        description=description if "description" in wanted else None,
        price=(
            Money.from_units_nanos(price.currency, price.units, price.nanos)
            if "price" in wanted and price is not None
            else None
        ),
        inventory_source=inventory_source if "inventory_source" in wanted else None,
    )


@dataclass(frozen=True, slots=True)
class StockAdjustment:
    product_id: str
    delta: int
    reason: str
    request_id: str

    def fingerprint(self) -> str:
        """Identifies the request's content, to tell a retry from a reused request_id."""
        text = f"adjust\x1f{self.product_id}\x1f{self.delta}\x1f{self.reason}"
        return hashlib.sha256(text.encode()).hexdigest()


def stock_adjustment(
    raw_product_id: str, delta: int, reason: str, request_id: str
) -> StockAdjustment:
    violations = Violations()
    product_id = check_resource_id(violations, "id", raw_product_id)
    if delta == 0:
        violations.add("delta", "must not be zero")
    elif abs(delta) > MAX_STOCK_DELTA:
        violations.add("delta", f"must be at most {MAX_STOCK_DELTA:,} units either way")
    check_text(violations, "reason", reason, min_len=0, max_len=MAX_REASON)
    check_request_id(violations, "request_id", request_id, required=True)
    violations.raise_if_any()
    assert product_id is not None
    return StockAdjustment(product_id, delta, reason, request_id)
