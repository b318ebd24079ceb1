"""What the bench is doing, on stderr: stdout carries only the final table."""

from __future__ import annotations

import sys


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
