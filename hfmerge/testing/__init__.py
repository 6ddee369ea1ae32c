"""Helpers for tests, the offline demo and the benchmarks: a local Hub and tiny models."""
