"""Pipelines: the kinds of job forgeline runs, built-in and plugged in."""
