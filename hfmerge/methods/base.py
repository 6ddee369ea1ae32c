"""Merge methods as small registered units that carry their metadata.

A method declares its name, the paper it comes from, its parameters with
defaults and ranges, and what it needs (a base model, an anchor, weights).
Its :meth:`MergeMethod.plan` turns inspected sources into a list of
:class:`~hfmerge.engine.plan.TensorPlan` — pure decisions, no I/O; the engine
then streams the tensors through the plan's operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hfmerge.errors import RecipeError

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.engine.statistics import StatisticsRequest
    from hfmerge.ops import Loader


HEAD_POLICIES = ("concat", "average", "anchor")
"""What becomes of the classifier heads (:mod:`hfmerge.methods.heads`): the union head, their average, or the anchor's."""

TASK_VECTOR_CARD_NOTES = (
    "BatchNorm running statistics are averaged over the sources, not treated as task vectors."
    "{% if details.heads and details.heads != 'task vectors' %} Classifier heads (and any tensor the base lacks) "
    "follow the `{{ details.heads }}` head policy: "
    "{{ {'concat': 'concatenated into one head over the union of the labels',"
    " 'average': 'averaged over the sources', 'anchor': 'kept from the anchor'}[details.heads] }}.{% endif %}"
)
"""The card sentences every task-vector method ends its ``card_template`` with."""


@dataclass(frozen=True)
class FineTuning:
    """A training step a method asks for after the merge (the pipeline's post-train stage).

    ``label_maps`` says, per source, where its labels land in the merged
    model: ``{source label index: merged label index}``; each source's data is
    read with its own labels and mapped through it. The other fields are the
    training options (:class:`hfmerge.train.TrainOptions`).
    """

    label_maps: tuple[dict[int, int], ...]
    epochs: int
    learning_rate: float
    batch_size: int
    patience: int
    samples: int | None = None
    teacher: int | None = None
    """Distil from this source while training (Hinton et al. 2015): its softened predictions join the labels."""
    temperature: float = 1.0
    """The distillation's softmax temperature T."""
    distill_weight: float = 0.0
    """γ: the loss is (1 − γ)·cross-entropy + γ·T²·KL(teacher_T ‖ student_T)."""


@dataclass(frozen=True)
class GateTraining:
    """A gate network the training stage fine-tunes before the merge (vit-gating-merge §3.2).

    ``gate`` is the role of the gate model in ``ctx.auxiliary``; it gets a head of one output per
    source and learns which source's data an image comes from, on at most ``fraction`` of each
    source's data (the rest measures it), with the other fields as training options.
    """

    gate: str
    fraction: float
    epochs: int
    learning_rate: float
    batch_size: int


@dataclass
class Derived:
    """What a method's derive stage computed before the merge: tensors the plan reads, facts for the card.

    ``tensors`` become the last table (:attr:`~hfmerge.engine.plan.MergeContext.DERIVED_TABLE`);
    ``details`` are added to the plan's details.
    """

    tensors: dict[str, Any]
    details: dict[str, Any]
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files for the output folder (pictures the card shows), added to the plan's output declaration."""


