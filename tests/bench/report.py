"""One row per scenario; the table printed at the end and bench-results.json."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.config import BenchConfig

# A generator using more than this share of the machine's CPU in a scenario is flagged.
GENERATOR_SHARE_WARNING = 0.25


@dataclass
class Row:
    scenario: str
    tool: str  # what generated the load: grpc.aio, pgbench, wrk
    server_workers: int | None  # None: the server is not involved (pgbench)
    concurrency: int
    seconds: float  # the measured interval
    ok: int  # successes answered within the interval
    throughput: float  # ok / seconds
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    errors: int  # failures answered within the interval
    error_kinds: dict[str, int]
    check: str  # ok / FAILED
    check_detail: str
    cpu_generator_s: float | None
    cpu_server_s: float | None
    cpu_envoy_s: float | None
    cpu_postgres_s: float | None
    server_rss_mb: list[float] = field(default_factory=list)
    baseline: str | None = None
    baseline_throughput: float | None = None
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def server_us_per_ok(self) -> float | None:
        if self.cpu_server_s is None or not self.ok:
            return None
        return self.cpu_server_s / self.ok * 1e6

    @property
    def postgres_us_per_ok(self) -> float | None:
        if self.cpu_postgres_s is None or not self.ok:
            return None
        return self.cpu_postgres_s / self.ok * 1e6

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["server_cpu_us_per_ok"] = _rounded(self.server_us_per_ok, 1)
        data["postgres_cpu_us_per_ok"] = _rounded(self.postgres_us_per_ok, 1)
        return data


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def link_baselines(rows: list[Row], baselines: dict[str, str]) -> None:
    by_name = {row.scenario: row for row in rows}
    for row in rows:
        base = by_name.get(baselines.get(row.scenario, ""))
        if base is None:
            continue
        row.baseline = base.scenario
        row.baseline_throughput = base.throughput
        row.ratio = row.throughput / base.throughput if base.throughput else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    ("scenario", "<"),
    ("srv procs", ">"),
    ("clients", ">"),
    ("ok/s", ">"),
    ("p50 ms", ">"),
    ("p99 ms", ">"),
    ("max ms", ">"),
    ("errors", ">"),
    ("check", "<"),
    ("baseline", "<"),
    ("base ok/s", ">"),
    ("ratio", ">"),
    ("cpu gen s", ">"),
    ("cpu srv s", ">"),
    ("cpu envoy s", ">"),
    ("cpu pg s", ">"),
    ("srv µs/ok", ">"),
    ("pg µs/ok", ">"),
)


def format_table(rows: Sequence[Row]) -> str:
    cells = [
        [
            row.scenario,
            "-" if row.server_workers is None else str(row.server_workers),
            str(row.concurrency),
            _cell(row.throughput, ".0f"),
            _cell(row.p50_ms, ".2f"),
            _cell(row.p99_ms, ".2f"),
            _cell(row.max_ms, ".1f"),
            str(row.errors),
            row.check,
            row.baseline or "-",
            _cell(row.baseline_throughput, ".0f"),
            _cell(row.ratio, ".2f"),
            _cell(row.cpu_generator_s, ".2f"),
            _cell(row.cpu_server_s, ".2f"),
            _cell(row.cpu_envoy_s, ".2f"),
            _cell(row.cpu_postgres_s, ".2f"),
            _cell(row.server_us_per_ok, ".0f"),
            _cell(row.postgres_us_per_ok, ".0f"),
        ]
        for row in rows
    ]
    widths = [
        max(len(title), *(len(line[i]) for line in cells)) for i, (title, _) in enumerate(COLUMNS)
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            format(value, f"{align}{width}")
            for value, (_, align), width in zip(values, COLUMNS, widths, strict=True)
        ).rstrip()

    header = line([title for title, _ in COLUMNS])
    return "\n".join([header, "-" * len(header), *(line(values) for values in cells)])


def notes(rows: Sequence[Row], cores: int) -> list[str]:
    """What a reader should not miss under the table."""
    lines = []
    for row in rows:
        if row.check != "ok":
            lines.append(f"CHECK FAILED in {row.scenario}: {row.check_detail}")
        if row.error_kinds:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(row.error_kinds.items()))
            lines.append(f"errors in {row.scenario}: {kinds}")
        if row.cpu_generator_s is not None and row.seconds:
            share = row.cpu_generator_s / (row.seconds * cores)
            if share > GENERATOR_SHARE_WARNING:
                lines.append(
                    f"the generator ({row.tool}) used {share:.0%} of the machine's CPU in"
                    f" {row.scenario}: it competes with the server for the same cores"
                )
    rss = [size for row in rows for size in row.server_rss_mb]
    if rss:
        lines.append(
            f"server resident memory per process at the end of a scenario: max {max(rss):.0f} MiB"
        )
    return lines


def write_json(path: Path, rows: Sequence[Row], config: BenchConfig) -> None:
    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": config.public(),
        "scenarios": [row.as_json() for row in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
