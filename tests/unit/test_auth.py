"""Bearer token verification: keys, expiry, required claims, roles, issuer and audience."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from server.api.auth import TokenVerifier, issue_development_token, single_authorization
from server.domain.errors import Unauthenticated
from server.domain.identity import Principal, Role

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-" + "s" * 32
OTHER_SECRET = "another-secret-" + "o" * 32


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def rsa_public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rsa-public.pem"
    path.write_text(public_pem(rsa_key))
    return path


@pytest.fixture
def ec_public_key_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "ec-public.pem"
    path.write_text(public_pem(ec_key))
    return path


@pytest.fixture
def jwks_file(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> Path:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    keys = [
        {**rsa_jwk, "kid": "rsa-1", "use": "sig", "alg": "RS256"},
        {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES256"},
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "alice", "roles": ["customer"], "iat": now, "exp": now + 600}
    payload.update(overrides)
    return {key: value for key, value in payload.items() if value is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def verify_fails(verifier: TokenVerifier, authorization: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(authorization)
    return raised.value


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET)


def test_hs256_token_yields_the_principal(verifier: TokenVerifier) -> None:
    principal = verifier.verify("Bearer " + hs256(claims(sub="alice", roles=["customer"])))
    assert principal == Principal("alice", frozenset({Role.CUSTOMER}))


def test_development_token_verifies(verifier: TokenVerifier) -> None:
    token = issue_development_token(SECRET, "root", ["admin"], lifetime_seconds=60)
    assert verifier.verify(f"Bearer {token}") == Principal("root", frozenset({Role.ADMIN}))


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_scheme_is_case_insensitive(verifier: TokenVerifier, scheme: str) -> None:
    assert verifier.verify(f"{scheme} {hs256(claims())}").subject == "alice"


def test_surrounding_spaces_around_the_token_are_ignored(verifier: TokenVerifier) -> None:
    assert verifier.verify(f"Bearer   {hs256(claims())}  ").subject == "alice"


@pytest.mark.parametrize("authorization", ["", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcg=="])
def test_missing_bearer_token(verifier: TokenVerifier, authorization: str) -> None:
    error = verify_fails(verifier, authorization)
    assert error.reason == "MISSING_TOKEN"


@pytest.mark.parametrize("token", ["abc", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_malformed_token_is_invalid(verifier: TokenVerifier, token: str) -> None:
    error = verify_fails(verifier, f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"
    assert error.message.startswith("the token is not valid")


def test_wrong_signature_is_invalid(verifier: TokenVerifier) -> None:
    error = verify_fails(verifier, "Bearer " + hs256(claims(roles=["admin"]), OTHER_SECRET))
    assert error.reason == "INVALID_TOKEN"
    assert "Signature verification failed" in error.message


def test_tampered_payload_is_invalid(verifier: TokenVerifier) -> None:
    header, _, signature = hs256(claims(roles=["customer"])).split(".")
    forged_payload = hs256(claims(roles=["admin"])).split(".")[1]
    error = verify_fails(verifier, f"Bearer {header}.{forged_payload}.{signature}")
    assert error.reason == "INVALID_TOKEN"


def test_unsigned_token_is_refused(verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(roles=["admin"]), "", algorithm="none")
    error = verify_fails(verifier, f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"


def test_expired_token(verifier: TokenVerifier) -> None:
    now = int(time.time())
    error = verify_fails(verifier, "Bearer " + hs256(claims(iat=now - 7200, exp=now - 3600)))
    assert error.reason == "TOKEN_EXPIRED"
    assert error.message == "the token has expired"


def test_expiry_within_the_leeway_is_tolerated() -> None:
    token = hs256(claims(exp=int(time.time()) - 10))
    assert TokenVerifier(secret=SECRET, leeway_seconds=30).verify(f"Bearer {token}")
    error = verify_fails(TokenVerifier(secret=SECRET, leeway_seconds=0), f"Bearer {token}")
    assert error.reason == "TOKEN_EXPIRED"


def test_token_not_yet_valid_is_refused(verifier: TokenVerifier) -> None:
    error = verify_fails(verifier, "Bearer " + hs256(claims(nbf=int(time.time()) + 3600)))
    assert error.reason == "INVALID_TOKEN"


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_required_claims(verifier: TokenVerifier, claim: str) -> None:
    payload = claims()
    del payload[claim]
    error = verify_fails(verifier, "Bearer " + hs256(payload))
    assert error.reason == "INVALID_TOKEN"
    assert f'"{claim}"' in error.message


@pytest.mark.parametrize(
    "subject",
    ["", 42, ["alice"], "x" * 256, "ali\nce", "\x00"],
)
def test_bad_subject_is_refused(verifier: TokenVerifier, subject: object) -> None:
    error = verify_fails(verifier, "Bearer " + hs256(claims(sub=subject)))
    assert error.reason == "INVALID_TOKEN"


def test_subject_of_255_characters_is_accepted(verifier: TokenVerifier) -> None:
    assert verifier.verify("Bearer " + hs256(claims(sub="x" * 255))).subject == "x" * 255


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["customer"], {Role.CUSTOMER}),
        (["admin", "customer"], {Role.ADMIN, Role.CUSTOMER}),
        ("admin customer", {Role.ADMIN, Role.CUSTOMER}),
        ("  admin   ", {Role.ADMIN}),
        ("admin", {Role.ADMIN}),
        ("", set()),
        ([], set()),
        (["superuser", "customer", 7, None, {"admin": True}], {Role.CUSTOMER}),
        (["ADMIN", "Admin"], set()),
    ],
)
def test_roles_claim_as_list_or_space_separated_string(
    verifier: TokenVerifier, roles: object, expected: set[Role]
) -> None:
    assert verifier.verify("Bearer " + hs256(claims(roles=roles))).roles == frozenset(expected)


def test_missing_roles_claim_grants_no_role(verifier: TokenVerifier) -> None:
    payload = claims()
    del payload["roles"]
    assert verifier.verify("Bearer " + hs256(payload)).roles == frozenset()


def test_email_claim_that_looks_like_an_address_is_the_principals(
    verifier: TokenVerifier,
) -> None:
    principal = verifier.verify("Bearer " + hs256(claims(email="Alice.B+shop@mail.example.org")))
    assert principal.email == "Alice.B+shop@mail.example.org"
    assert principal.customer.email == principal.email
    assert principal.customer.id == "alice"


@pytest.mark.parametrize(
    "email",
    [
        "alice",
        "alice@localhost",
        "two@@example.com",
        "a b@example.com",
        "<alice@example.com>",
        "alice@example.com\nBcc: eve@example.com",
        "x" * 250 + "@example.com",
        "élise@example.com",
        # dots the pattern lets through and a To header cannot hold (RFC 5322 dot-atom)
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        7,
        ["alice@example.com"],
        {"address": "alice@example.com"},
        "",
    ],
)
def test_an_email_claim_that_is_not_an_address_is_ignored(
    verifier: TokenVerifier, email: object
) -> None:
    principal = verifier.verify("Bearer " + hs256(claims(email=email)))
    assert principal == Principal("alice", frozenset({Role.CUSTOMER}))
    assert principal.email is None


def test_development_token_carries_the_email_it_is_given(verifier: TokenVerifier) -> None:
    token = issue_development_token(
        SECRET, "bob", ["customer"], lifetime_seconds=60, email="bob@example.com"
    )
    assert verifier.verify(f"Bearer {token}").email == "bob@example.com"


@pytest.mark.parametrize("roles", [{"admin": True}, 1, True])
def test_roles_of_another_type_are_refused(verifier: TokenVerifier, roles: object) -> None:
    error = verify_fails(verifier, "Bearer " + hs256(claims(roles=roles)))
    assert error.message == "the token's roles must be a list of strings"


def test_issuer_is_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, issuer="https://id.example.com/")
    good = hs256(claims(iss="https://id.example.com/"))
    assert verifier.verify(f"Bearer {good}").subject == "alice"
    for payload in (claims(iss="https://evil.example.com/"), claims(iss="https://id.example.com")):
        assert verify_fails(verifier, "Bearer " + hs256(payload)).reason == "INVALID_TOKEN"
    missing = verify_fails(verifier, "Bearer " + hs256(claims()))
    assert '"iss"' in missing.message


def test_issuer_is_ignored_when_not_configured(verifier: TokenVerifier) -> None:
    assert verifier.verify("Bearer " + hs256(claims(iss="anyone"))).subject == "alice"


def test_audience_is_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="marketplace")
    assert verifier.verify("Bearer " + hs256(claims(aud="marketplace"))).subject == "alice"
    assert verifier.verify("Bearer " + hs256(claims(aud=["other", "marketplace"]))).subject
    assert verify_fails(verifier, "Bearer " + hs256(claims(aud="other"))).reason == (
        "INVALID_TOKEN"
    )
    missing = verify_fails(verifier, "Bearer " + hs256(claims()))
    assert '"aud"' in missing.message


def test_audience_is_ignored_when_not_configured(verifier: TokenVerifier) -> None:
    assert verifier.verify("Bearer " + hs256(claims(aud="whatever"))).subject == "alice"


def test_no_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="no verification key configured"):
        TokenVerifier()


def test_rs256_with_public_key_file(rsa_public_key_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(sub="bob", roles="admin"), rsa_key, algorithm="RS256")
    assert verifier.verify(f"Bearer {token}") == Principal("bob", frozenset({Role.ADMIN}))


def test_rs256_signed_by_another_key_is_refused(
    rsa_public_key_file: Path, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(), other_rsa_key, algorithm="RS256")
    assert verify_fails(verifier, f"Bearer {token}").reason == "INVALID_TOKEN"


def test_expired_rs256_token(rsa_public_key_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(exp=int(time.time()) - 3600), rsa_key, algorithm="RS256")
    assert verify_fails(verifier, f"Bearer {token}").reason == "TOKEN_EXPIRED"


def test_public_key_cannot_be_used_as_an_hmac_secret(rsa_public_key_file: Path) -> None:
    """The classic algorithm confusion: HS256 'signed' with the public key's PEM text."""
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    pem = rsa_public_key_file.read_bytes()
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims(roles=["admin"])).encode())
    signature = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    token = b".".join([header, body, jwt.utils.base64url_encode(signature)]).decode()
    error = verify_fails(verifier, f"Bearer {token}")
    assert error.message == "the token is not valid: The specified alg value is not allowed"


