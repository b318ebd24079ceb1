"""Collects field violations so a caller learns every problem in one answer."""

from __future__ import annotations

import re
import uuid

from server.domain.errors import FieldViolation, InvalidArgument

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
_CANONICAL_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


class Violations:
    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(self._items)


def check_text(
    violations: Violations, field: str, value: str, *, min_len: int, max_len: int
) -> None:
    if len(value.strip()) < min_len:
        violations.add(field, "is required" if min_len == 1 else f"needs {min_len}+ characters")
    elif len(value) > max_len:
        violations.add(field, f"must be at most {max_len:,} characters (got {len(value):,})")
    # PostgreSQL text cannot hold NUL, and other control characters are never meant.
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        violations.add(field, "must not contain control characters")


def check_resource_id(violations: Violations, field: str, value: str) -> str | None:
    """Returns the canonical id, or records why `value` is not one."""
    if not value:
        violations.add(field, "is required")
        return None
    if not _CANONICAL_UUID.fullmatch(value):
        violations.add(field, "must be a UUID like 0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b")
        return None
    return str(uuid.UUID(value))


def parse_resource_id(field: str, value: str) -> str:
    violations = Violations()
    canonical = check_resource_id(violations, field, value)
    violations.raise_if_any()
    assert canonical is not None
    return canonical


def check_request_id(violations: Violations, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            violations.add(field, "is required (a UUID is recommended)")
        return
    if not REQUEST_ID_PATTERN.fullmatch(value):
        violations.add(field, "must be 1-100 characters of [A-Za-z0-9._:-], e.g. a UUID")
