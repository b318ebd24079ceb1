"""The development sign-in behind the storefront's "choose a name" (make run and the browser
tests only): a tiny HTTP endpoint on loopback that mints development tokens, which devstack's
own rendering of envoy.yaml routes `/dev/token` to. The server and the committed envoy.yaml
know nothing of it, so no production configuration can sign anyone in."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.api.auth import issue_development_token
from server.domain.identity import Role

DEV_TOKEN_PATH = "/dev/token"  # noqa: S105 (a path, not a password)
TOKEN_LIFETIME_SECONDS = 24 * 3600
# A name becomes the token's subject, the customer id its orders belong to.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_BODY_BYTES = 4096


def development_email(subject: str) -> str:
    """The email claim of make run's and make token's tokens unless told otherwise: where
    the notifications of the orders they place go (the SMTP sink keeps them)."""
    return f"{subject}@example.com"


def mint_token(secret: str, name: str, role: str) -> dict[str, Any]:
    """The sign-in's answer for `name` with `role`; ValueError says what is wrong."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            "a name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if role not in {str(known) for known in Role}:
        raise ValueError(f"the role is one of {', '.join(str(known) for known in Role)}")
    token = issue_development_token(
        secret,
        name,
        [role],
        lifetime_seconds=TOKEN_LIFETIME_SECONDS,
        email=development_email(name),
    )
    return {"token": token, "subject": name, "roles": [role], "expiresIn": TOKEN_LIFETIME_SECONDS}


def _handler(secret: str) -> type[BaseHTTPRequestHandler]:
    class DevTokenHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != DEV_TOKEN_PATH:
                self._answer(HTTPStatus.NOT_FOUND, _status(5, f"no such path: {self.path}"))
                return
            length = int(self.headers.get("content-length") or 0)
            if length > _MAX_BODY_BYTES:
                self._answer(HTTPStatus.BAD_REQUEST, _status(3, "the request body is too large"))
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError('the body is a JSON object: {"name": ..., "role": ...}')
                answer = mint_token(
                    secret, str(body.get("name", "")), str(body.get("role", "customer"))
                )
            except ValueError as error:  # json.JSONDecodeError is one
                self._answer(HTTPStatus.BAD_REQUEST, _status(3, str(error)))
                return
            self._answer(HTTPStatus.OK, answer)

        def _answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: Envoy's access log already has every request."""

    return DevTokenHandler


def _status(code: int, message: str) -> dict[str, Any]:
    """An error as the API's own: a google.rpc.Status in JSON, so the page shows one shape."""
    return {"code": code, "message": message, "details": []}


@contextlib.contextmanager
def dev_token_endpoint(secret: str) -> Iterator[int]:
    """The sign-in endpoint on a free loopback port (yielded) until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(secret))
    thread = threading.Thread(target=server.serve_forever, name="dev-token", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dev_route(port: int) -> tuple[str, str]:
    """The route (into envoy.yaml's route table) and the cluster that lead `/dev/token` to the
    endpoint on `port`, as envoy.yaml's indented YAML."""
    route = (
        f'                        - match: {{path: "{DEV_TOKEN_PATH}"}}\n'
        "                          route: {cluster: dev_token, timeout: 5s}\n"
        "                          typed_per_filter_config: *static_file\n"
    )
    cluster = (
        "    - name: dev_token\n"
        "      type: STATIC\n"
        "      connect_timeout: 1s\n"
        "      load_assignment:\n"
        "        cluster_name: dev_token\n"
        "        endpoints:\n"
        "          - lb_endpoints:\n"
        "              - endpoint:\n"
        "                  address:\n"
        f"                    socket_address: {{address: 127.0.0.1, port_value: {port}}}\n"
    )
    return route, cluster
