"""Talking to the Hub: resolving sources and publishing results."""

from hfmerge.hub.publish import push_folder
from hfmerge.hub.resolve import ResolvedSource, resolve_source

__all__ = ["ResolvedSource", "push_folder", "resolve_source"]
