"""The local development stack behind `make run`, and the pieces the tests reuse: PostgreSQL
(embedded via pgserver unless DATABASE_URL is set), Envoy, localstripe (a Stripe emulator)
and the server as its own process. Not part of the server: nothing under server/ imports it.

    python -m devstack            # run the stack until Ctrl-C
    python -m devstack token --role admin --sub alice
    python -m devstack card --number 4242424242424242   # a PaymentMethod id
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# What `make run` keeps between runs: the embedded database, its JWT secret, config and logs.
DATA_DIR = REPO_ROOT / ".data"
