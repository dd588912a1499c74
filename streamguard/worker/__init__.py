"""The streaming worker: Kafka in, verdicts and dead letters out, at-least-once."""
