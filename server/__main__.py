"""`python -m server`: run one gRPC server process."""

from server.app import main

main()