def test_hmac_verifier_refuses_asymmetric_tokens(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    error = verify_fails(TokenVerifier(secret=SECRET), f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"


def test_es256_with_public_key_file(
    ec_public_key_file: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = TokenVerifier(public_key_file=ec_public_key_file)
    token = jwt.encode(claims(sub="carol"), ec_key, algorithm="ES256")
    assert verifier.verify(f"Bearer {token}").subject == "carol"


NOT_ALLOWED = "the token is not valid: The specified alg value is not allowed"


@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_key_file_accepts_every_rsa_algorithm(
    rsa_public_key_file: Path, rsa_key: rsa.RSAPrivateKey, algorithm: str
) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(sub=algorithm), rsa_key, algorithm=algorithm)
    assert verifier.verify(f"Bearer {token}").subject == algorithm


def test_rsa_key_file_refuses_an_ec_token(
    rsa_public_key_file: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    error = verify_fails(verifier, f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"
    assert error.message == NOT_ALLOWED


@pytest.mark.parametrize("algorithm", ["RS256", "PS256"])
def test_ec_key_file_refuses_an_rsa_token(
    ec_public_key_file: Path, rsa_key: rsa.RSAPrivateKey, algorithm: str
) -> None:
    verifier = TokenVerifier(public_key_file=ec_public_key_file)
    token = jwt.encode(claims(), rsa_key, algorithm=algorithm)
    error = verify_fails(verifier, f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"
    assert error.message == NOT_ALLOWED


def test_ec_key_file_refuses_a_token_for_another_curve(ec_public_key_file: Path) -> None:
    verifier = TokenVerifier(public_key_file=ec_public_key_file)
    token = jwt.encode(claims(), ec.generate_private_key(ec.SECP384R1()), algorithm="ES384")
    assert verify_fails(verifier, f"Bearer {token}").reason == "INVALID_TOKEN"


def test_eddsa_token_is_refused_by_a_key_file(
    rsa_public_key_file: Path, ec_public_key_file: Path
) -> None:
    token = jwt.encode(claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")
    for key_file in (rsa_public_key_file, ec_public_key_file):
        error = verify_fails(TokenVerifier(public_key_file=key_file), f"Bearer {token}")
        assert error.reason == "INVALID_TOKEN"
        assert error.message == NOT_ALLOWED


def test_public_key_is_loaded_when_the_verifier_is_built(
    rsa_public_key_file: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(public_key_file=rsa_public_key_file)
    rsa_public_key_file.unlink()
    token = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256")
    assert verifier.verify(f"Bearer {token}").subject == "bob"


@pytest.mark.parametrize(("kid", "algorithm"), [("rsa-1", "RS256"), ("ec-1", "ES256")])
def test_jwks_picks_the_key_named_by_kid(
    jwks_file: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    kid: str,
    algorithm: str,
) -> None:
    signing_key = rsa_key if algorithm == "RS256" else ec_key
    token = jwt.encode(claims(sub=kid), signing_key, algorithm=algorithm, headers={"kid": kid})
    assert TokenVerifier(jwks_file=jwks_file).verify(f"Bearer {token}").subject == kid


def test_jwks_refuses_a_token_signed_by_another_key_under_a_known_kid(
    jwks_file: Path, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    error = verify_fails(TokenVerifier(jwks_file=jwks_file), f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"


@pytest.mark.parametrize(("kid", "algorithm"), [("rsa-1", "ES256"), ("ec-1", "RS256")])
def test_jwks_refuses_an_algorithm_that_does_not_fit_the_kid(
    jwks_file: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    kid: str,
    algorithm: str,
) -> None:
    signing_key = rsa_key if algorithm == "RS256" else ec_key
    token = jwt.encode(claims(), signing_key, algorithm=algorithm, headers={"kid": kid})
    error = verify_fails(TokenVerifier(jwks_file=jwks_file), f"Bearer {token}")
    assert error.reason == "INVALID_TOKEN"


@pytest.mark.parametrize("headers", [{"kid": "rotated-away"}, None])
def test_jwks_unknown_or_missing_kid(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, headers: dict[str, str] | None
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers=headers)
    error = verify_fails(TokenVerifier(jwks_file=jwks_file), f"Bearer {token}")
    assert error.reason == "UNKNOWN_KEY"


def test_jwks_garbage_token_is_invalid(jwks_file: Path) -> None:
    error = verify_fails(TokenVerifier(jwks_file=jwks_file), "Bearer not-a-jwt")
    assert error.reason == "INVALID_TOKEN"


def test_jwks_expired_token(jwks_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    payload = claims(exp=int(time.time()) - 3600)
    token = jwt.encode(payload, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    error = verify_fails(TokenVerifier(jwks_file=jwks_file), f"Bearer {token}")
    assert error.reason == "TOKEN_EXPIRED"


def test_short_hmac_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="secret"):
        TokenVerifier(secret="changeme")


def test_unparseable_public_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-key.pem"
    path.write_text("this is not a PEM key")
    with pytest.raises(ValueError, match="cannot load the public key"):
        TokenVerifier(public_key_file=path)


def test_public_key_of_another_type_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "ed25519-public.pem"
    path.write_text(public_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ValueError, match="is neither an RSA nor an EC public key"):
        TokenVerifier(public_key_file=path)


def test_one_authorization_entry_is_the_header() -> None:
    assert single_authorization([]) is None
    assert single_authorization(["Bearer abc"]) == "Bearer abc"
    assert single_authorization([b"Bearer abc"]) == "Bearer abc"


@pytest.mark.parametrize(
    "entries", [["Bearer a", "Bearer b"], ["Bearer a", "Bearer a"], ["Bearer a", b"", "x"]]
)
def test_several_authorization_entries_are_refused(entries: list[str | bytes]) -> None:
    with pytest.raises(Unauthenticated) as raised:
        single_authorization(entries)
    assert raised.value.reason == "INVALID_TOKEN"
    assert f"not {len(entries)}" in str(raised.value)