@dataclass(frozen=True)
class Comparison:
    """Another merge of the same sources that the evaluation shows beside this one (a paper's comparison rows).

    ``parameters`` replace the merge's own; the plan is made again with them and executed from the same
    sources, statistics and trained tensors.

    ``task_given``: each task's images go through the classifier (and gated layers) of the source of
    that task, as the paper's baselines select the classifier by hand; the i-th evaluation dataset is
    the i-th source's task.
    """

    name: str
    parameters: dict[str, Any]
    task_given: bool = False


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method declares: its type, default and allowed range."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    needs_data: bool = False
    """The parameter only acts when the merge is given data (fusion's fine-tuning options)."""

    def coerce(self, value: Any, method: str) -> Any:
        if value is None and self.default is None:  # an optional parameter left unset
            return None
        try:
            if self.type is bool and isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out: Any = lowered in ("true", "1", "yes")
            else:
                out = self.type(value)
                if self.type is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
        except (TypeError, ValueError):
            raise RecipeError(
                f"parameter '{self.name}' of method '{method}' must be {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and out not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise RecipeError(f"parameter '{self.name}' of method '{method}' must be one of {allowed}, got {out!r}")
        if self.minimum is not None and out < self.minimum:
            raise RecipeError(f"parameter '{self.name}' of method '{method}' must be >= {self.minimum}, got {out}")
        if self.maximum is not None and out > self.maximum:
            raise RecipeError(f"parameter '{self.name}' of method '{method}' must be <= {self.maximum}, got {out}")
        return out


class MergeMethod(ABC):
    """Base class of a merge method; subclasses are registered with :func:`register_method`."""

    name: ClassVar[str]
    title: ClassVar[str]
    reference: ClassVar[str]
    reference_url: ClassVar[str]
    parameters: ClassVar[tuple[ParamSpec, ...]] = ()
    needs_base: ClassVar[bool] = False
    accepts_base: ClassVar[bool] = False
    """A base model is optional (gating uses one only for its task-arithmetic comparison rows)."""
    uses_anchor: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = False
    min_sources: ClassVar[int] = 2
    needs_data: ClassVar[bool] = False
    """The method reads data of each source (``--data``), e.g. for statistics; without it, it cannot run."""
    data_use: ClassVar[str] = "to compute its statistics"
    """What the data is for, in the message that asks for it."""
    data_per_source: ClassVar[bool] = False
    """Each source needs its own dataset (``--data`` once per source): one dataset for all is refused."""
    uses_data: ClassVar[bool] = False
    """Data is optional: the method does more with it (fusion fine-tunes) and runs without it."""
    data_requirement: ClassVar[str] = "optional"
    """How ``hfmerge methods`` describes optional data (e.g. which parameter values need it)."""
    card_template: ClassVar[str] = ""
    """The method's own paragraph of the model card: a Jinja snippet rendered with
    ``details`` (the plan's details), ``parameters``, ``base`` and ``sources``.
    Each method states its own formula here; the card template never branches on
    method names.

    ``sources`` are the card's rows (``name``, ``url``, ``revision``, ``commit``,
    ``weight``, ``labels``, ``role``); ``base`` is ``None`` or has ``name``,
    ``url`` and ``commit``; ``method``, ``architecture`` and ``task`` are there
    too. An undefined name is an error, so a typo fails the method's tests.
    A method without a snippet gets a sentence pointing to its reference."""

    def validate_parameters(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and check ``given`` against the declared parameters."""
        specs = {p.name: p for p in self.parameters}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            valid = ", ".join(specs) or "none"
            raise RecipeError(f"unknown parameter(s) {unknown} for method '{self.name}'; valid parameters: {valid}")
        return {name: spec.coerce(given.get(name, spec.default), self.name) for name, spec in specs.items()}

    @abstractmethod
    def plan(self, ctx: MergeContext) -> MergePlan:
        """Decide, for every output tensor, which inputs it comes from and how."""

    def statistics(self, ctx: MergeContext) -> StatisticsRequest | None:
        """What the statistics stage must collect on each source's data; ``None``: no data pass.

        The plan refers to these statistics by key (``gram/<module>``...) through
        :meth:`~hfmerge.engine.plan.MergeContext.statistics_index`; they are
        computed after planning, so ``--dry-run`` can show the plan without them.
        """
        return None

    def source_statistics(self, ctx: MergeContext, index: int) -> StatisticsRequest | None:
        """What to collect on source ``index``'s data; by default :meth:`statistics`, the same for every source.

        A method over sources of different shapes (CLAFusion: different depths) asks each for its own modules.
        """
        return self.statistics(ctx)

    def choose_anchor(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> tuple[int, str] | None:
        """The anchor (the target model) the method needs, and why, when ``--anchor`` names none; ``None``: the default."""
        return None

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        """Lines the dry run prints about the method's own decisions (indented by two spaces); none by default."""
        return []

    def samples(self, parameters: dict[str, Any]) -> int | None:
        """How many samples of each source's data the statistics stage reads (``None``: all)."""
        return parameters.get("samples")

    def labeled(self, parameters: dict[str, Any]) -> bool:
        """Whether the data must have labels (true labels for the statistics, or fine-tuning)."""
        return False

    def fine_tuning(self, ctx: MergeContext, plan: MergePlan) -> FineTuning | None:
        """The post-merge training step, or ``None`` (the default: the merge is the result)."""
        return None

    def comparisons(self, ctx: MergeContext) -> list[Comparison]:
        """Other merges of the same sources to evaluate beside this one when evaluation data is given; none by default."""
        return []

    def auxiliary_models(self, parameters: dict[str, Any]) -> dict[str, str]:
        """Models besides the sources, by role -> repo id or folder (gating's gate network); none by default.

        The pipeline resolves and inspects them with the sources, so a missing one
        fails before any data is read; the plan finds them in ``ctx.auxiliary``.
        """
        return {}

    def analyse(self, ctx: MergeContext) -> dict[str, Any] | None:
        """The analysis stage: facts read from the sources' weights before planning, or ``None`` (none needed).

        Runs before :meth:`plan`, which finds the result in ``ctx.analysis``;
        it must stream tensors (memory flat in the number of sources). A dry run
        over Hub sources skips it (``ctx.analysis`` stays ``None``).
        """
        return None

    def derive(self, ctx: MergeContext, load: Loader) -> Derived | None:
        """The derive stage: tensors computed from weights and statistics after the data stages, before the merge.

        ``load`` reads any table the plan may name (the models, then their statistics). The result's
        tensors are the last table, which the plan named as
        :attr:`~hfmerge.engine.plan.MergeContext.DERIVED_TABLE` (OTFusion's transport maps, computed once
        per neuron group and read by every tensor of the group). Runs in the main process only; a dry
        run never runs it. ``None`` (the default): nothing to derive.
        """
        return None

    def gate_training(self, ctx: MergeContext) -> GateTraining | None:
        """A gate network to train before the merge (the training stage), or ``None`` (the default).

        The trained gate's tensors are a table the plan copies from
        (:attr:`~hfmerge.engine.plan.MergeContext.TRAINED_TABLE`).
        """
        return None


_REGISTRY: dict[str, MergeMethod] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: register a method under its ``name``; a second registration is an error."""
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is already registered by {type(_REGISTRY[cls.name]).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
