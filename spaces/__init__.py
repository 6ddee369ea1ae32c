"""The Gradio demo Space that ``hfmerge space`` writes: ``app.py``, its requirements, README and examples.

Packaged as ``hfmerge.spaces`` so that the command can copy these files; the
app itself never imports hfmerge (a gated merge loads with the modeling file written beside it). hfmerge
imports one of its modules: ``inference`` (the app's models without Gradio,
and the constants the command and the app share). ``source_ref.py``, the one
parser of model references, is :mod:`hfmerge.source_ref`, copied beside
``app.py`` when the Space is written.
"""
