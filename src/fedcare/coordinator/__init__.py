"""The coordinator: HTTP service, durable round state, model storage."""
