"""Helpers for tests, the offline demo and the benchmarks: a local Hub, tiny models and the digit tasks."""
