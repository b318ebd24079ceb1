"""`make bench`: throughput, latency and CPU cost of the server against same-run baselines.

`python -m tests.bench` starts PostgreSQL (embedded, or a throwaway database on
BENCH_DATABASE_URL), seeds 10,000 products, runs every scenario for a fixed time after a
warm-up, checks the stock invariants after each one, prints one table and writes
bench-results.json. Each gRPC scenario then runs again open loop at half the throughput it
reached, for its p99 there (the `p99@half ms` column). See tests/bench/config.py for the
environment variables.
"""
