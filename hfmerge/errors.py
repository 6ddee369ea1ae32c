"""Errors that hfmerge raises for things the user can fix.

Every class subclasses a built-in exception, as huggingface_hub's errors do, so
callers can catch ``ValueError`` or ``FileExistsError`` as they already would.
The CLI prints the message of any :class:`HfMergeError` on one line and exits
with status 2; each message says what is wrong and how to fix it.
"""

from __future__ import annotations


class HfMergeError(Exception):
    """Base class of every user-facing hfmerge error."""


class RecipeError(HfMergeError, ValueError):
    """The recipe (CLI flags, YAML or Python arguments) is invalid."""


class SourceError(HfMergeError, ValueError):
    """A source cannot be resolved or used: missing repo or revision, no access, no safetensors, no image processor
    where images must go through one."""


class IncompatibleModelsError(HfMergeError, ValueError):
    """The sources cannot be merged with the chosen method."""


class MergeNumericError(HfMergeError, ArithmeticError):
    """A merge produced NaN or infinite values."""


class OutputExistsError(HfMergeError, FileExistsError):
    """The output folder exists and is not empty."""


class DiskSpaceError(HfMergeError, OSError):
    """The disk cannot hold what hfmerge must write: too little free space before writing, or it filled while writing."""


class PublishError(HfMergeError, RuntimeError):
    """Uploading to the Hub failed."""


class StatisticsError(HfMergeError, ValueError):
    """A statistics pass cannot run on the data or model given (no samples, no labels, not a classifier)."""


class HubUnreachableError(HfMergeError, ConnectionError):
    """The Hub endpoint cannot be reached: no network, unknown host, refused connection or timeout."""


class DataError(HfMergeError, ValueError):
    """A dataset cannot be used: missing dataset, revision, split or column, no usable samples, labels that do not fit."""


class EvaluationError(HfMergeError, ValueError):
    """A model cannot be evaluated as asked: unlabeled evaluation data, or a ``--metric`` that does not load."""


class TrainingError(HfMergeError, ValueError):
    """Training cannot run as asked: no samples, no loss, unlabeled validation data, no trainable weights."""


class TransportError(HfMergeError, ValueError):
    """Neurons cannot be aligned by optimal transport: shapes that do not fit, a cost that is not finite, a solver that fails."""
