"""What a method asks of the pipeline besides its plan, declared once as data: its stages.

A method answers :meth:`~hfmerge.methods.base.MergeMethod.stages` with the
ordered list of what it needs — facts read from the weights before it plans
(:class:`Analyse`), statistics of each source on its data
(:class:`Statistics`), tensors computed from the weights and statistics
before the merge (:class:`Derive`), training of the merged model after it
(:class:`FineTune`), other merges evaluated beside it (:class:`Compare`), or
a stage of its own (a subclass of :class:`Stage` with its own :meth:`~Stage.run`,
beside the method: gating's gate training). The pipeline
(:mod:`hfmerge.run.pipeline`) runs the list in one loop, each stage in its
:class:`Phase`, and keeps each result under the stage's name in the
:class:`RunRecord`; a stage whose result is a table of tensors is read by the
plan as ``(stage name, key)``.

Declaring is cheap and reads only the parameters (``ctx.params``,
``ctx.evaluating``): :meth:`MergeMethod.stages` is also asked, before any model
is downloaded, what data the method needs (:func:`data_needs`). What depends on
the models is given as a function of the context, which the stage calls once,
when the pipeline resolves it after planning (:meth:`Stage.resolve`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.data.load import ImageData
    from hfmerge.engine.ops import Loader
    from hfmerge.engine.plan import MergeContext
    from hfmerge.engine.statistics import StatisticsRequest
    from hfmerge.io.checkpoint import TensorTable


class Phase(IntEnum):
    """When a stage runs; the merge itself (writing the plan's tensors) comes between PREPARE and FINISH."""

    ANALYSE = 0
    """Before the plan: facts read from the sources' weights, which the plan finds in ``ctx.analysis``."""
    PREPARE = 1
    """After the plan, before the merge: tables the plan reads (statistics, a trained network, derived tensors)."""
    MERGE = 2
    """The pipeline's own: the plan's tensors written to a folder (:func:`hfmerge.run.materialise.materialise`)."""
    FINISH = 3
    """After the merge is written: work on the written model (fine-tuning it)."""
    EVALUATE = 4
    """With ``--eval-data``: the pipeline's evaluation of the merge, then more rows of it (the paper's comparisons)."""


@dataclass(frozen=True)
class DataNeed:
    """What a stage does with ``--data``: for the recipe's checks and ``hfmerge methods``."""

    required: bool
    """Without data the method cannot run; otherwise the stage is skipped when no data is given."""
    purpose: str = "to compute its statistics"
    """What the data is for, in the message that asks for it."""
    per_source: bool = False
    """Each source needs its own dataset: one dataset for all is refused."""
    labeled: bool = False
    """The data must have labels."""
    when: str = "optional"
    """For optional data: which parameter values make use of it, as ``hfmerge methods`` says it."""


@dataclass(frozen=True)
class DataNeeds:
    """What a method's stages, taken together, need of ``--data``."""

    required: bool = False
    optional: bool = False
    per_source: bool = False
    purpose: str = "to compute its statistics"
    when: str = "optional"

    @property
    def any(self) -> bool:
        return self.required or self.optional


def data_needs(stages: Sequence[Stage]) -> DataNeeds:
    """The data needs of ``stages``: required if one stage requires data, else optional if one reads it."""
    needs = [n for n in (stage.data_need() for stage in stages) if n is not None]
    required = [n for n in needs if n.required]
    optional = [n for n in needs if not n.required]
    return DataNeeds(
        required=bool(required), optional=bool(optional) and not required,
        per_source=any(n.per_source for n in needs),
        purpose=(required or needs or [DataNeed(False)])[0].purpose,
        when=(optional or [DataNeed(False)])[0].when,
    )


@dataclass
class RunRecord:
    """What the stages of one merge learned while it ran, by stage name; the plan itself never changes.

    The card reads ``details`` beside the plan's (:meth:`card_details`), ``hfmerge.yaml`` pins the
    datasets in ``data_pins``, the output folder gains ``files``.
    """

    results: dict[str, Any] = field(default_factory=dict)
    """Each stage's result under its name."""
    details: dict[str, Any] = field(default_factory=dict)
    """Facts for the card that a stage learned (the gate's accuracy, how many images the statistics read)."""
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files for the output folder that a stage made (pictures the card shows)."""
    data_pins: dict[int, Any] = field(default_factory=dict)
    """Per source index, its data as a stage read it: a :class:`~hfmerge.data.spec.DataSpec` with the split
    named and a Hub dataset's commit pinned."""
    data_uses: list[Any] = field(default_factory=list)
    """Each source's data as the statistics stage read it (:class:`~hfmerge.run.stages.DataUse`), for the card."""
    tables: dict[str, TensorTable] = field(default_factory=dict)
    """Tables of tensors the stages made, by name, which the plan's references read."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Each stage's running time."""

    def card_details(self, plan_details: dict[str, Any]) -> dict[str, Any]:
        """The plan's details with what the stages learned: what the card's templates read as ``details``."""
        return {**plan_details, **self.details}


class StageRun(Protocol):
    """What a running stage may use: the context, the data, the models, the training devices, the record.

    The pipeline provides it (:class:`hfmerge.run.stages.PipelineRun`); a stage of a method's own reads
    its sources' data and models through it, so that caching, pinning and distribution stay the pipeline's.
    """

    context: MergeContext
    record: RunRecord
    accelerator: Any
    progress: bool
    seed: int

    def source_data(self, index: int, *, samples: int | None, labeled: bool) -> ImageData:
        """Source ``index``'s data, ``samples`` of it (all: ``None``), pinned in the record."""

    def source_model(self, layout: ModelLayout, device: torch.device | str = "cpu") -> torch.nn.Module:
        """A model (a source, an auxiliary model) in float32 and eval mode."""

    def source_processor(self, layout: ModelLayout) -> Any:
        """A model's own image processor."""

    def load(self, ref: tuple[int | str, str]) -> torch.Tensor:
        """A tensor of any table: a model (by index) or a stage's table (by name)."""


class Stage:
    """A step of a merge besides the plan: a method declares it, the pipeline runs it in its :attr:`phase`.

    A subclass names its result (:attr:`name`, the key of the run record and of its table) and its phase.
    Built-in stages are run by :mod:`hfmerge.run.stages`; a method's own stage type implements :meth:`run`.
    """

    name: ClassVar[str]
    phase: ClassVar[Phase]
    all_processes: ClassVar[bool] = False
    """Under ``accelerate launch``, every process runs it (data and training); otherwise the main process only."""

    def data_need(self) -> DataNeed | None:
        """What the stage does with ``--data``; ``None``: it reads none."""
        return None

    def resolve(self, ctx: MergeContext) -> Stage | None:
        """The stage as it will run for ``ctx`` (after planning), or ``None`` when it has nothing to do."""
        return self

    def image_processors(self, ctx: MergeContext) -> list[ModelLayout]:
        """The models whose own image processors the resolved stage feeds images through.

        The pipeline refuses, before any stage runs, a model in this list that has no image processor, rather
        than let the stage fail halfway through the merge. A stage that reads ``--data`` reads each source's
        images through that source's processor (:meth:`StageRun.source_processor`); one that reads them
        otherwise says so here.
        """
        return list(ctx.sources) if self.data_need() is not None else []

    def describe(self, ctx: MergeContext) -> list[str]:
        """What ``--dry-run`` says the stage will do (each line unindented)."""
        return []

    def run(self, run: StageRun) -> Any:
        """Run the stage; the result is recorded under :attr:`name`. Built-in stages leave this to the pipeline."""
        raise NotImplementedError(f"the stage {type(self).__name__} does not say how it runs")


def _data_given(ctx: MergeContext) -> bool:
    return bool(ctx.data)


@dataclass(frozen=True)
class Analyse(Stage):
    """Facts read from the sources' weights before planning (gating's weight similarity, Eq. 4).

    ``analyse`` must stream tensors (memory flat in the number of sources); its result is ``ctx.analysis``
    when the method plans. :func:`hfmerge.run.pipeline.plan_merge` runs it, before the plan (the only
    stage that runs there); a dry run over Hub sources, whose weights are not downloaded, skips it.
    """

    analyse: Callable[[MergeContext], dict[str, Any]]
    name: ClassVar[str] = "analyse"
    phase: ClassVar[Phase] = Phase.ANALYSE


@dataclass(frozen=True)
class Statistics(Stage):
    """Statistics of each source on its own data (Gram matrices, Fisher, activations), before the merge.

    ``request(ctx, i)`` says what to collect on source ``i`` (``None``: nothing, and when no source needs
    anything the stage does not run). Each source's statistics are a table ``statistics/<i>``
    (:meth:`~hfmerge.engine.plan.MergeContext.statistics_index`).
    """

    request: Callable[[MergeContext, int], StatisticsRequest | None]
    samples: int | None = None
    """Images of each source's data to read (``None``: all)."""
    batch_size: int = 32
    labeled: bool = False
    """The data must have labels (true-label Fisher, or a later fine-tuning on the same data)."""
    cache: bool = True
    """Read and write the statistics cache (``$HF_HOME/hfmerge/statistics``); off: held in memory, nothing written."""
    need: DataNeed = DataNeed(required=True)
    requests: tuple[StatisticsRequest | None, ...] = ()
    """Filled by :meth:`resolve`: each source's request."""
    name: ClassVar[str] = "statistics"
    phase: ClassVar[Phase] = Phase.PREPARE
    all_processes: ClassVar[bool] = True

    def data_need(self) -> DataNeed:
        return dataclasses.replace(self.need, labeled=self.labeled)

    def resolve(self, ctx: MergeContext) -> Statistics | None:
        if not _data_given(ctx):
            return None
        requests = tuple(self.request(ctx, i) for i in range(len(ctx.sources)))
        return dataclasses.replace(self, requests=requests) if any(r is not None for r in requests) else None

    def describe(self, ctx: MergeContext) -> list[str]:
        request = self.requests[ctx.anchor_index] or next(r for r in self.requests if r is not None)
        wanted = [f"Gram matrices of {len(request.grams)} linear inputs" if request.grams else "",
                  f"diagonal Fisher of {len(request.fisher)} parameters "
                  f"({'true labels' if request.fisher_labels == 'empirical' else 'labels sampled from the model'})"
                  if request.fisher else "",
                  f"activations of {len(request.activations)} modules" if request.activations else ""]
        lines = [f"statistics stage: {'; '.join(w for w in wanted if w)}, "
                 f"on {self.samples if self.samples else 'all'} images of each source's data"
                 f"{'' if self.cache else ' (not cached)'}:"]
        lines.extend(f"  {layout.source.name} ← {spec.ref}" for layout, spec in zip(ctx.sources, ctx.data or []))
        return lines


@dataclass
class Derived:
    """What a derive stage computed: tensors the plan reads, facts for the card, files for the output folder."""

    tensors: dict[str, Any]
    details: dict[str, Any]
    files: dict[str, str | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Derive(Stage):
    """Tensors computed from the weights and statistics after the data stages, before the merge.

    ``derive(ctx, load)`` reads any table (the models, then the statistics) through ``load``; its
    tensors are the table ``derive`` (OTFusion's transport maps, computed once per neuron group and read
    by every tensor of the group). The main process runs it; a dry run never does. ``None``: nothing.
    """

    derive: Callable[[MergeContext, Loader], Derived | None]
    name: ClassVar[str] = "derive"
    phase: ClassVar[Phase] = Phase.PREPARE


@dataclass(frozen=True)
class FineTuning:
    """The training a :class:`FineTune` stage does to the merged model.

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
class FineTune(Stage):
    """Training of the merged model on the sources' labeled data, after the merge is written.

    ``tuning(ctx)`` says how (``None``: no training); the stage runs only when data is given.
    """

    tuning: Callable[[MergeContext], FineTuning | None]
    need: DataNeed = DataNeed(required=False, purpose="to fine-tune the merged model", labeled=True)
    request: FineTuning | None = None
    """Filled by :meth:`resolve`."""
    name: ClassVar[str] = "finetuning"
    phase: ClassVar[Phase] = Phase.FINISH
    all_processes: ClassVar[bool] = True

    def data_need(self) -> DataNeed:
        return self.need

    def resolve(self, ctx: MergeContext) -> FineTune | None:
        request = self.tuning(ctx) if _data_given(ctx) else None
        return dataclasses.replace(self, request=request) if request is not None else None

    def describe(self, ctx: MergeContext) -> list[str]:
        tuning = self.request
        assert tuning is not None
        return [f"post-train stage: fine-tune for at most {tuning.epochs} epochs (patience {tuning.patience}) "
                f"on {tuning.samples or 'all'} labeled images of each source's data: "
                + ", ".join(spec.ref for spec in dict.fromkeys(ctx.data or []))]


@dataclass(frozen=True)
class Comparison:
    """Another merge of the same sources that the evaluation shows beside this one (a paper's comparison rows).

    ``parameters`` replace the merge's own; the plan is made again with them and materialised from the same
    sources and tables.

    ``task_given``: each task's images go through the classifier (and gated layers) of the source of
    that task, as the paper's baselines select the classifier by hand; the i-th evaluation dataset is
    the i-th source's task.
    """

    name: str
    parameters: dict[str, Any]
    task_given: bool = False


@dataclass(frozen=True)
class Compare(Stage):
    """Other merges of the same sources evaluated beside this one (``--eval-data``): ``rows(ctx)``."""

    rows: Callable[[MergeContext], list[Comparison]]
    told: Callable[[torch.nn.Module, int], torch.nn.Module] | None = None
    """For ``task_given`` rows: the merged model told that its input is task ``i`` (gating's gate bypassed)."""
    comparisons: tuple[Comparison, ...] = ()
    """Filled by :meth:`resolve`."""
    name: ClassVar[str] = "compare"
    phase: ClassVar[Phase] = Phase.EVALUATE

    def resolve(self, ctx: MergeContext) -> Compare | None:
        if not ctx.evaluating:
            return None
        rows = tuple(self.rows(ctx))
        return dataclasses.replace(self, comparisons=rows) if rows else None
