"""Gating merge of ViTs (Ye et al. 2023): the method, its weight similarity, its gated model and its gate.

Importing this package registers the method. ``similarity`` chooses the gated layers (Eq. 4),
``model`` and ``gated_vit`` are the merged model (``gated_vit`` is the self-contained modeling file
written beside it), ``gate`` feeds the gate network during its training.
"""

from hfmerge.methods.gating import method  # noqa: F401  (registration)
