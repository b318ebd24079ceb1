"""The bench's events comparison: rounds of each order scenario with and without events,
judged on the median of the rounds' ratios (tests/bench/report.py)."""

from __future__ import annotations

from tests.bench.report import OUTBOX_RATIO_TARGET, Row, link_outbox_comparisons, notes
from tests.bench.runner import OUTBOX_COMPARISONS
from tests.unit.bench_rows import bench_row as _row


def _rounds(*pairs: tuple[float, float]) -> list[Row]:
    rows = []
    for number, (with_events, without) in enumerate(pairs, start=1):
        suffix = "" if number == 1 else f"#{number}"
        rows += [
            _row(f"order-spread{suffix}", with_events),
            _row(f"order-spread:no-outbox{suffix}", without),
        ]
    return rows


def test_the_ratio_is_the_median_of_the_rounds_ratios() -> None:
    rows = _rounds((700.0, 1000.0), (950.0, 1000.0), (880.0, 1000.0))
    link_outbox_comparisons(rows, OUTBOX_COMPARISONS)
    first = rows[0]
    assert first.extra["outbox_ratios"] == [0.7, 0.95, 0.88]
    assert first.extra["outbox_ratio"] == 0.88
    assert first.extra["without_events_throughput"] == 1000.0
    # Only the first round's row carries the comparison.
    assert all("outbox_ratio" not in row.extra for row in rows[1:])


def test_a_round_missing_its_other_half_ends_the_comparison() -> None:
    rows = _rounds((900.0, 1000.0), (500.0, 1000.0))
    rows.append(_row("order-spread#3", 100.0))  # no order-spread:no-outbox#3
    link_outbox_comparisons(rows, OUTBOX_COMPARISONS)
    assert rows[0].extra["outbox_ratios"] == [0.9, 0.5]
    assert rows[0].extra["outbox_ratio"] == 0.7


def test_the_note_gives_every_round_and_judges_the_median() -> None:
    rows = _rounds((800.0, 1000.0), (900.0, 1000.0), (870.0, 1000.0))
    link_outbox_comparisons(rows, OUTBOX_COMPARISONS)
    [note] = [line for line in notes(rows, 2) if line.startswith("events:")]
    assert "round by round 0.80, 0.90, 0.87, median 0.87" in note
    assert note.endswith(f"target ≥ {OUTBOX_RATIO_TARGET:.2f} met")
    rows = _rounds((800.0, 1000.0), (900.0, 1000.0), (820.0, 1000.0))
    link_outbox_comparisons(rows, OUTBOX_COMPARISONS)
    [note] = [line for line in notes(rows, 2) if line.startswith("events:")]
    assert note.endswith("MISSED")
