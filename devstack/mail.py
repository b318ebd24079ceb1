"""The development stack's SMTP sink: an aiosmtpd server that accepts every message and keeps
it as an .eml file under .data/mail/, where `make mail` lists and prints them.

    python -m devstack.mail --folder .data/mail serve --port 1025   # make run starts this
    python -m devstack.mail list                                     # make mail
    python -m devstack.mail show 1                                   # make mail N=1: the latest
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from devstack import DATA_DIR, REPO_ROOT
from devstack.processes import free_port, stop_process, wait_until_ready

MAIL_DIR = DATA_DIR / "mail"
DEFAULT_SMTP_PORT = 1025


class MailFolder:
    """aiosmtpd's handler: every message accepted and written to `folder` as
    `<UTC time>-<random>.eml`, so names sort by arrival. Written whole, then renamed, so a
    reader never sees half a message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        # Who the message was for, as told to SMTP (RCPT TO), ahead of its own headers.
        recipients = ", ".join(envelope.rcpt_tos)
        received = f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {recipients}\r\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.eml"
        partial = self.folder / f".{name}.partial"
        partial.write_bytes(received.encode() + content)
        os.replace(partial, self.folder / name)
        return "250 Message accepted for delivery"


def serve_mail_sink(port: int, folder: Path) -> None:
    """Runs the sink on 127.0.0.1:`port` until SIGTERM or SIGINT."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handler = MailFolder(folder)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="marketplace-mail-sink"), "127.0.0.1", port
        )
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        async with server:
            await stopping.wait()

    asyncio.run(serve())


def start_mail_sink(
    port: int, folder: Path, *, log: IO[Any] | int | None = None
) -> subprocess.Popen[bytes]:
    """The sink as its own process (make run, the tests' stack)."""
    return subprocess.Popen(
        [sys.executable, "-m", "devstack.mail", "--folder", folder, "serve", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def wait_for_mail_sink(port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    def is_listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    wait_until_ready(is_listening, process, f"the SMTP sink on port {port}", timeout)


class MailSink:
    """The sink as its own process on `port`, keeping messages in `folder`; a test may stop
    it (SMTP down) and start it again."""

    def __init__(self, port: int, folder: Path, log_path: Path) -> None:
        self.port = port
        self.folder = folder
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The SMTP_URL that points a server here."""
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self._log_path.open("ab") as log:
            self._process = start_mail_sink(self.port, self.folder, log=log)
        wait_for_mail_sink(self.port, self._process)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)

    def messages(self) -> list[KeptMessage]:
        """Every message kept so far, newest first."""
        return kept_messages(self.folder)

    @classmethod
    @contextlib.contextmanager
    def running(cls, scratch: Path) -> Iterator[MailSink]:
        """A sink on a free port, its messages and log in `scratch`, stopped at the end."""
        sink = cls(free_port(), scratch / "mail", scratch / "mail.log")
        sink.start()
        try:
            yield sink
        finally:
            sink.stop()


@contextlib.contextmanager
def mail_sink_in_thread(port: int, folder: Path) -> Iterator[MailFolder]:
    """The same sink inside this process, on its own thread's event loop (tests)."""
    handler = MailFolder(folder)
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@dataclass(frozen=True)
class KeptMessage:
    path: Path
    message: EmailMessage

    @property
    def to(self) -> str:
        return str(self.message.get("To", ""))

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    @property
    def time(self) -> datetime:
        """When it was sent (its Date), else when the sink kept it."""
        with contextlib.suppress(TypeError, ValueError):
            if date := self.message.get("Date"):
                return parsedate_to_datetime(str(date))
        return datetime.fromtimestamp(self.path.stat().st_mtime, UTC)

    def text(self) -> str:
        """The plain-text part (the HTML one when there is none)."""
        body = self.message.get_body(preferencelist=("plain", "html"))
        return body.get_content() if isinstance(body, EmailMessage) else ""

    def html(self) -> str | None:
        body = self.message.get_body(preferencelist=("html",))
        return body.get_content() if isinstance(body, EmailMessage) else None


def kept_messages(folder: Path = MAIL_DIR) -> list[KeptMessage]:
    """Every message in `folder`, newest first."""
    if not folder.is_dir():
        return []
    parser = BytesParser(policy=policy.default)
    messages = []
    for path in sorted(folder.glob("*.eml"), reverse=True):
        with path.open("rb") as source:
            parsed = parser.parse(source)
        assert isinstance(parsed, EmailMessage)  # policy.default makes EmailMessages
        messages.append(KeptMessage(path, parsed))
    return messages


def list_messages(folder: Path, limit: int) -> int:
    messages = kept_messages(folder)
    if not messages:
        print(f"no messages in {folder} (make run's SMTP sink keeps them there)")
        return 0
    for number, kept in enumerate(messages[:limit], start=1):
        when = kept.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{number:>3}  {when}  {kept.to:<32}  {kept.subject}")
    more = len(messages) - limit
    print(
        (f"({more} older not shown) " if more > 0 else "")
        + "make mail N=1 prints the latest, N=2 the one before, ..."
    )
    return 0


def show_message(folder: Path, number: int, *, html: bool) -> int:
    messages = kept_messages(folder)
    if not 1 <= number <= len(messages):
        print(f"messages kept: {len(messages)}; N=1 is the latest", file=sys.stderr)
        return 1
    kept = messages[number - 1]
    for header in ("Date", "From", "To", "Subject", "Message-ID"):
        print(f"{header}: {kept.message.get(header, '')}")
    print(f"File: {kept.path}\n")
    if html:
        print(kept.html() or "(no HTML part)")
    else:
        print(kept.text())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.mail", description=__doc__)
    parser.add_argument("--folder", type=Path, default=MAIL_DIR, help="where the .eml files are")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the SMTP sink (make run starts it)")
    serve.add_argument("--port", type=int, default=DEFAULT_SMTP_PORT)
    listing = commands.add_parser("list", help="the latest messages, newest first")
    listing.add_argument("--limit", type=int, default=20)
    show = commands.add_parser("show", help="print one message: 1 is the latest")
    show.add_argument("number", type=int)
    show.add_argument("--html", action="store_true", help="print the HTML part instead")
    options = parser.parse_args()
    if options.command == "serve":
        serve_mail_sink(options.port, options.folder)
        return 0
    if options.command == "list":
        return list_messages(options.folder, options.limit)
    return show_message(options.folder, options.number, html=options.html)


if __name__ == "__main__":
    raise SystemExit(main())
