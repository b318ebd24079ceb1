"""Marketplace rules in plain Python: no gRPC, SQL or I/O imports here."""
