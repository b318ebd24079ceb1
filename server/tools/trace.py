"""`make trace ORDER=<id>`: prints the span trees of one order's traces from the JSON-lines
file the server writes with TRACE_FILE (one span per line, OpenTelemetry's own JSON).

    python -m server.tools.trace ORDER_ID        # $TRACE_FILE, else make run's .data/traces.jsonl
    python -m server.tools.trace ORDER_ID --file spans.jsonl

An order's traces are those with a span whose `marketplace.order_id` is ORDER_ID (its
CreateOrder, its payment, the relay's publishes of its events), each printed whole: every
span of that trace id from every server process, the relay's and the consumers' included,
indented under its parent, with its duration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from server.tracing import ORDER_ID

# make run's (devstack/): TRACE_FILE in its data folder, which DEVSTACK_DATA_DIR moves.
DEFAULT_FILE = Path(os.environ.get("DEVSTACK_DATA_DIR") or ".data") / "traces.jsonl"
# Shown after a span's name when present, in this order.
_SHOWN_ATTRIBUTES = (
    "rpc.grpc.status_code",
    "marketplace.request_id",
    "http.request.method",
    "http.method",
    "url.full",
    "http.url",
    "http.response.status_code",
    "http.status_code",
    "messaging.message.id",
    "messaging.message.delivery_attempt",
    "db.statement",
    "db.query.text",
)
_STATEMENT_CHARS = 80


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: datetime
    end: datetime
    status: str
    service: str
    pid: int | None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end - self.start).total_seconds() * 1000


def _hex(value: str | None) -> str | None:
    return None if value is None else value.removeprefix("0x")


def parse_span(line: str) -> Span | None:
    """A span from one line of the file; None for a line that is not one (a line cut short
    by a process killed while writing it)."""
    try:
        raw = json.loads(line)
        context = raw["context"]
        resource = raw.get("resource", {}).get("attributes", {})
        return Span(
            trace_id=str(_hex(context["trace_id"])),
            span_id=str(_hex(context["span_id"])),
            parent_id=_hex(raw.get("parent_id")),
            name=raw["name"],
            kind=str(raw.get("kind", "")).removeprefix("SpanKind."),
            start=datetime.fromisoformat(raw["start_time"]),
            end=datetime.fromisoformat(raw["end_time"]),
            status=raw.get("status", {}).get("status_code", "UNSET"),
            service=resource.get("service.name", "?"),
            pid=resource.get("process.pid"),
            attributes=raw.get("attributes") or {},
        )
    except (ValueError, KeyError, TypeError):
        return None


def load_spans(lines: Iterable[str]) -> list[Span]:
    return [span for line in lines if line.strip() and (span := parse_span(line)) is not None]


def traces_of_order(spans: Sequence[Span], order_id: str) -> list[str]:
    """The trace ids with a span about `order_id`, oldest trace first."""
    first_seen: dict[str, datetime] = {}
    for span in spans:
        if span.attributes.get(ORDER_ID) == order_id:
            first_seen[span.trace_id] = min(first_seen.get(span.trace_id, span.start), span.start)
    trace_starts = {
        trace_id: min(span.start for span in spans if span.trace_id == trace_id)
        for trace_id in first_seen
    }
    return sorted(trace_starts, key=lambda trace_id: trace_starts[trace_id])


def _label(span: Span) -> str:
    shown = []
    for name in _SHOWN_ATTRIBUTES:
        if name in span.attributes:
            value = " ".join(str(span.attributes[name]).split())
            if len(value) > _STATEMENT_CHARS:
                value = value[: _STATEMENT_CHARS - 3] + "..."
            shown.append(f"{name}={value}")
    status = "" if span.status in ("UNSET", "OK") else f" [{span.status}]"
    process = f"{span.service}" + (f" pid {span.pid}" if span.pid is not None else "")
    details = f"  {' '.join(shown)}" if shown else ""
    return (
        f"{span.name}  {span.duration_ms:.1f} ms  {span.kind.lower()}  ({process}){status}{details}"
    )


def render_trace(spans: Sequence[Span], trace_id: str) -> list[str]:
    """One trace as indented lines, children in start order under their parent. A span
    whose parent is not in the file (Envoy's, a client's) is shown as a root."""
    members = sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start)
    if not members:
        return []
    ids = {span.span_id for span in members}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in members:
        children[span.parent_id if span.parent_id in ids else None].append(span)
    begin = members[0].start
    end = max(span.end for span in members)
    lines = [
        f"trace {trace_id}  {len(members)} spans  "
        f"{(end - begin).total_seconds() * 1000:.1f} ms from first start to last end"
    ]

    def walk(span: Span, depth: int) -> None:
        offset = (span.start - begin).total_seconds() * 1000
        lines.append(f"{'  ' * depth}+{offset:.1f} ms  {_label(span)}")
        for child in children[span.span_id]:
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 1)
    return lines


def render_order(spans: Sequence[Span], order_id: str) -> list[str]:
    lines: list[str] = []
    for trace_id in traces_of_order(spans, order_id):
        if lines:
            lines.append("")
        lines += render_trace(spans, trace_id)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.tools.trace", description="The span trees of one order."
    )
    parser.add_argument("order_id")
    parser.add_argument(
        "--file",
        type=Path,
        default=Path(os.environ.get("TRACE_FILE") or DEFAULT_FILE),
        help=f"the JSON-lines span file (default: $TRACE_FILE, else {DEFAULT_FILE})",
    )
    args = parser.parse_args(argv)
    if not args.file.exists():
        print(
            f"no span file at {args.file} (the server writes it with TRACE_FILE)", file=sys.stderr
        )
        return 2
    with args.file.open(encoding="utf-8") as lines:
        spans = load_spans(lines)
    rendered = render_order(spans, args.order_id)
    if not rendered:
        print(f"no span of order {args.order_id} in {args.file}", file=sys.stderr)
        return 1
    print("\n".join(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
