"""One validated options object behind the CLI, YAML recipes and the Python API, and what is decided for it.

A :class:`Recipe` is built once, at the boundary, and checked there: unknown
fields, unknown methods or parameters, weights that do not fit the sources, an
anchor that is not a source. Everything after it may trust its contents.

A :class:`PlannedMerge` is the recipe once its sources are resolved and
inspected and its method has planned, before any tensor is read:
:func:`hfmerge.run.pipeline.plan_merge` makes it; the dry run prints it, the
stages and the merge run it, and the card and ``hfmerge.yaml`` describe it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hfmerge.data.spec import DataSpec
from hfmerge.errors import RecipeError
from hfmerge.methods.base import AUTO, HEAD_POLICIES
from hfmerge.source import SourceSpec, finite_float

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.hub.resolve import ResolvedSource
    from hfmerge.methods.base import MergeMethod
    from hfmerge.methods.stages import Stage

__all__ = ["DTYPES", "HEAD_POLICIES", "DataSpec", "PlannedMerge", "Recipe", "SourceSpec", "parse_size"]

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Recipe:
    """Everything a merge needs, validated.

    Attributes:
        sources: the models to merge, in order; the first is the default anchor.
        method: a registered method name (``hfmerge.methods.available_methods()``).
        parameters: the method's own parameters (``lambda``, ``start_layer``...).
        weights: one non-negative number per source, normalised by the method.
        anchor: the source whose head and config the result keeps.
        base: the pre-trained model for task arithmetic.
        heads: head policy, ``concat``, ``average`` or ``anchor``; ``None`` lets
            the method choose (:mod:`hfmerge.methods.heads`).
        seed: seed of methods that draw random numbers (``dare``) or sample data (0 when not given).
        data: per source, the data of a method that reads data (regmean, fisher, fusion's
            fine-tuning): given once per source in source order, or once for all.
        eval_data: datasets to evaluate the result on, one per task; the card reports them.
        prompts: zero-shot prompt templates (``{}`` for the class name) that score CLIP towers on ``eval_data``;
            ``None``: :data:`hfmerge.eval.zero_shot.PROMPTS`.
        data_column, label_column: the image and label columns of the data (default: detected).
        dtype: output dtype; default is the sources' dtype.
        allow_pickle: accept ``*.bin``/``*.pt`` sources (loaded with ``weights_only=True``).
        output, push_to_hub, private: where the result goes.
        output_format: write the merge as another architecture of its family, which the base must be
            (``clip``: CLIP towers as a ``CLIPModel`` with the base's text tower); ``None``: the anchor's.
        max_shard_size: largest safetensors shard written, e.g. ``"5GB"``.
    """

    sources: list[SourceSpec]
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None
    anchor: str | None = None
    base: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    output: str | None = None
    output_format: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    max_shard_size: str = "5GB"
    heads: str | None = None
    seed: int | None = None
    data: list[DataSpec] | None = None
    eval_data: list[DataSpec] | None = None
    prompts: list[str] | None = None
    data_column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        self.sources = [SourceSpec.parse(s) for s in self.sources]
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, dict)):
                    value = [value]
                if not isinstance(value, list):
                    raise RecipeError(f"'{name}' must be a list of datasets (org/name[@revision][:split] or folders)")
                setattr(self, name, [_parse_data(v) for v in value] or None)
        self.validate()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Build from a mapping (a parsed YAML recipe); unknown fields are refused."""
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a mapping of fields, e.g. 'method: average' and 'sources: [...]'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
        for required in ("sources", "method"):
            if required not in data:
                raise RecipeError(f"the recipe has no '{required}' field; add it")
        if not isinstance(data["sources"], list):
            raise RecipeError("'sources' must be a list of repo ids or folders")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; give the path of a YAML recipe")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {first}") from None
        return cls.from_dict(data)

    # -- validation ------------------------------------------------------------------
    def validate(self) -> None:
        """Check the recipe against the method registry; raise :class:`RecipeError`."""
        from hfmerge.methods import get_method

        if not self.sources:
            raise RecipeError("no sources given; name at least one model to merge")
        method = get_method(self.method)
        given = dict(self.parameters or {})
        searched = method.auto_parameters(given)
        self.parameters = method.validate_parameters({k: v for k, v in given.items() if k not in searched})
        self.parameters.update(dict.fromkeys(searched, AUTO))
        if searched and not self.eval_data:
            named = " and ".join(f"'{name}'" for name in searched)
            raise RecipeError(f"{named} = {AUTO} is chosen on validation data: add --eval-data org/dataset[:split] "
                              f"(one per task), or give {'a number' if len(searched) == 1 else 'numbers'}")
        if len(self.sources) < method.min_sources:
            raise RecipeError(f"method '{method.name}' needs at least {method.min_sources} sources, got {len(self.sources)}")
        if method.max_sources is not None and len(self.sources) > method.max_sources:
            raise RecipeError(f"method '{method.name}' merges at most {method.max_sources} sources, got "
                              f"{len(self.sources)}; merge them in steps, or use a method for N models (average)")

        if self.weights is not None:
            per_source = [s.weight for s in self.sources]
            if any(w is not None for w in per_source) and per_source != list(self.weights):
                raise RecipeError("give weights either per source or as 'weights', not both")
            weights = [finite_float(w, "weight") for w in self.weights]
            if len(weights) != len(self.sources):
                raise RecipeError(
                    f"{len(weights)} weights for {len(self.sources)} sources; give one weight per source, in order"
                )
            self.weights = weights
        elif any(s.weight is not None for s in self.sources):
            if any(s.weight is None for s in self.sources):
                raise RecipeError("some sources have a weight and some do not; give every source a weight")
            self.weights = [float(s.weight) for s in self.sources]  # type: ignore[arg-type]
        if self.weights is not None:
            if not method.uses_weights:
                raise RecipeError(f"method '{method.name}' takes no weights; drop --weights")
            if any(w < 0 for w in self.weights):
                raise RecipeError(f"weights must be non-negative, got {self.weights}")
            if sum(self.weights) <= 0:
                raise RecipeError("weights sum to zero; give at least one positive weight")

        if self.heads is not None and self.heads not in HEAD_POLICIES:
            raise RecipeError(f"unknown head policy {self.heads!r}; choose one of {', '.join(HEAD_POLICIES)}")
        if self.anchor is not None:
            if not method.uses_anchor and self.heads != "anchor":
                raise RecipeError(f"method '{method.name}' takes no anchor (except with --heads anchor); drop --anchor")
            self.anchor_index()
        if method.needs_base and not self.base:
            raise RecipeError(f"method '{method.name}' needs the pre-trained model: add --base org/name")
        if self.base and not (method.needs_base or method.accepts_base or self.output_format or self.eval_data):
            raise RecipeError(f"method '{method.name}' takes no base model; drop --base")
        if self.output_format is not None and not isinstance(self.output_format, str):
            raise RecipeError(f"output_format must be a name such as 'clip', got {self.output_format!r}")
        if self.prompts is not None:
            from hfmerge.eval.zero_shot import prompt_problem

            self.prompts = [self.prompts] if isinstance(self.prompts, str) else self.prompts
            problem = prompt_problem(self.prompts) if isinstance(self.prompts, list) else "prompts must be a list"
            if problem:
                raise RecipeError(problem)
            if not self.eval_data:
                raise RecipeError("prompts score CLIP towers on --eval-data; add --eval-data, or drop --prompt")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RecipeError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        needs = method.data_needs(self.planning_parameters(), evaluating=bool(self.eval_data))
        if self.data is not None:
            if not needs.any:
                logger.warning("method '%s' reads no data: --data is ignored", method.name)
                self.data = None
            elif len(self.data) not in ((len(self.sources),) if needs.per_source else (1, len(self.sources))):
                raise RecipeError(
                    f"{len(self.data)} --data for {len(self.sources)} sources; give one dataset per source, "
                    f"in source order{'' if needs.per_source else ', or one for all'}"
                )
        # A method that needs data and has none is refused by :meth:`require_data`, once the sources are known:
        # if the method cannot merge their family, that is what the user needs to hear first.

        uses_seed = method.uses_seed or self.data is not None
        if self.seed is not None:
            if not uses_seed:
                raise RecipeError(f"method '{method.name}' draws no random numbers; drop --seed")
            if isinstance(self.seed, bool) or not str(self.seed).strip().isdigit():
                raise RecipeError(f"seed must be a non-negative integer, got {self.seed!r}")
            self.seed = int(str(self.seed).strip())
        elif uses_seed:
            self.seed = 0

    def require_data(self) -> None:
        """Raise :class:`RecipeError` if the method needs data and the recipe has none.

        :func:`~hfmerge.run.pipeline.plan_merge` calls it after the method has checked the sources, so that a
        method which cannot merge a family says so before asking for data it would not use.
        """
        from hfmerge.methods import get_method

        method = get_method(self.method)
        needs = method.data_needs(self.planning_parameters(), evaluating=bool(self.eval_data))
        if self.data is None and needs.required:
            raise RecipeError(
                f"method '{method.name}' needs data {needs.purpose}: add --data org/dataset[:split] "
                "(or a folder of images), "
                + ("once per source, in source order" if needs.per_source
                   else "once per source in source order or once for all")
            )

    @property
    def search_space(self) -> dict[str, tuple[Any, ...]]:
        """The parameters given as ``auto``, each with the grid the search chooses it from (none: no search)."""
        from hfmerge.methods import get_method

        return get_method(self.method).auto_parameters(self.parameters)

    def planning_parameters(self) -> dict[str, Any]:
        """The parameters, each ``auto`` one at its default: what a plan is shown with before the search."""
        from hfmerge.methods import get_method

        defaults = {p.name: p.default for p in get_method(self.method).parameters}
        return {name: defaults[name] if value == AUTO else value for name, value in self.parameters.items()}

    def anchor_index(self) -> int:
        """Index of the anchor among the sources (0 when none was named)."""
        if self.anchor is None:
            return 0
        hits = [i for i, s in enumerate(self.sources) if s.matches(self.anchor)]
        if not hits:
            names = ", ".join(s.ref for s in self.sources)
            raise RecipeError(f"anchor {self.anchor!r} is not one of the sources ({names}); name one of them")
        if len(hits) > 1:
            raise RecipeError(f"anchor {self.anchor!r} matches several sources; name it with its @revision")
        return hits[0]

    # -- output ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, omitting empty fields."""
        out: dict[str, Any] = {"method": self.method, "sources": []}
        for s in self.sources:
            entry: dict[str, Any] = {"model": s.model}
            if s.revision:
                entry["revision"] = s.revision
            if s.commit:
                entry["commit"] = s.commit
            if s.weight is not None:
                entry["weight"] = s.weight
            out["sources"].append(entry)
        for name in ("weights", "anchor", "base", "heads", "seed", "dtype", "output_format"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for name in ("data", "eval_data"):
            if getattr(self, name):
                out[name] = [spec.to_dict() for spec in getattr(self, name)]
        for name in ("prompts", "data_column", "label_column"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.allow_pickle:
            out["allow_pickle"] = True
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_data(value: Any) -> DataSpec:
    if isinstance(value, (str, dict, DataSpec)):
        return DataSpec.parse(value)
    raise RecipeError(f"{value!r} is not a dataset; write org/name[@revision][:split] or a folder")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"``, ``"200MiB"`` or an int."""
    if isinstance(size, int):
        if size <= 0:
            raise RecipeError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise RecipeError(f"max_shard_size {size!r} is not a size; write e.g. 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass
class PlannedMerge:
    """Everything decided before a tensor is read: what ``--dry-run`` shows."""

    recipe: Recipe
    method: MergeMethod
    sources: list[ResolvedSource]
    base: ResolvedSource | None
    context: MergeContext
    plan: MergePlan
    anchor_reason: str = ""
    stages: list[Stage] = field(default_factory=list)
    """The method's stages as they will run (:meth:`~hfmerge.methods.stages.Stage.resolve`), in order."""

    @property
    def anchor(self) -> ModelLayout:
        return self.context.anchor

    def pinned_recipe(self, data_pins: dict[int, Any] | None = None) -> Recipe:
        """The recipe with every Hub model pinned to the commit it resolved to, and each dataset to ``data_pins``.

        ``data_pins`` (from the run record) are, per source index, its data as a stage read it: a
        :class:`~hfmerge.data.spec.DataSpec` with the split named and a Hub dataset's commit pinned.

        Local folders are written as absolute paths, so ``hfmerge run
        hfmerge.yaml`` reproduces the merge from any folder of this machine,
        the saved output included.
        """
        specs = [replace(s.spec, model=str(s.path) if s.is_local else s.spec.model, commit=s.commit_sha)
                 for s in self.sources]
        anchor = specs[self.context.anchor_index].ref if self.recipe.anchor is not None else None
        base = self.recipe.base
        if self.base is not None:
            base = str(self.base.path) if self.base.is_local else f"{self.base.repo_id}@{self.base.commit_sha}"
        data = self.recipe.data
        if data and data_pins:
            per_source = len(data) == len(self.sources) and len(data) > 1
            pins = [data_pins.get(i if per_source else 0) for i in range(len(data))]
            data = [replace(spec, split=pin.split, commit=pin.commit or spec.commit) if pin is not None else spec
                    for spec, pin in zip(data, pins)]

        def absolute(specs: list[DataSpec] | None) -> list[DataSpec] | None:  # local data folders, like local models
            if not specs:
                return specs
            return [replace(spec, dataset=str(spec.path.resolve())) if spec.is_local and spec.path.exists() else spec
                    for spec in specs]

        parameters = dict(self.recipe.parameters)
        for role, layout in self.context.auxiliary.items():  # a gate network is pinned like the sources
            if role in parameters:
                source = layout.source
                parameters[role] = str(source.path) if source.is_local else f"{source.repo_id}@{source.commit_sha}"
        return replace(self.recipe, sources=specs, anchor=anchor, base=base, data=absolute(data),
                       eval_data=absolute(self.recipe.eval_data), parameters=parameters)

    def describe(self) -> str:
        """A human-readable plan: sources, then per group of tensors what happens to them."""
        lines = [f"method: {self.method.name} ({self.method.title})"]
        weights = self.context.normalised_weights()
        for i, (source, layout) in enumerate(zip(self.sources, self.context.sources)):
            anchored = self.method.uses_anchor or self.context.heads == "anchor"
            role = " [anchor]" if i == self.context.anchor_index and anchored else ""
            pin = f" @ {source.commit_sha[:12]}" if source.commit_sha else ""
            lines.append(
                f"source {i + 1}: {source.name}{pin} — {layout.family.name} {layout.architecture}, "
                f"{layout.family.labels_text(layout.id2label)}{f', weight {weights[i]:.4g}' if self.method.uses_weights else ''}{role}"
            )
        if self.method.uses_anchor:
            lines.append(f"anchor: {self.anchor.source.name} — {self.anchor_reason}")
        if self.base is not None:
            pin = f" @ {self.base.commit_sha[:12]}" if self.base.commit_sha else ""
            lines.append(f"base: {self.base.name}{pin}")
        for group, count, params in self.plan.summary():
            lines.append(f"  {group}: {count} tensors, {params:,} parameters")
        lines.extend(f"  {line}" for line in self.method.describe_plan(self.context, self.plan))
        if self.plan.output is not None:
            loads = ("loads with plain transformers" if self.plan.output.loads_with_transformers
                     else "loads with hfmerge.load, or with transformers and trust_remote_code=True")
            lines.append(f"  output model: {self.plan.output.architecture} ({loads})")
        if self.plan.details.get("heads") and self.anchor.head_tensors:  # a headless tower has no head policy
            lines.append(f"  heads: {self.plan.details['heads']}")
        if "num_labels" in self.plan.details:
            lines.append(f"  output labels: {self.plan.details['num_labels']}")
        lines.extend(self._data_stages())
        absent = self.anchor.absent
        if absent:
            lines.append(
                f"  not in the anchor's checkpoint, left absent (transformers initialises them on load): "
                f"{len(absent)} tensors, e.g. {absent[0]}"
            )
        return "\n".join(lines)

    def _data_stages(self) -> list[str]:
        """What the stages will do: for ``--dry-run``, which runs none of them."""
        lines = [line for stage in self.stages for line in stage.describe(self.context)]
        if self.method.data_needs(self.recipe.planning_parameters()).optional and not self.context.data:
            lines.append("post-train stage: none (no --data given)")
        space = self.recipe.search_space
        if space:
            from hfmerge.eval.search import describe_search

            lines.extend(describe_search(space, len(self.recipe.eval_data or [])))
        if self.recipe.eval_data:
            lines.append("evaluation: " + ", ".join(spec.ref for spec in self.recipe.eval_data))
        return lines
