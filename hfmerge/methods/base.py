"""Merge methods as small registered units that carry their metadata.

A method declares its name, the paper it comes from, its parameters with
defaults and ranges, and what it needs (a base model, an anchor, weights).
Its :meth:`MergeMethod.plan` turns inspected sources into a list of
:class:`~hfmerge.engine.plan.TensorPlan` — pure decisions, no I/O; the engine
then streams the tensors through the plan's operations. Whatever else it
needs (data, training, derived tensors, comparison rows) it declares once as
stages (:meth:`MergeMethod.stages`, :mod:`hfmerge.methods.stages`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.stages import DataNeeds, Stage, data_needs

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext, MergePlan


HEAD_POLICIES = ("concat", "average", "anchor")
"""What becomes of the classifier heads (:mod:`hfmerge.methods.heads`): the union head, their average, or the anchor's."""

TASK_VECTOR_CARD_NOTES = (
    "{% if batch_norm %}BatchNorm running statistics are averaged over the sources, not treated as task "
    "vectors.{% endif %}"
    "{% if details.heads and details.heads != 'task vectors' %}{% if batch_norm %} {% endif %}Classifier heads (and any tensor the base lacks) "
    "follow the `{{ details.heads }}` head policy: "
    "{{ {'concat': 'concatenated into one head over the union of the labels',"
    " 'average': 'averaged over the sources', 'anchor': 'kept from the anchor'}[details.heads] }}.{% endif %}"
)
"""The card sentences every task-vector method ends its ``card_template`` with."""


