"""Use cases. Each opens its own transaction, calls the domain, and commits."""
