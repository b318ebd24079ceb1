"""Events: the transactional outbox, its relay to NATS JetStream, and the consumers."""
