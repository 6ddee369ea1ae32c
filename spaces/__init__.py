"""The Gradio demo Space that ``hfmerge space`` writes: ``app.py``, its requirements, README and examples.

Packaged as ``hfmerge.spaces`` so that the command can copy these files; the
app itself never imports hfmerge (a gated merge loads with the modeling file written beside it). hfmerge
imports two of its modules: ``source_ref`` (the one parser of model
references, standard library only) and ``inference`` (the app's models
without Gradio, and the constants the command and the app share).
"""
