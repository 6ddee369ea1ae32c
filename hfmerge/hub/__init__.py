"""Talking to the Hub: resolving sources and publishing results."""

from hfmerge.publish.hub import push_folder
from hfmerge.hub.resolve import ResolvedSource, resolve_source

__all__ = ["ResolvedSource", "push_folder", "resolve_source"]
