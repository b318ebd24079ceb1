"""Exit codes, and the refusals printed from a failed call's rich details (AIP-193)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape

from marketplace_client import MarketplaceError


class Exit(IntEnum):
    """What a script can tell apart by the exit code alone."""

    OK = 0
    # An error nobody expected (INTERNAL, UNKNOWN, ...): report it, do not retry blindly.
    FAILED = 1
    # Click's own code for a bad command line (unknown option, missing argument, bad value).
    USAGE = 2
    # The server refused the request as asked: retrying the same thing will not help.
    REFUSED = 3
    # sysexits.h EX_UNAVAILABLE: the server, its database or provider could not be reached;
    # the same command may succeed later (a mutation is retried with its request id).
    UNAVAILABLE = 69


REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
UNAVAILABILITIES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # rate limits and lost races: the client already retried; later may work
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 unexpected server error; 2 bad command line;"
    " 3 refused by the server (invalid, not found, out of stock, declined, no permission;"
    " for import: some row refused); 69 server unavailable (try again later)."
)


def exit_code_of(error: MarketplaceError) -> Exit:
    if error.code in REFUSALS:
        return Exit.REFUSED
    if error.code in UNAVAILABILITIES:
        return Exit.UNAVAILABLE
    return Exit.FAILED


def error_lines(error: MarketplaceError, labels: Mapping[str, str] | None = None) -> list[str]:
    """The refusal for a person: the message and reason, then one line per bad field or
    unmet precondition (an out-of-stock order: one per short line). `labels` names the
    subjects the caller knows better (``products/<id>`` -> the SKU it typed)."""
    head = f"{error.code.name}: {error.message}"
    if error.reason and error.reason != error.code.name:
        head += f" ({error.reason})"
    lines = [head]
    lines += [f"  {v.field}: {v.description}" for v in error.field_violations]
    for violation in error.precondition_violations:
        subject = violation.subject
        if labels and subject in labels:
            subject = f"{labels[subject]} ({subject})"
        lines.append(f"  {subject}: {violation.description}")
    return lines


def error_summary(error: MarketplaceError) -> str:
    """The refusal on one line, for a table cell: the bad fields or unmet preconditions
    when the server named them (its message repeats them), else the message."""
    details = [f"{v.field}: {v.description}" for v in error.field_violations] + [
        f"{v.subject}: {v.description}" for v in error.precondition_violations
    ]
    if details:
        return "; ".join(details)
    return error_lines(error)[0]


def error_json(error: MarketplaceError) -> dict[str, Any]:
    """The same refusal for a script, in the names of google.rpc's JSON mapping."""
    body: dict[str, Any] = {"code": error.code.name, "message": error.message}
    if error.reason:
        body["reason"] = error.reason
    if error.metadata:
        body["metadata"] = dict(error.metadata)
    if error.field_violations:
        body["fieldViolations"] = [
            {"field": v.field, "description": v.description} for v in error.field_violations
        ]
    if error.precondition_violations:
        body["preconditionViolations"] = [
            {"type": v.type, "subject": v.subject, "description": v.description}
            for v in error.precondition_violations
        ]
    return {"error": body}


def print_error(
    console: Console,
    error: MarketplaceError,
    *,
    as_json: bool,
    labels: Mapping[str, str] | None = None,
) -> None:
    if as_json:
        # Plain text, not Rich: a terminal's width must never wrap what a script parses.
        console.file.write(json.dumps(error_json(error)) + "\n")
        return
    first, *rest = error_lines(error, labels)
    console.print(f"[bold red]error:[/] {escape(first)}")
    for line in rest:
        console.print(escape(line))
