"""Page sizes and opaque page tokens (AIP-158)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_page_token,
    encode_page_token,
    page_size,
)

pytestmark = pytest.mark.unit

NOT_FROM_THIS_LISTING = FieldViolation("page_token", "is not a token from this listing")
POSITION = {"t": "2024-05-01T12:00:00.123456+00:00", "id": "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"}


def raw_token(payload: object) -> str:
    """A token as a client could forge it: any JSON, base64url without padding."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def json_of(token: str) -> bytes:
    """The JSON a token carries, as a client could read it."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def scope_digest(scope: str) -> str:
    """What a token stores instead of its scope: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


ALICE = scope_digest("alice")


def assert_refused(token: str, kind: str = "orders", scope: str = "alice") -> None:
    with pytest.raises(InvalidArgument) as raised:
        decode_page_token(token, kind, scope)
    assert raised.value.violations == (NOT_FROM_THIS_LISTING,)


def test_zero_page_size_means_the_default() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE == 50


@pytest.mark.parametrize("requested", [1, 49, 51, MAX_PAGE_SIZE])
def test_page_size_within_bounds_is_kept(requested: int) -> None:
    assert page_size(requested) == requested


@pytest.mark.parametrize("requested", [MAX_PAGE_SIZE + 1, 10**9])
def test_page_size_is_capped(requested: int) -> None:
    assert page_size(requested) == MAX_PAGE_SIZE == 1_000


@pytest.mark.parametrize("requested", [-1, -(2**31)])
def test_negative_page_size_is_refused(requested: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        page_size(requested)
    assert raised.value.violations == (FieldViolation("page_size", "must not be negative"),)


def test_empty_token_means_the_first_page() -> None:
    assert decode_page_token("", "orders", "alice") is None


@pytest.mark.parametrize(
    ("kind", "scope", "position"),
    [
        ("orders", "alice", POSITION),
        ("orders", "*", POSITION),
        ("products", "*", {"sku": "MUG-01"}),
        ("products", "*", {"sku": ""}),
        ("orders", "auth0|5f7c8ec7c33c6c004bbafe82", {"n": 1, "nested": {"a": [1, 2]}}),
        ("orders", 'quote"and\\slash', {"unicode": "zürich ✓"}),
    ],
)
def test_token_round_trips(kind: str, scope: str, position: dict[str, object]) -> None:
    token = encode_page_token(kind, scope, position)
    assert decode_page_token(token, kind, scope) == position


def test_token_is_url_safe_and_unpadded() -> None:
    # Enough bytes that standard base64 would need '+', '/' or '=' somewhere.
    token = encode_page_token("products", "*", {"sku": "~~~>>>???"})
    assert "=" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!!",
        "%%%",
        "a",
        "eyJr",  # the start of a real token, cut short
        "ünïcode",
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),  # not UTF-8
        raw_token([1, 2, 3]),
        raw_token("just a string"),
        raw_token(None),
        raw_token({"k": "orders", "s": ALICE}),  # no position
        raw_token({"k": "orders", "s": ALICE, "p": [1]}),  # position not an object
        raw_token({"k": "orders", "s": ALICE, "p": None}),
        raw_token({"k": "orders", "s": "alice", "p": {}}),  # the scope itself, not its digest
        raw_token({"k": "orders", "s": ALICE.upper(), "p": {}}),
        raw_token({"k": "orders", "s": hashlib.sha256(b"alice").hexdigest(), "p": {}}),
        raw_token({"k": "orders", "p": {}}),  # no scope
    ],
)
def test_garbage_is_refused(token: str) -> None:
    assert_refused(token)


def test_token_stores_a_digest_of_the_scope_instead_of_the_scope() -> None:
    scope = "auth0|5f7c8ec7c33c6c004bbafe82"
    token = encode_page_token("orders", scope, {"n": 1})
    assert json.loads(json_of(token)) == {"k": "orders", "s": scope_digest(scope), "p": {"n": 1}}
    assert len(scope_digest(scope)) == 16
    assert scope.encode() not in json_of(token)


def test_forged_token_with_the_right_digest_is_decoded() -> None:
    token = raw_token({"k": "orders", "s": ALICE, "p": {"sku": "MUG-01"}})
    assert decode_page_token(token, "orders", "alice") == {"sku": "MUG-01"}


def test_token_length_does_not_depend_on_the_scope() -> None:
    short = encode_page_token("orders", "a", POSITION)
    long = encode_page_token("orders", "Ж" * 255, POSITION)
    assert len(short) == len(long)


def test_token_for_another_kind_is_refused() -> None:
    token = encode_page_token("products", "alice", {"sku": "MUG-01"})
    assert_refused(token, kind="orders", scope="alice")


def test_token_for_another_scope_is_refused() -> None:
    """One customer's token cannot page through another customer's orders."""
    token = encode_page_token("orders", "alice", POSITION)
    assert_refused(token, kind="orders", scope="bob")
    assert_refused(token, kind="orders", scope="*")


def test_overlong_token_is_refused_before_decoding() -> None:
    token = encode_page_token("products", "*", {"sku": "x" * 2_000})
    assert len(token) > 1_024
    assert_refused(token, kind="products", scope="*")


def products_token_of_length(length: int) -> str:
    tokens = (encode_page_token("products", "*", {"pad": "x" * n}) for n in range(length))
    return next(token for token in tokens if len(token) >= length)


def test_token_of_exactly_the_limit_is_decoded() -> None:
    token = products_token_of_length(1_024)
    assert len(token) == 1_024
    # 1,024 base64 characters are 768 bytes of JSON; all but the pad is framing
    framing = len(json_of(encode_page_token("products", "*", {"pad": ""})))
    assert len(json_of(token)) == 768
    assert decode_page_token(token, "products", "*") == {"pad": "x" * (768 - framing)}


def test_token_one_step_over_the_limit_is_refused() -> None:
    token = products_token_of_length(1_025)
    assert len(token) == 1_026  # unpadded base64 never has length 4n + 1
    assert_refused(token, kind="products", scope="*")


def test_tokens_the_server_issues_for_any_valid_subject_are_accepted() -> None:
    subject = "Ж" * 255  # subjects of up to 255 characters pass TokenVerifier
    token = encode_page_token("orders", subject, POSITION)
    assert decode_page_token(token, "orders", subject) == POSITION
