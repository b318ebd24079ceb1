"""Who is calling and what they may do."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.domain.errors import ErrorReason, PermissionDenied, Unauthenticated


class Role(enum.StrEnum):
    CUSTOMER = "customer"
    ADMIN = "admin"


class Access(enum.Enum):
    """What an RPC demands of its caller."""

    PUBLIC = "public"
    AUTHENTICATED = "authenticated"
    CUSTOMER = "customer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Customer:
    """Whom an order is placed for: the token's subject, and its email address when the
    token carries one (where the order's notifications go)."""

    id: str
    email: str | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    roles: frozenset[Role]
    email: str | None = None  # the token's `email` claim, when it looks like an address

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def customer(self) -> Customer:
        return Customer(self.subject, self.email)

    def may_see_customer(self, customer_id: str) -> bool:
        return self.is_admin or self.subject == customer_id


def authorize(access: Access, principal: Principal | None) -> None:
    """Raises when `principal` may not call an RPC that demands `access`."""
    if access is Access.PUBLIC:
        return
    if principal is None:
        raise Unauthenticated("this call needs a bearer token", reason=ErrorReason.MISSING_TOKEN)
    if access is Access.ADMIN and Role.ADMIN not in principal.roles:
        raise PermissionDenied("this call needs the admin role", required_role=Role.ADMIN)
    if access is Access.CUSTOMER and Role.CUSTOMER not in principal.roles:
        raise PermissionDenied("this call needs the customer role", required_role=Role.CUSTOMER)
    if access is Access.AUTHENTICATED and not principal.roles:
        raise PermissionDenied("the token grants no role", required_role=Role.CUSTOMER)
