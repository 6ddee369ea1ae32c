"""AdaMerging (Yang et al., ICLR 2024): task-vector coefficients learned by entropy minimisation.

Importing this package registers the method. ``method`` holds the method, ``op`` its per-tensor operation
(which reads the learned coefficients), ``training`` the stage that learns them on each source's unlabeled
data before the merge.
"""

from hfmerge.methods.adamerging import method  # noqa: F401  (registration)
