"""The local development stack behind `make run`, and the pieces the tests reuse: PostgreSQL
(embedded via pgserver unless DATABASE_URL is set), Envoy, localstripe (a Stripe emulator)
and the server as its own process. Not part of the server: nothing under server/ imports it.

    python -m devstack            # run the stack until Ctrl-C
    python -m devstack token --role admin --sub alice
    python -m devstack card --number 4242424242424242   # a PaymentMethod id
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# What `make run` keeps between runs: the embedded database, localstripe's store, the JWT
# secret, config and logs. DEVSTACK_DATA_DIR moves it (the tests run whole stacks in tmp).
DATA_DIR = Path(os.environ.get("DEVSTACK_DATA_DIR") or REPO_ROOT / ".data").resolve()
