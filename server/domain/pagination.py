"""Page sizes and opaque page tokens (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from server.domain.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1_000
_MAX_TOKEN_LENGTH = 1_024


def _scope_digest(scope: str) -> str:
    """A short digest keeps tokens small whatever the caller's id, and keeps it out of them."""
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(kind: str, scope: str, position: Mapping[str, Any]) -> str:
    """Tokens name the listing they belong to (`kind` and `scope`), so a token from one
    caller's listing is refused by another's instead of silently showing a wrong page."""
    payload = json.dumps(
        {"k": kind, "s": _scope_digest(scope), "p": dict(position)}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def invalid_page_token() -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", "is not a token from this listing")])


def decode_page_token(token: str, kind: str, scope: str) -> dict[str, Any] | None:
    """The position a token points at; None for the first page."""
    if not token:
        return None
    invalid = invalid_page_token()
    if len(token) > _MAX_TOKEN_LENGTH:
        raise invalid
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise invalid from None
    if (
        not isinstance(data, dict)
        or data.get("k") != kind
        or data.get("s") != _scope_digest(scope)
        or not isinstance(data.get("p"), dict)
    ):
        raise invalid
    position: dict[str, Any] = data["p"]
    return position
