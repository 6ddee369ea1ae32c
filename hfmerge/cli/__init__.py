"""The ``hfmerge`` command: ``merge``, ``run``, ``methods``, ``inspect``, ``evaluate``, ``space``."""

from hfmerge.cli.main import main

__all__ = ["main"]
