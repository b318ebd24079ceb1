"""`make token` and its email claim: <SUB>@example.com by default, EMAIL= to choose one,
EMAIL=none for none; the server keeps a claim that looks like an address."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jwt
import pytest

from server.api.auth import TokenVerifier

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-token-secret-" + "k" * 32


def make_token(*variables: str) -> dict[str, object]:
    environment = {
        key: value for key, value in os.environ.items() if key not in {"EMAIL", "SUB", "ROLE"}
    }
    printed = subprocess.run(
        ["make", "-s", "token", *variables],
        cwd=REPO_ROOT,
        env={**environment, "MARKETPLACE_JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    claims: dict[str, object] = jwt.decode(printed, SECRET, algorithms=["HS256"])
    assert TokenVerifier(secret=SECRET).verify(f"Bearer {printed}").email == claims.get("email")
    return claims


def test_make_token_carries_the_subjects_example_address_by_default() -> None:
    assert make_token("SUB=alice")["email"] == "alice@example.com"


def test_make_token_takes_an_email() -> None:
    claims = make_token("SUB=alice", "EMAIL=alice.smith@shop.example.org")
    assert (claims["sub"], claims["email"]) == ("alice", "alice.smith@shop.example.org")


def test_make_token_email_none_has_no_claim() -> None:
    assert "email" not in make_token("SUB=alice", "EMAIL=none")
