"""Messaging shared by both services: Kafka clients, the transactional outbox and its relay,
and the consumer runner with its dead-letter topic."""
