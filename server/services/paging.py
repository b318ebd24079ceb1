"""Keyset paging, newest first by (create_time, id), behind opaque page tokens (AIP-158)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token

# Before anything stored: where the first page starts.
_FAR_FUTURE = datetime.fromisoformat("9999-12-31T00:00:00+00:00")
_MAX_UUID = uuid.UUID(int=(1 << 128) - 1)

# The condition and order a listing's query uses, with `:before_time`, `:before_id` and
# `:limit` bound from page_start().
NEWEST_FIRST = (
    "(create_time, id) < (:before_time, :before_id) ORDER BY create_time DESC, id DESC LIMIT :limit"
)


def page_start(page_token: str, page_size: int, *, kind: str, scope: str) -> dict[str, Any]:
    """The bound parameters of the page a token points at, one row more than the page holds
    (that row says whether another page follows)."""
    position = decode_page_token(page_token, kind=kind, scope=scope)
    params: dict[str, Any] = {
        "before_time": _FAR_FUTURE,
        "before_id": _MAX_UUID,
        "limit": page_size + 1,
    }
    if position is not None:
        try:
            params["before_time"] = datetime.fromisoformat(str(position["t"]))
            params["before_id"] = uuid.UUID(str(position["id"]))
        except (KeyError, ValueError):
            raise invalid_page_token() from None
    return params


def next_page_token(rows: Sequence[Any], page_size: int, *, kind: str, scope: str) -> str:
    """The token of the page after `rows[:page_size]`; "" when it was the last."""
    if len(rows) <= page_size:
        return ""
    last = rows[page_size - 1]
    return encode_page_token(kind, scope, {"t": last.create_time.isoformat(), "id": str(last.id)})
