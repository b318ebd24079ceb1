"""The bench's fleet scenarios in its report: BENCH_ONLY selects them, and each is compared
with its baseline (fleet:1 with order-spread, fleet:2 with fleet:1) in the table's ratio
column, the JSON rows and the note that puts them side by side."""

from __future__ import annotations

import pytest

from tests.bench.config import BenchConfig
from tests.bench.report import Row, format_table, link_baselines, notes
from tests.bench.runner import baselines
from tests.unit.bench_rows import bench_row as _row


def _fleet_rows() -> list[Row]:
    return [
        _row("order-spread", 1000.0, 50.0, 110.0),
        _row(
            "fleet:1",
            800.0,
            70.0,
            150.0,
            replicas=1,
            workers_per_replica=2,
            envoy_calls_by_replica=[9000],
            envoy_retries=0,
        ),
        _row(
            "fleet:2",
            720.0,
            80.0,
            170.0,
            replicas=2,
            workers_per_replica=1,
            envoy_calls_by_replica=[4100, 3900],
            envoy_retries=3,
        ),
    ]


def test_bench_only_selects_the_fleet_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_ONLY", "fleet:1,fleet:2")
    config = BenchConfig()
    assert [name for name in ("order-spread", "fleet:1", "fleet:2") if config.wants(name)] == [
        "fleet:1",
        "fleet:2",
    ]


def test_fleet_1_is_compared_with_order_spread_and_fleet_2_with_fleet_1() -> None:
    rows = _fleet_rows()
    link_baselines(rows, baselines(BenchConfig()))
    _, fleet_1, fleet_2 = rows
    assert (fleet_1.baseline, fleet_1.ratio) == ("order-spread", pytest.approx(0.8))
    assert (fleet_2.baseline, fleet_2.ratio) == ("fleet:1", pytest.approx(0.9))
    assert fleet_2.as_json()["ratio"] == 0.9
    # The printed row: scenario ... check, baseline, its ok/s, ratio.
    cells = format_table(rows).splitlines()[-1].split()
    assert cells[0] == "fleet:2"
    assert cells[8:12] == ["ok", "fleet:1", "800", "0.90"]


def test_the_note_puts_each_fleet_beside_its_baseline() -> None:
    rows = _fleet_rows()
    link_baselines(rows, baselines(BenchConfig()))
    fleet_notes = [note for note in notes(rows, cores=2) if note.startswith("fleet:")]
    assert fleet_notes == [
        "fleet: fleet:1 is Envoy in front of 1 replica(s) of 2 server process(es): 800/s,"
        " p50 70.0 / p99 150.0 ms, 0 errors; order-spread 1000/s, p50 50.0 / p99 110.0 ms:"
        " ratio 0.80; Envoy's calls per replica 9000, 0 retries",
        "fleet: fleet:2 is Envoy in front of 2 replica(s) of 1 server process(es): 720/s,"
        " p50 80.0 / p99 170.0 ms, 0 errors; fleet:1 800/s, p50 70.0 / p99 150.0 ms:"
        " ratio 0.90; Envoy's calls per replica 4100 / 3900, 3 retries",
    ]
