"""EMR-Merging (Huang et al. 2024): the method, its repository format and its model.

Importing this package registers the method. ``method`` elects the unified task vector, the masks
and the rescalers; ``emr_model`` is the self-contained modeling file written into the repository
(its config and the model whose forward takes ``task=``); ``model`` is the hfmerge side: that file's
text, recognising an EMR folder, and loading one task's model as an ordinary transformers model.
"""

from hfmerge.methods.emr import method  # noqa: F401  (registration)
