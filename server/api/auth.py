"""Bearer token verification with pyjwt."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from email.errors import HeaderParseError
from email.headerregistry import Address
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from server.domain.errors import ErrorReason, Unauthenticated
from server.domain.identity import Principal, Role

_MAX_SUBJECT_LENGTH = 255
# An address as a mail server takes it: printable ASCII, one @, a dotted domain of letters,
# digits and hyphens; 254 characters at most (RFC 5321). Not every address RFC 5322 allows
# (quoted local parts, IP literals), which no identity provider hands out anyway.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,63}"
)
_MAX_EMAIL_LENGTH = 254
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
_MIN_SECRET_BYTES = 32
# Verified tokens remembered per process (oldest evicted first).
_CACHE_SIZE = 10_000
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = ("ES256", "ES384", "ES512")
_ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS + _EC_ALGORITHMS


class TokenVerifier:
    """Verifies `authorization: Bearer <JWT>` and returns who is calling.

    Algorithms are fixed by the key type we were given, never read from the token, so a
    token cannot pick `none` or downgrade an RSA key to an HMAC secret.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_file: Path | None = None,
        jwks_file: Path | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 30,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._jwks: jwt.PyJWKSet | None = None
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._key: Any
        self._algorithms: Sequence[str]
        # Keys are loaded here so a bad configuration stops the server at startup instead
        # of failing every caller with UNAUTHENTICATED.
        if secret is not None:
            if len(secret.encode()) < _MIN_SECRET_BYTES:
                raise ValueError(f"the HS256 secret must be at least {_MIN_SECRET_BYTES} bytes")
            self._key, self._algorithms = secret, ("HS256",)
        elif public_key_file is not None:
            try:
                self._key = load_pem_public_key(public_key_file.read_bytes())
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot load the public key {public_key_file}: {error}") from None
            # The key's type fixes the algorithm family, so an RSA key is never asked to
            # check an ECDSA signature (pyjwt would raise TypeError, not a token error).
            if isinstance(self._key, RSAPublicKey):
                self._algorithms = _RSA_ALGORITHMS
            elif isinstance(self._key, EllipticCurvePublicKey):
                self._algorithms = _EC_ALGORITHMS
            else:
                raise ValueError(f"{public_key_file} is neither an RSA nor an EC public key")
        elif jwks_file is not None:
            try:
                self._jwks = jwt.PyJWKSet.from_dict(json.loads(jwks_file.read_text()))
            except (OSError, ValueError, jwt.PyJWTError) as error:
                raise ValueError(f"cannot load the JWKS {jwks_file}: {error}") from None
            self._key, self._algorithms = None, _ASYMMETRIC_ALGORITHMS
        else:
            raise ValueError("no verification key configured")

    def verify(self, authorization: str) -> Principal:
        """Verifies once per distinct token, then answers from a cache until it expires:
        the same customer's token arrives with every call of a session, and a signature
        check costs more than the rest of a cheap RPC."""
        cached = self._cache.get(authorization)
        if cached is not None:
            principal, expires_at = cached
            if time.time() < expires_at + self._leeway:
                return principal
            del self._cache[authorization]
        principal, expires_at = self._verify(authorization)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[authorization] = (principal, expires_at)
        return principal

    def _verify(self, authorization: str) -> tuple[Principal, float]:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization must be 'Bearer <token>'", reason=ErrorReason.MISSING_TOKEN
            )
        try:
            claims = jwt.decode(
                token.strip(),
                key=self._key_for(token.strip()),
                algorithms=list(self._algorithms),
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "the token has expired", reason=ErrorReason.TOKEN_EXPIRED
            ) from None
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        expires_at = claims["exp"]
        if not isinstance(expires_at, int | float):
            raise Unauthenticated("the token's exp must be a number")
        return _principal(claims), float(expires_at)

    def _key_for(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        for key in self._jwks.keys:
            if key.key_id == kid:
                # The PyJWK itself, not its bare key: pyjwt then insists the token's alg
                # matches the key's, instead of failing with a TypeError.
                return key
        raise Unauthenticated(
            "the token is signed by an unknown key", reason=ErrorReason.UNKNOWN_KEY
        )


def single_authorization(entries: Sequence[str | bytes]) -> str | None:
    """The call's one `authorization` entry, if any. Several are refused rather than one
    picked, since which of them is the caller would be ambiguous (over REST, Envoy joins
    repeated headers into one value, which fails as a token)."""
    if len(entries) > 1:
        raise Unauthenticated(f"send one authorization entry, not {len(entries)}")
    if not entries:
        return None
    entry = entries[0]
    return entry.decode("utf-8", "replace") if isinstance(entry, bytes) else entry


def _principal(claims: dict[str, Any]) -> Principal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > _MAX_SUBJECT_LENGTH:
        raise Unauthenticated("the token's sub must be a non-empty string")
    if any(ord(c) < 32 for c in subject):
        raise Unauthenticated("the token's sub contains control characters")
    raw_roles = claims.get("roles", [])
    if isinstance(raw_roles, str):
        raw_roles = raw_roles.split()
    if not isinstance(raw_roles, list):
        raise Unauthenticated("the token's roles must be a list of strings")
    known = {role.value: role for role in Role}
    roles = frozenset(known[r] for r in raw_roles if isinstance(r, str) and r in known)
    return Principal(subject=subject, roles=roles, email=email_claim(claims.get("email")))


def email_claim(value: object) -> str | None:
    """The token's `email` claim when it looks like an address, else None: it only says where
    notifications go, so an odd one is ignored rather than refusing the caller."""
    if not (isinstance(value, str) and len(value) <= _MAX_EMAIL_LENGTH and _EMAIL.fullmatch(value)):
        return None
    # The email package must be able to address it too (the pattern lets `a..b@` through):
    # an order must not keep an address its notifications cannot be sent to.
    try:
        Address(addr_spec=value)
    except (ValueError, HeaderParseError):
        return None
    return value


def issue_development_token(
    secret: str,
    subject: str,
    roles: Sequence[str],
    *,
    lifetime_seconds: int,
    email: str | None = None,
) -> str:
    """A token for `make token` and the tests; production tokens come from an identity provider."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": subject,
        "roles": list(roles),
        "iat": now,
        "exp": now + lifetime_seconds,
    }
    if email is not None:
        payload["email"] = email
    return jwt.encode(payload, secret, algorithm="HS256")
