"""The `marketplace` command line, on the typed async client (marketplace_client)."""
