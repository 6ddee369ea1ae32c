"""AdaMerging (Yang et al., ICLR 2024): task-vector coefficients learned by entropy minimisation.

Importing this package registers the method. ``method`` holds the method and its per-tensor operation;
``training`` the stage that learns the coefficients on each source's unlabeled data before the merge.
"""

from hfmerge.methods.adamerging import method  # noqa: F401  (registration)
