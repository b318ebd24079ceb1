"""One row per scenario; the table printed at the end and bench-results.json."""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.config import HALF_RATE_FRACTION, HALF_RATE_P99_TARGET_MS, BenchConfig
from tests.bench.grpc_load import LATE_LAUNCH_MS

# A generator using more than this share of the machine's CPU in a scenario is flagged.
GENERATOR_SHARE_WARNING = 0.25
# So is CPU used by processes outside the bench (another job on the machine skews results).
OTHER_SHARE_WARNING = 0.10
# Server workers are flagged as unevenly loaded when the least busy used less than this
# fraction of the busiest one's CPU.
WORKER_IMBALANCE = 0.5
# The issue's bound on what events may cost the order transaction: at least this share of
# the throughput without them (OUTBOX_WRITES=false), in the same run.
OUTBOX_RATIO_TARGET = 0.85


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
    cpu_other_s: float | None = None  # machine busy time nobody above accounts for
    server_rss_mb: list[float] = field(default_factory=list)
    baseline: str | None = None
    baseline_throughput: float | None = None
    ratio: float | None = None
    # The open-loop run at HALF_RATE_FRACTION of `throughput` (gRPC scenarios only).
    half_target_rate: float | None = None  # calls per second offered
    half_throughput: float | None = None  # successes per second answered in its window
    half_seconds: float | None = None
    half_p50_ms: float | None = None
    half_p99_ms: float | None = None
    half_max_ms: float | None = None
    half_errors: int | None = None
    half_p99_met: bool | None = None  # half_p99_ms <= HALF_RATE_P99_TARGET_MS, no errors
    half_ok: int | None = None  # successes answered in its window
    half_machine_busy: float | None = None  # share of all cores busy during the half-rate run
    half_cpu_server_s: float | None = None
    half_cpu_postgres_s: float | None = None
    half_note: str | None = None  # why it was not measured
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def server_us_per_ok(self) -> float | None:
        return _us_per_ok(self.cpu_server_s, self.ok)

    @property
    def postgres_us_per_ok(self) -> float | None:
        return _us_per_ok(self.cpu_postgres_s, self.ok)

    @property
    def half_server_us_per_ok(self) -> float | None:
        return _us_per_ok(self.half_cpu_server_s, self.half_ok)

    @property
    def half_postgres_us_per_ok(self) -> float | None:
        return _us_per_ok(self.half_cpu_postgres_s, self.half_ok)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, digits in _JSON_DIGITS.items():
            data[key] = _rounded(data[key], digits)
        data["server_cpu_us_per_ok"] = _rounded(self.server_us_per_ok, 1)
        data["postgres_cpu_us_per_ok"] = _rounded(self.postgres_us_per_ok, 1)
        data["half_server_cpu_us_per_ok"] = _rounded(self.half_server_us_per_ok, 1)
        data["half_postgres_cpu_us_per_ok"] = _rounded(self.half_postgres_us_per_ok, 1)
        return data


def _us_per_ok(cpu_seconds: float | None, ok: int | None) -> float | None:
    return None if cpu_seconds is None or not ok else cpu_seconds / ok * 1e6


_JSON_DIGITS = {
    "throughput": 1,
    "p50_ms": 3,
    "p99_ms": 3,
    "max_ms": 3,
    "cpu_generator_s": 3,
    "cpu_server_s": 3,
    "cpu_envoy_s": 3,
    "cpu_postgres_s": 3,
    "cpu_other_s": 3,
    "baseline_throughput": 1,
    "ratio": 3,
    "half_target_rate": 1,
    "half_throughput": 1,
    "half_p50_ms": 3,
    "half_p99_ms": 3,
    "half_max_ms": 3,
    "half_machine_busy": 3,
    "half_cpu_server_s": 3,
    "half_cpu_postgres_s": 3,
}


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