AUTO = "auto"
"""The value that asks for a searchable parameter to be chosen on validation data (:attr:`ParamSpec.search`)."""

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
"""λ ∈ {0.1, 0.2, ..., 1.0}: the task-vector scale searched on validation data by the TIES paper's official code
(its README's ``task-vector_linear+0.1+1.01+0.1``), the grid of every float ``lambda`` that declares none."""


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method declares: its type, default and allowed range, and the grid it may be searched on.

    A float ``lambda`` (a task-vector scale) is searchable on :data:`LAMBDA_GRID` unless it declares its own
    ``search`` (``()``: not searchable, as gating's λ, which only scales a comparison row); a method says nothing else about the search, which the pipeline runs (:mod:`hfmerge.run.search`).
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    needs_data: bool = False
    """The parameter only acts when the merge is given data (fusion's fine-tuning options)."""
    search: tuple[float, ...] | None = None
    """The grid the value is chosen from when the user gives ``auto`` (and ``--eval-data``): the points the
    paper searched on its validation data. ``None``: not searchable (but see ``lambda`` above); ``()``: never."""

    def __post_init__(self) -> None:
        if self.search is None and self.name == "lambda" and self.type is float:
            object.__setattr__(self, "search", LAMBDA_GRID)
        if self.search is not None and self.type not in (int, float):
            raise TypeError(f"parameter {self.name!r}: only a number can be searched, not a {self.type.__name__}")

    @property
    def grid(self) -> tuple[Any, ...]:
        """The search's points within the parameter's range, as its type; empty when it is not searchable."""
        points = [self.type(p) for p in self.search or ()]
        return tuple(p for p in points if (self.minimum is None or p >= self.minimum)
                     and (self.maximum is None or p <= self.maximum))

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
            auto = f" or {AUTO} (chosen on --eval-data)" if self.grid else ""
            raise RecipeError(
                f"parameter '{self.name}' of method '{method}' must be {self.type.__name__}{auto}, got {value!r}"
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
    max_sources: ClassVar[int | None] = None
    """The most sources the method's maths takes (slerp: two); ``None``: any number."""
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

    def auto_parameters(self, given: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        """The parameters ``given`` as ``auto``, each with the grid it is searched on, in declaration order.

        Raises:
            RecipeError: a parameter that cannot be searched is given as ``auto``.
        """
        specs = {p.name: p for p in self.parameters}
        asked = [name for name, value in given.items() if isinstance(value, str) and value.strip().lower() == AUTO]
        for name in asked:
            if name in specs and not specs[name].grid:
                searchable = ", ".join(p.name for p in self.parameters if p.grid) or "none"
                raise RecipeError(f"parameter '{name}' of method '{self.name}' cannot be {AUTO}; the parameters "
                                  f"chosen on validation data are: {searchable}")
        return {p.name: p.grid for p in self.parameters if p.name in asked}

    @abstractmethod
    def plan(self, ctx: MergeContext) -> MergePlan:
        """Decide, for every output tensor, which inputs it comes from and how."""

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """What the method asks of the pipeline besides its plan, in order (:mod:`hfmerge.methods.stages`); none by default.

        Read only ``ctx.params``, ``ctx.evaluating`` and ``ctx.base`` here: the stages are also declared before
        any model is inspected, to check the recipe's data (:meth:`data_needs`). What depends on the models is
        a function of the context that the stage calls when it is resolved, after planning.
        """
        return []

    def data_needs(self, parameters: dict[str, Any] | None = None, *, evaluating: bool = False) -> DataNeeds:
        """What the stages need of ``--data`` for these (validated) parameters; the defaults when none are given."""
        from types import SimpleNamespace

        params = self.validate_parameters({}) if parameters is None else parameters
        # what stages() may read when declaring; not a MergeContext, whose module imports torch (`hfmerge --help`)
        declaring = SimpleNamespace(params=params, evaluating=evaluating, base=None)
        return data_needs(self.stages(declaring))  # type: ignore[arg-type]

    def check_sources(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> None:
        """Refuse sources whose family or task the method cannot merge, from their inspection alone; none by default.

        The pipeline asks this as soon as the sources are inspected, before it resolves the base and the
        auxiliary models (:meth:`auxiliary_models`): a user who gives models the method cannot merge reads
        that, not that a gate or a base they never chose cannot be downloaded. Everything that needs the
        other models, or the anchor, is checked when the method plans.

        Raises:
            IncompatibleModelsError: naming the source and what the method needs instead.
            RecipeError: a parameter asks of these sources what they cannot do (EMR's gate, of segmentation models).
        """
        return

    def choose_anchor(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> tuple[int, str] | None:
        """The anchor (the target model) the method needs, and why, when ``--anchor`` names none; ``None``: the default."""
        return None

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        """Lines the dry run prints about the method's own decisions (indented by two spaces); none by default."""
        return []

    def auxiliary_models(self, parameters: dict[str, Any]) -> dict[str, str]:
        """Models besides the sources, by role -> repo id or folder (gating's gate network); none by default.

        The pipeline resolves and inspects them with the sources, so a missing one
        fails before any data is read; the plan finds them in ``ctx.auxiliary``.
        """
        return {}


_REGISTRY: dict[str, MergeMethod] = {}


def require_image_classifiers(layouts: list[ModelLayout], needs: str, instead: str) -> None:
    """Refuse any source that is not an image classifier, for a method whose maths reads class predictions.

    ``needs`` says what the method needs ("adamerging minimises the entropy of class predictions"),
    ``instead`` which methods merge other tasks.

    Raises:
        IncompatibleModelsError: naming the first source that is not an image classifier.
    """
    for layout in layouts:
        if layout.task != "image-classification":
            raise IncompatibleModelsError(
                f"{needs}, and {layout.source.short_name} is {_article(layout.task)} {layout.task} model; merge image "
                "classifiers, "
                f"or use {instead}"
            )


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: register a method under its ``name``; a second registration of a name is an error.

    A subclass of a registered method is a method of its own when it declares a ``name`` of its own (and,
    for ``hfmerge methods`` and the card, its own ``title`` and ``reference``).
    """
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
        raise TypeError(f"{cls!r} is not a MergeMethod subclass")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name[:1].isalnum() and all(c.isalnum() or c in "_.-" for c in name)):
        raise TypeError(f"{cls.__name__} needs a name of letters, digits, '_', '.' and '-', got {name!r}")
    missing = [field for field in ("title", "reference", "reference_url")
               if not isinstance(getattr(cls, field, None), str)]
    if missing:
        raise TypeError(f"method {name!r} ({cls.__name__}) does not declare {', '.join(missing)}")
    if name in _REGISTRY:
        owner = type(_REGISTRY[name])
        subclass = issubclass(cls, owner) and cls is not owner
        hint = f"; {cls.__name__} subclasses it, so give it a name of its own" if subclass else ""
        raise ValueError(f"merge method {name!r} is already registered by {owner.__module__}.{owner.__name__}{hint}")
    _REGISTRY[name] = cls()
    return cls


def _register_plugin(loaded: Any) -> list[str]:
    """Register what an ``hfmerge.methods`` entry point names: a MergeMethod subclass."""
    if not (isinstance(loaded, type) and issubclass(loaded, MergeMethod)):
        raise TypeError(f"it names {loaded!r}, not a MergeMethod subclass")
    if type(_REGISTRY.get(getattr(loaded, "name", None))) is loaded:  # its module registered it as it was imported
        return [loaded.name]
    register_method(loaded)
    return [loaded.name]


def _load_plugins() -> None:
    from hfmerge.plugins import METHODS_GROUP, load_entry_points

    load_entry_points(METHODS_GROUP, _register_plugin)


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name`` (hfmerge's own, or a plug-in's)."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """The names of the registered methods, hfmerge's own and the plug-ins', sorted."""
    _load_plugins()
    return sorted(_REGISTRY)
