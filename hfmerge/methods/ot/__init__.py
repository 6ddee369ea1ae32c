"""Merges by optimal transport: OTFusion (Singh & Jaggi 2020) and CLAFusion (Nguyen et al. 2021).

Importing this package registers both methods. The transport solver and the neuron alignment
(``alignment``), the cross-layer alignment and layer balancing of CLAFusion (``cross_layer``,
``balancing``) and the pictures of the cards (``pictures``) live beside them.
"""

from hfmerge.methods.ot import clafusion, otfusion  # noqa: F401  (registration)