def link_outbox_comparisons(rows: list[Row], comparisons: dict[str, str]) -> None:
    """Puts into each scenario with events its throughput as a share of the same scenario
    without them, round by round (`name`, `name#2`, ... beside `base`, `base#2`, ...): extra
    outbox_ratios, each round's, and outbox_ratio, their median, on the first round's row
    (with without_events and without_events_throughput, the first round's)."""
    by_name = {row.scenario: row for row in rows}
    for with_events, without in comparisons.items():
        row, base = by_name.get(with_events), by_name.get(without)
        if row is None or base is None or not base.throughput:
            continue
        ratios = [row.throughput / base.throughput]
        for round_number in itertools.count(2):
            again = by_name.get(f"{with_events}#{round_number}")
            again_base = by_name.get(f"{without}#{round_number}")
            if again is None or again_base is None or not again_base.throughput:
                break
            ratios.append(again.throughput / again_base.throughput)
        row.extra["without_events"] = base.scenario
        row.extra["without_events_throughput"] = round(base.throughput, 1)
        row.extra["outbox_ratios"] = [round(ratio, 3) for ratio in ratios]
        row.extra["outbox_ratio"] = round(statistics.median(ratios), 3)


def _outbox_notes(rows: Sequence[Row]) -> list[str]:
    lines = []
    for row in rows:
        ratio = row.extra.get("outbox_ratio")
        if ratio is None:
            continue
        verdict = "met" if ratio >= OUTBOX_RATIO_TARGET else "MISSED"
        ratios = row.extra.get("outbox_ratios", [ratio])
        rounds = (
            f"round by round {', '.join(f'{r:.2f}' for r in ratios)}, median {ratio:.2f}"
            if len(ratios) > 1
            else f"ratio {ratio:.2f}"
        )
        lines.append(
            f"events: {row.scenario} with them against {row.extra['without_events']}"
            f" ({row.throughput:.0f}/s and {row.extra['without_events_throughput']:.0f}/s in"
            f" the first round): {rounds}, target ≥ {OUTBOX_RATIO_TARGET:.2f} {verdict}"
        )
    return lines


def _fleet_notes(rows: Sequence[Row]) -> list[str]:
    """Each fleet scenario (extra: replicas, workers_per_replica, envoy_*) beside its baseline:
    fleet:1 beside order-spread (Envoy's cost), fleet:2 beside fleet:1 (a second replica's)."""
    by_name = {row.scenario: row for row in rows}
    lines = []
    for row in rows:
        replicas = row.extra.get("replicas")
        if replicas is None:
            continue
        line = (
            f"fleet: {row.scenario} is Envoy in front of {replicas} replica(s) of"
            f" {row.extra['workers_per_replica']} server process(es): {row.throughput:.0f}/s,"
            f" p50 {_cell(row.p50_ms, '.1f')} / p99 {_cell(row.p99_ms, '.1f')} ms,"
            f" {row.errors} errors"
        )
        base = by_name.get(row.baseline or "")
        if base is not None and row.ratio is not None:
            line += (
                f"; {base.scenario} {base.throughput:.0f}/s, p50 {_cell(base.p50_ms, '.1f')}"
                f" / p99 {_cell(base.p99_ms, '.1f')} ms: ratio {row.ratio:.2f}"
            )
        if calls := row.extra.get("envoy_calls_by_replica"):
            line += (
                f"; Envoy's calls per replica {' / '.join(str(n) for n in calls)},"
                f" {row.extra.get('envoy_retries', 0)} retries"
            )
        lines.append(line)
    return lines


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
    ("cpu other s", ">"),
    ("srv µs/ok", ">"),
    ("pg µs/ok", ">"),
    ("half ok/s", ">"),
    ("p99@half ms", ">"),
    (f"≤{HALF_RATE_P99_TARGET_MS:g} ms", "<"),
)


