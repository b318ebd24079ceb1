"""Settings built from given variables over the two every server needs, for unit tests."""

from __future__ import annotations

from typing import Any

from server.settings import Settings
from tests.conftest import JWT_SECRET


def settings_of(**env: str) -> Settings:
    base: dict[str, Any] = {
        "DATABASE_URL": "postgresql://unused/db",
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
    }
    return Settings(**(base | env))
