"""Sending over SMTP to the server SMTP_URL names: `smtp://host:port` (plaintext),
`smtp+starttls://user:pass@host:587` (upgraded with STARTTLS), `smtps://user:pass@host:465`
(TLS from the first byte). User and password are URL-encoded in the URL."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass, field
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib


class SmtpSecurity(enum.StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


# Scheme: its security and default port.
_SCHEMES = {
    "smtp": (SmtpSecurity.NONE, 25),
    "smtp+starttls": (SmtpSecurity.STARTTLS, 587),
    "smtps": (SmtpSecurity.TLS, 465),
}


@dataclass(frozen=True, slots=True)
class SmtpServer:
    host: str
    port: int
    security: SmtpSecurity
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(url: str) -> SmtpServer:
    """The server `url` names; ValueError (without the password) when it names none."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"SMTP_URL's scheme must be one of {', '.join(_SCHEMES)}, not {parts.scheme!r}"
        )
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"SMTP_URL's port is not a port number: {error}") from None
    if not parts.hostname:
        raise ValueError("SMTP_URL names no host, e.g. smtp://127.0.0.1:1025")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            "SMTP_URL takes no path, query or fragment: scheme://[user:pass@]host:port"
        )
    if parts.password is not None and not parts.username:
        raise ValueError("SMTP_URL has a password without a user name")
    security, default_port = _SCHEMES[parts.scheme]
    return SmtpServer(
        host=parts.hostname,
        port=port or default_port,
        security=security,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class RecipientRefused(Exception):
    """The server refused the recipient for good (a 5xx reply to RCPT TO): sending the
    same message again cannot succeed."""


class SmtpSender:
    """One connection, kept open across messages: a flash sale sends thousands, and each new
    connection costs a TCP handshake and, in production, a TLS handshake and a login. It is
    made again whenever the server closed it meanwhile (an idle timeout, a restart), and
    dropped after any failure, whose state it cannot know."""

    def __init__(self, server: SmtpServer, *, timeout_seconds: float) -> None:
        self._server = server
        self._timeout_seconds = timeout_seconds
        self._client: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()  # one SMTP transaction at a time on the connection

    async def send(self, message: EmailMessage) -> None:
        """Delivers `message` to its To address, or raises: RecipientRefused when the
        server refuses it for good, aiosmtplib's errors, OSError or TimeoutError otherwise
        (the server down, slow, or refusing for now). Within the timeout, all steps together."""
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout_seconds):
                    await self._send(message)
            except BaseException as error:
                self._drop()
                if isinstance(error, aiosmtplib.SMTPRecipientsRefused) and all(
                    500 <= recipient.code < 600 for recipient in error.recipients
                ):
                    reasons = "; ".join(f"{r.code} {r.message}" for r in error.recipients)
                    raise RecipientRefused(reasons) from error
                raise

    async def aclose(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None and client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    async with asyncio.timeout(self._timeout_seconds):
                        await client.quit()

    async def _send(self, message: EmailMessage) -> None:
        reused = self._client is not None and self._client.is_connected
        try:
            await (await self._connected()).send_message(message)
        except aiosmtplib.SMTPServerDisconnected:
            if not reused:
                raise
            # Closed by the server while it sat idle, unnoticed until now: once more on a new
            # connection (should the first have been accepted after all, the copy carries
            # the same Message-ID).
            self._drop()
            await (await self._connected()).send_message(message)

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            return self._client
        server = self._server
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            username=server.username,
            password=server.password,
            use_tls=server.security is SmtpSecurity.TLS,
            # smtp:// is plaintext as written: never an opportunistic STARTTLS.
            start_tls=server.security is SmtpSecurity.STARTTLS,
            timeout=self._timeout_seconds,
        )
        await client.connect()
        self._client = client
        return client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
