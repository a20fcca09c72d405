"""Durable generation jobs: records, the service that stores them, the queue that runs them."""
