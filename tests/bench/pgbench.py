"""The database's own limit: pgbench -M prepared running the SQL the server issues for one
order (a batch of one), against the same database, with the same number of clients."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.bench.config import HOT_PRODUCT_N, PRODUCT_COUNT
from tests.bench.grpc_load import LoadResult
from tests.bench.stack import Database, wait_with_rusage

T = TypeVar("T")

# Picks the order's lines. order-spread: 1-3 distinct products among the 10,000 (n2 and n3
# are n1 shifted by distinct offsets a < b in 1..9999, so all three differ).
SPREAD_LINES = f"""\
\\set k random(1, 3)
\\set n1 random(1, {PRODUCT_COUNT})
\\set a random(1, {PRODUCT_COUNT - 2})
\\set b :a + random(1, {PRODUCT_COUNT - 1} - :a)
\\set n2 (:n1 - 1 + :a) % {PRODUCT_COUNT} + 1
\\set n3 (:n1 - 1 + :b) % {PRODUCT_COUNT} + 1
"""
FLASH_SALE_LINES = f"""\
\\set k 1
\\set n1 {HOT_PRODUCT_N}
\\set n2 0
\\set n3 0
"""

# Not part of the server's transaction: what the server computes in Python before it
# (a fresh order id, the request id and fingerprint, the lines' SKUs and prices, the total,
# all as the array parameters it binds, and the payment window in seconds). pgbench can
# only make strings with SQL, so one extra round trip per order does it here, outside the
# transaction, and \gset keeps the results. SKU and price follow the seeding formula
# (tests/bench/config.py), so they are what the locked rows hold; the end-of-scenario check
# verifies every line against its product.
PARAMETERS = """\
WITH o AS MATERIALIZED (
  SELECT gen_random_uuid()::text AS id,
         md5(random()::text) AS request_id,
         encode(sha256(random()::text::bytea), 'hex') AS fingerprint,
         'pgbench-' || :client_id::text AS customer_id
), l AS (
  SELECT t.line_no,
         '00000000-0000-4000-8000-' || lpad(t.n::text, 12, '0') AS product_id,
         'BENCH-' || lpad(t.n::text, 6, '0') AS sku,
         (t.n % 100) + 0.99 AS unit_price
    FROM unnest((ARRAY[:n1::int, :n2::int, :n3::int])[1:(:k)::int])
         WITH ORDINALITY AS t(n, line_no)
)
SELECT '{' || string_agg(l.product_id, ',' ORDER BY l.product_id) || '}' AS ids,
       '{' || string_agg(l.product_id, ',' ORDER BY l.product_id) || '}' AS product_ids,
       '{' || string_agg('1', ',') || '}' AS quantities,
       '{' || o.id || '}' AS order_ids,
       '{' || o.customer_id || '}' AS customers,
       '{' || o.customer_id || '@example.com}' AS customer_emails,
       '{' || o.request_id || '}' AS request_ids,
       '{' || o.fingerprint || '}' AS fingerprints,
       '{USD}' AS currencies,
       '{' || sum(l.unit_price)::text || '}' AS totals,
       '{' || string_agg(o.id, ',' ORDER BY l.line_no) || '}' AS line_order_ids,
       '{' || string_agg(l.line_no::text, ',' ORDER BY l.line_no) || '}' AS line_numbers,
       '{' || string_agg(l.product_id, ',' ORDER BY l.line_no) || '}' AS line_product_ids,
       '{' || string_agg(l.sku, ',' ORDER BY l.line_no) || '}' AS line_skus,
       '{' || string_agg('1', ',') || '}' AS line_quantities,
       '{' || string_agg(l.unit_price::text, ',' ORDER BY l.line_no) || '}' AS line_prices,
       '{' || string_agg('USD', ',') || '}' AS line_currencies,
       900 AS payment_window
  FROM o CROSS JOIN l
 GROUP BY o.id, o.customer_id, o.request_id, o.fingerprint \\gset
