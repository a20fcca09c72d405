"""Benchmarks of forgeline: each module prints figures, none asserts.

Run one with ``python -m bench.<name> --help``; ``bench/README.md`` says what
each measures.
"""
