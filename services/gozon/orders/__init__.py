"""The orders service: orders, their outbox, and the consumer of payment results."""
