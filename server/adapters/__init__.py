"""Adapters: the outside world (payment providers, ...) behind the ports the services define."""
