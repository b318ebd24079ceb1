"""Per-request context, bound by the interceptor and read by the servicers."""

from __future__ import annotations

from contextvars import ContextVar

from server.domain.errors import ErrorReason, Unauthenticated
from server.domain.identity import Principal

_principal: ContextVar[Principal | None] = ContextVar("principal", default=None)


def bind_principal(principal: Principal | None) -> None:
    _principal.set(principal)


def current_principal() -> Principal:
    """The authenticated caller; the interceptor already enforced the RPC's access policy."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("this call needs a bearer token", reason=ErrorReason.MISSING_TOKEN)
    return principal