"""

# The server's own order statements, imported rather than copied so the baseline can never
# drift from what the server runs. pgbench's `:name` variables are SQLAlchemy's `:name` bind
# parameters, so the text runs unchanged, each statement bound to the arrays PARAMETERS built.
_VARIABLE = re.compile(r"(?<![:\w]):(\w+)")
# The variables PARAMETERS sets: the aliases of its final SELECT.
_BUILT = frozenset(
    re.findall(r"\bAS (\w+)", PARAMETERS.split("\nSELECT ", 1)[1].split("\n  FROM o ")[0])
)


@dataclass(frozen=True)
class OrderSql:
    statements: tuple[str, ...]
    source: str  # where the statements came from, for the report


def order_sql() -> OrderSql:
    """The server's order statements, as with OUTBOX_WRITES off: the events' payloads are
    protobuf built in Python, which pgbench cannot make (the bench's `:no-outbox` rows
    measure the server without them). Fails loudly if they bind a parameter pgbench lacks."""
    from server.services.orders import placement

    statements = (
        placement.LOCK_PRODUCTS,
        placement.FIND_BY_REQUEST_IDS,
        placement.WRITE_ORDERS_WITHOUT_EVENTS,
    )
    unbound = set(_VARIABLE.findall(" ".join(statements))) - _BUILT
    if unbound:
        raise RuntimeError(
            f"{placement.__name__} binds {sorted(unbound)}; extend PARAMETERS to build them"
        )
    return OrderSql(statements, f"{placement.__name__}, without events")


def script(kind: str, sql: OrderSql) -> str:
    """The server's statements for a batch of one order, as the naive transaction: BEGIN,
    the three statements, COMMIT, each its own round trip (the server pipelines the same
    five into two; see server/services/orders/placement.py)."""
    lines = {"order-spread": SPREAD_LINES, "flash-sale": FLASH_SALE_LINES}[kind]
    body = "".join(statement.strip().rstrip(";") + ";\n" for statement in sql.statements)
    return lines + PARAMETERS + "BEGIN;\n" + body + "COMMIT;\n"


@dataclass
class PgbenchRun:
    load: LoadResult
    aborted_clients: int
    reported_tps: float
    cpu_seconds: float  # pgbench itself, the whole run
    output: str


_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")
_ABORTED = re.compile(r"client \d+ aborted")


def _parse_logs(prefix: Path, window: tuple[float, float]) -> LoadResult:
    """Per-transaction logs (-l): `client_id tx_no time script_no epoch epoch_us`, time in
    µs or `failed`/`skipped`; the epoch fields are when the transaction ended."""
    start, end = window
    result = LoadResult()
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            finished = int(fields[4]) + int(fields[5]) / 1e6
            in_window = start <= finished < end
            if fields[2].isdigit():
                if in_window:
                    result.ok_window += 1
                    result.latencies_ms.append(int(fields[2]) / 1000.0)
            elif in_window:
                result.errors_window[fields[2]] += 1
    return result


def run_pgbench(
    database: Database,
    *,
    kind: str,
    sql: OrderSql,
    clients: int,
    threads: int,
    warmup: float,
    seconds: float,
    scratch: Path,
    sample: Callable[[list[int]], T],
) -> tuple[PgbenchRun, T, T]:
    """One pgbench run of warm-up + measured seconds (+1 s so the run's end stays outside
    the measured interval); latencies and counts of the interval come from its per-transaction
    log, `sample(pids)` is called at both ends of the interval."""
    from pgserver._commands import POSTGRES_BIN_PATH

    name = f"pgbench-{kind}-{clients}"
    script_path = scratch / f"{name}.sql"
    script_path.write_text(script(kind, sql))
    log_prefix = scratch / f"{name}-log"
    connection, env = database.pgbench_connection()
    duration = int(warmup + seconds + 0.999) + 1
    command = [
        str(POSTGRES_BIN_PATH / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(threads, clients)),
        "-T",
        str(duration),
        "-f",
        str(script_path),
        "-l",
        f"--log-prefix={log_prefix}",
        *connection,
    ]
    output_path = scratch / f"{name}.out"
    with output_path.open("wb") as output:
        began = time.time()
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=scratch, env={**os.environ, **env}
        )
        try:
            start = began + warmup
            end = start + seconds
            time.sleep(max(0.0, start - time.time()))
            first_sample = sample([process.pid])
            time.sleep(max(0.0, end - time.time()))
            last_sample = sample([process.pid])
            cpu = wait_with_rusage(process, timeout=duration + 60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = output_path.read_text(errors="replace")
    processed = _PROCESSED.search(text)
    if processed is None:
        raise RuntimeError(f"pgbench failed (exit {process.returncode}):\n{text[-3000:]}")
    load = _parse_logs(log_prefix, (start, end))
    load.ok_total = int(processed.group(1))
    failed = _FAILED.search(text)
    if failed and int(failed.group(1)):
        load.errors_total["failed"] = int(failed.group(1))
    aborted = len(_ABORTED.findall(text))
    if aborted:
        load.errors_total["aborted clients"] = aborted
        load.errors_window["aborted clients"] = aborted
    tps = _TPS.search(text)
    return (
        PgbenchRun(load, aborted, float(tps.group(1)) if tps else 0.0, cpu, text),
        first_sample,
        last_sample,
    )
