"""`python -m tests.bench` (what `make bench` runs)."""

from tests.bench.runner import main

# Generator processes are spawned, and spawn re-imports the main module as __mp_main__.
if __name__ == "__main__":
    raise SystemExit(main())
