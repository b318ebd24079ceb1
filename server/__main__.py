"""`python -m server`: the gRPC server, as SERVER_WORKERS processes (default: one per core)."""

from server.supervisor import main

main()
