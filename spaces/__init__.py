"""The Gradio demo Space that ``hfmerge space`` writes: ``app.py``, its requirements, README and examples.

Packaged as ``hfmerge.spaces`` so that the command can copy these files; the
app itself never imports hfmerge, except to load a gated merge.
"""