def _half_verdict(row: Row) -> str:
    if row.half_p99_met is None:
        return "n/m" if row.half_note else "-"
    return "yes" if row.half_p99_met else "NO"


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
            _cell(row.cpu_other_s, ".2f"),
            _cell(row.server_us_per_ok, ".0f"),
            _cell(row.postgres_us_per_ok, ".0f"),
            _cell(row.half_throughput, ".0f"),
            _cell(row.half_p99_ms, ".2f"),
            _half_verdict(row),
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
            if first := row.extra.get("first_failure"):
                lines.append(f"first failure in {row.scenario}: {first}")
        if row.cpu_generator_s is not None and row.seconds:
            share = row.cpu_generator_s / (row.seconds * cores)
            if share > GENERATOR_SHARE_WARNING:
                lines.append(
                    f"the generator ({row.tool}) used {share:.0%} of the machine's CPU in"
                    f" {row.scenario}: it competes with the server for the same cores"
                )
        by_process = sorted(row.extra.get("server_cpu_by_process_s", {}).values())
        workers = by_process[-(row.server_workers or 1) :] if row.server_workers else []
        if len(workers) > 1 and row.cpu_server_s and workers[0] < WORKER_IMBALANCE * workers[-1]:
            shares = " / ".join(f"{seconds:.1f}" for seconds in reversed(workers))
            lines.append(
                f"server workers unevenly loaded in {row.scenario}: {shares} CPU s"
                " (SO_REUSEPORT spreads connections, not calls; few client connections"
                " can land on one worker)"
            )
        if row.cpu_other_s is not None and row.seconds:
            share = row.cpu_other_s / (row.seconds * cores)
            if share > OTHER_SHARE_WARNING:
                lines.append(
                    f"{share:.0%} of the machine's CPU in {row.scenario} went to neither the"
                    " generator, the server, Envoy nor PostgreSQL (the kernel, or another job)"
                )
    lines.extend(_outbox_notes(rows))
    lines.extend(_fleet_notes(rows))
    lines.extend(_half_notes(rows))
    rss = [size for row in rows for size in row.server_rss_mb]
    if rss:
        lines.append(
            f"server resident memory per process at the end of a scenario: max {max(rss):.0f} MiB"
        )
    return lines


def _half_notes(rows: Sequence[Row]) -> list[str]:
    lines = []
    measured = [row for row in rows if row.half_target_rate is not None]
    if measured:
        seconds = measured[0].half_seconds or 0.0
        lines.append(
            f"p99@half: each gRPC scenario again, open loop at {HALF_RATE_FRACTION:.0%} of its"
            f" ok/s ({seconds:g} s measured), calls launched on schedule whatever is"
            " outstanding and timed from their scheduled send; half ok/s is what was"
            f" achieved; target p99 ≤ {HALF_RATE_P99_TARGET_MS:g} ms:"
            f" {sum(bool(row.half_p99_met) for row in measured)} of {len(measured)} met"
        )
    for row in rows:
        if row.half_note:
            lines.append(f"p99@half not measured in {row.scenario}: {row.half_note}")
        if row.half_target_rate is None:
            continue
        target, achieved = row.half_target_rate, row.half_throughput or 0.0
        if achieved < 0.95 * target:
            lines.append(
                f"{row.scenario} at half rate: achieved {achieved:.0f}/s of the"
                f" {target:.0f}/s offered"
            )
        if row.half_errors:
            lines.append(f"{row.scenario} at half rate: {row.half_errors} errors")
        if row.half_machine_busy is not None:
            lines.append(
                f"{row.scenario} at half rate: the machine was {row.half_machine_busy:.0%}"
                f" busy; server {_cell(row.half_server_us_per_ok, '.0f')} µs and PostgreSQL"
                f" {_cell(row.half_postgres_us_per_ok, '.0f')} µs per ok (at full load"
                f" {_cell(row.server_us_per_ok, '.0f')} and {_cell(row.postgres_us_per_ok, '.0f')})"
            )
        late, lag = row.extra.get("half_launched_late", 0), row.extra.get("half_max_lag_ms", 0)
        scheduled = row.extra.get("half_scheduled", 0)
        if scheduled and late > 0.01 * scheduled:
            lines.append(
                f"{row.scenario} at half rate: the generator launched {late} of {scheduled}"
                f" calls more than {LATE_LAUNCH_MS:g} ms late (max {lag:.0f} ms;"
                " counted in the latency)"
            )
    return lines


def write_json(
    path: Path, rows: Sequence[Row], config: BenchConfig, *, load_average_at_start: float
) -> None:
    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "load_average_1min_at_start": round(load_average_at_start, 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": config.public(),
        "scenarios": [row.as_json() for row in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
