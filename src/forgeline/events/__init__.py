"""Live output as a durable, replayable log of per-job events."""
