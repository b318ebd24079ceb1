"""The server's NATS connection and the JetStream streams it relies on."""

from __future__ import annotations

MARKETPLACE_STREAM = "MARKETPLACE"
DEAD_LETTER_STREAM = "MARKETPLACE_DLQ"
WAREHOUSE_STREAM = "WAREHOUSE"
DEAD_LETTER_SUBJECT_PREFIX = "marketplace.dlq."
