"""Talking to the Hub: resolving sources (repo, revision, files) and their safetensors headers."""

from hfmerge.hub.resolve import ResolvedSource, resolve_source

__all__ = ["ResolvedSource", "resolve_source"]
