"""EMR-Merging: elect one unified task vector, keep a mask and a rescaler per task (Huang et al., NeurIPS 2024).

With task vectors τ_i = θ_i − θ_base (i = 1..N), §3 of the paper:

- Elect (§3.1): per entry, the sign γ_uni = sgn(Σ_i τ_i) and the magnitude
  ε_uni = max |τ_i| over the i whose τ_i has that sign; τ_uni = γ_uni ⊙ ε_uni.
- Mask (§3.2): M_i = (τ_i ⊙ τ_uni > 0), the entries where task i agrees with τ_uni.
- Rescale (§3.3): λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|, one scalar per task, so that the
  masked unified vector has task i's average magnitude.

Task i's model is θ_base + λ_i · (M_i ⊙ τ_uni). The merge is not one model but
a repository holding θ_base, τ_uni, the N bit-packed masks and the N rescalers
(:mod:`hfmerge.methods.emr.emr_model`), about 2 + N/32 models' worth of float32
instead of N.

Choices, and where they come from:

- The rescalers' sums run over the whole model, one λ_i per task. The official
  code (``merge_vit/src/main_emr_merging.py``, ``merge_lm/.../merging_methods.py``,
  and FusionBench's ``emr_merging/utils.py``) sums each tensor's *mean*
  magnitude, Σ_tensors mean|τ_i| / Σ_tensors mean|M_i ⊙ τ_uni|, which weighs
  every tensor alike; the paper's formula sums every entry. ``rescaling``
  chooses: ``tensor_means`` (``main_emr_merging.py``'s, which gave the paper's
  results; the default) or ``entries`` (the formula as printed, which the
  official ``main_emr_30_vits.py`` also computes, taking one mean over the
  flattened model).
- Where Σ_i τ_i is exactly zero the code elects the negative sign (its
  ``flag = (sum > 0)·2 − 1``); the paper's sgn(0) = 0 would elect nothing. We
  follow the code. Continuous weights practically never tie; where every τ_i
  is zero both give τ_uni = 0.
- λ_i = 1 when M_i ⊙ τ_uni is zero everywhere (the code divides by zero): task
  i's model is then θ_base whatever λ_i is.
- Every floating tensor that the base has, outside the classifier heads, is a
  task vector (weights, biases, norms, embeddings), as the official code
  merges all of a model's parameters. Each task keeps its own classifier head
  (the paper evaluates each task with its own head), its own BatchNorm running
  statistics (they describe its own activations and are no task vector; kept
  per task they cost a few numbers) and integer buffers, and any tensor the
  base lacks outside the backbone (a decode head). ``--heads`` does not apply.

With ``--param gate=...`` and ``--data`` (one unlabeled dataset per source), the
repository also serves images with no task id, which the paper does not: the
gating merge's gate (Ye et al. 2023, §3.2: a MobileNetV2 image classifier given
one output per source, trained on at most ``gate_fraction`` of each source's data
to say which source an image comes from; the rest measures it) is trained and
stored, and the model sends each image to the task of the gate's argmax. As the
gated merge does with its classifier of argmax p (its Eq. 3), the output is
logits over the union of the tasks' labels: the chosen task's at its own labels,
−inf elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.methods.gating.method import DEFAULT_GATE, GATE_TRAINING
from hfmerge.methods.stages import DataNeed, Derive, Derived, Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from hfmerge.adapters.layout import ModelLayout, TensorInfo
    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan, OutputSpec

RESCALINGS = ("tensor_means", "entries")
NO_GATE = "none"
GATE_ONLY = ("gate_fraction", "gate_epochs", "gate_learning_rate", "batch_size")
"""The parameters that act only with a gate."""
GATE_DATA_PURPOSE = "to train its gate, which learns which source's data an image comes from"


@dataclass
class Election:
    """τ_uni of one tensor, the N masks M_i (booleans, shape (N, *shape)) and the sums the rescalers need.

    ``task_magnitude[i]`` is Σ|τ_i| and ``masked_magnitude[i]`` Σ|M_i ⊙ τ_uni| over this tensor's entries
    (float64).
    """

    unified: torch.Tensor
    masks: torch.Tensor
    task_magnitude: torch.Tensor
    masked_magnitude: torch.Tensor


def elect(task_vector: Callable[[int], torch.Tensor], count: int) -> Election:
    """Elect τ_uni and the masks of one tensor from its ``count`` task vectors (§3.1-3.2), two passes over them.

    ``task_vector(i)`` gives τ_i in float32; only the running sum, the running maximum
    and the N boolean masks are held, never N task vectors.
    """
    import torch

    first = task_vector(0)
    total = first.clone()
    for i in range(1, count):
        total.add_(task_vector(i))
    positive = total > 0  # γ_uni: +1 where Σ τ_i > 0, −1 elsewhere (the official code's flag)
    del total
    masks = torch.empty((count, *first.shape), dtype=torch.bool)
    magnitude = torch.zeros_like(first)
    task_magnitude = torch.zeros(count, dtype=torch.float64)
    for i in range(count):
        tau = first if i == 0 else task_vector(i)
        masks[i] = torch.where(positive, tau > 0, tau < 0)  # sgn(τ_i) = γ_uni: M_i = (τ_i ⊙ τ_uni > 0)
        magnitude = torch.maximum(magnitude, torch.where(masks[i], tau.abs(), 0.0))  # ε_uni
        task_magnitude[i] = tau.abs().sum(dtype=torch.float64)
    unified = torch.where(positive, magnitude, -magnitude)
    masked_magnitude = torch.stack([torch.where(masks[i], magnitude, 0.0).sum(dtype=torch.float64)
                                    for i in range(count)])
    return Election(unified, masks, task_magnitude, masked_magnitude)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, *shape) booleans -> (N, ⌈numel/8⌉) ``uint8``: each row flattened, eight entries a byte, most significant
    bit first (``numpy.packbits``' order), zero-padded; :func:`~hfmerge.methods.emr.emr_model.unpack_mask` undoes it."""
    import torch

    rows = masks.reshape(masks.shape[0], -1).to(torch.uint8)
    rows = torch.nn.functional.pad(rows, (0, (-rows.shape[1]) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (rows.view(rows.shape[0], -1, 8) * weights).sum(dim=-1).to(torch.uint8)


def rescalers(task_magnitude: torch.Tensor, masked_magnitude: torch.Tensor) -> torch.Tensor:
    """λ_i = task_magnitude[i] / masked_magnitude[i] (§3.3); 1 where the masked unified vector is zero."""
    import torch

    return torch.where(masked_magnitude > 0, task_magnitude / masked_magnitude.clamp(min=1e-300), 1.0)


@dataclass(frozen=True)
class UnifiedTaskVector:
    """τ_uni of one tensor (§3.1), from the sources' and the base's tensors."""

    base: TensorRef
    sources: tuple[TensorRef, ...]
    group: str = "unified task vector τ_uni (elected)"

    def apply(self, load: Loader) -> torch.Tensor:
        return elect(_task_vectors(load, self.base, self.sources), len(self.sources)).unified


@dataclass(frozen=True)
class PackedTaskMasks:
    """The N masks M_i of one tensor (§3.2), bit-packed: (N, ⌈numel/8⌉) ``uint8``."""

    base: TensorRef
    sources: tuple[TensorRef, ...]
    group: str = "task masks M_i (1 bit per entry and task)"

    def apply(self, load: Loader) -> torch.Tensor:
        return pack_masks(elect(_task_vectors(load, self.base, self.sources), len(self.sources)).masks)


def _task_vectors(load: Loader, base_ref: TensorRef, sources: tuple[TensorRef, ...]) -> Callable[[int], torch.Tensor]:
    import torch

    base = load(base_ref).to(torch.float32)
    return lambda i: load(sources[i]).to(torch.float32) - base


@dataclass(frozen=True)
class Roles:
    """What becomes of each anchor tensor: a task vector (its base reference), or each task's own."""

    task_vectors: dict[str, TensorRef]
    """In-memory name -> the base's tensor, in forward order."""
    own: list[str]
    """In-memory names each task keeps of its own source."""


@register_method
class Emr(MergeMethod):
    """EMR-Merging (Huang et al., NeurIPS 2024, §3): τ_uni, M_i, λ_i; task i is θ_base + λ_i (M_i ⊙ τ_uni)."""

    name = "emr"
    title = "EMR-Merging (elect a unified task vector; a mask and a rescaler per task)"
    reference = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024"
    reference_url = "https://arxiv.org/abs/2405.17461"
    parameters = (
        ParamSpec("rescaling", str, "tensor_means",
                  "how λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| sums over the model: tensor_means adds each tensor's mean "
                  "magnitude (the official code's, which gave the paper's results: the default), entries adds "
                  "every entry (§3.3 as printed)", choices=RESCALINGS),
        ParamSpec("gate", str, NO_GATE,
                  "a gate that picks each image's task, so that the repository serves images with no task id: a "
                  f"MobileNetV2 image classifier (repo id or folder; `default`: gating's, {DEFAULT_GATE}), trained "
                  "on --data (one unlabeled dataset per source) as the gating merge trains its gate; none: no "
                  "gate, task= is required"),
        *GATE_TRAINING,
        ParamSpec("batch_size", int, 32, "images per batch of the gate's training", minimum=1),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "Each task vector τᵢ = θᵢ − θ_base{% if base %} (θ_base: `{{ base.name }}`){% endif %} is replaced by one "
        "unified task vector and, per task, a mask and a rescaler (§3 of the paper). Elect: per entry, the sign "
        "γ = sgn(Σᵢ τᵢ) (the negative sign where the sum is exactly 0, as the official code) and the largest |τᵢ| "
        "among the τᵢ of that sign, τ_uni = γ · max; mask: Mᵢ = (τᵢ ⊙ τ_uni > 0); rescale: λᵢ = Σ|τᵢ| / "
        "Σ|Mᵢ ⊙ τ_uni|, summed over the whole model "
        "{{ 'as the mean magnitude of each tensor, added up (the official code)' if details.rescaling == "
        "'tensor_means' else 'entry by entry (the formula as printed)' }}. "
        "Task i's model is θ_base + λᵢ · (Mᵢ ⊙ τ_uni)"
        "{% if details.rescalers %}, with {% for name, value in details.rescalers %}λ = {{ '%.4f' | format(value) }} "
        "for `{{ name }}`{{ ', ' if not loop.last }}{% endfor %}{% endif %}. "
        "Every floating tensor the base has, outside the classifier heads, is a task vector "
        "({{ details.task_vector_tensors }} tensors). Each task keeps its own "
        "{{ details.own | join(', ') if details.own else 'nothing else' }}. "
        "This repository holds θ_base, τ_uni, the masks packed eight entries a byte, the rescalers and each task's "
        "own tensors: {{ '%.1f' | format(details.size.ratio * 100) }}% of the "
        "{{ sources | length }} source models' size ({{ '{:,}'.format(details.size.stored_bytes) }} bytes "
        "against {{ '{:,}'.format(details.size.sources_bytes) }}{% if details.size.get('gate_bytes') %}; the gate's "
        "{{ '{:,}'.format(details.size.gate_bytes) }} bytes included{% endif %}). "
        "Load a task's model with `hfmerge.load(repo, task=...)` (a source's name as listed below, or its index: "
        "{% for name in details.tasks %}{{ loop.index0 }} = `{{ name }}`{{ ', ' if not loop.last }}{% endfor %}), "
        "an ordinary `{{ details.source_architecture }}`; or, without hfmerge, with `trust_remote_code=True`, a model "
        "whose forward takes `task=`."
        "{% set gate = details.get('gate') %}{% if gate %} A gate network (`{{ gate.name }}`, a MobileNetV2 given a "
        "new head of {{ sources | length }} outputs, trained as the gating merge trains its gate: to say which "
        "source's data an image comes from"
        "{% if gate.trained %}, on {{ gate.train_images | sum }} images ({{ gate.train_images | join(', ') }} per "
        "source), for {{ gate.epochs_run }} epochs; on the {{ gate.held_out | sum }} held-out images it picks the "
        "right source for {{ '%.2f' | format(gate.accuracy * 100) }}% "
        "({% for name, acc in gate.per_source %}{{ name }}: {{ '%.2f' | format(acc * 100) }}%"
        "{{ ', ' if not loop.last }}{% endfor %}){% endif %}) serves images with no task id: `hfmerge.load(repo)` "
        "with no task, or the remote-code model called without `task=`, sends each image to the task of the gate's "
        "argmax (per image: a batch may mix tasks) and returns logits over the union of the tasks' "
        "{{ details.num_labels }} labels, as the gated merge does: the chosen task's logits at its own labels, −inf "
        "at the others, so that each image's argmax, read with `id2label`, is the chosen task's predicted label "
        "(named `<task>/<label>` where tasks share a label name); `out.task` is the chosen task and "
        "`out.gate_probs` the gate's probabilities.{% endif %}"
        "{% if details.get('evaluated_per_task') %} In the evaluation below, each task is scored by its own model "
        "(θ_base + λᵢ · (Mᵢ ⊙ τ_uni) with its own head), the i-th evaluation dataset being the i-th source's task"
        "{% if gate %}; the row `… · the gate's choice` is the same repository given no task id, each image sent "
        "to the task the gate picks{% endif %}; the sources are scored on every task whose labels they have."
        "{% endif %}"
    )

    def auxiliary_models(self, parameters: dict[str, Any]) -> dict[str, str]:
        gate = gate_reference(parameters)
        return {"gate": gate} if gate is not None else {}

    def check_sources(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> None:
        """With a gate, image classifiers only (the gate picks one task's classifier); any family without. Sources
        with tensors no merge combines (a ``CLIPModel``'s text tower) are refused: EMR's repository rebuilds each task
        from the base, its task vectors and the task's own tensors, and has no place for them."""
        carried = next((layout for layout in layouts if layout.carried), None)
        if carried is not None:
            example = next(iter(carried.carried))
            raise IncompatibleModelsError(
                f"emr: {carried.source.name} ({carried.architecture}) holds tensors that are never merged (e.g. "
                f"{example}), which EMR's per-task repository cannot carry: merge the image encoders "
                f"({', '.join(a for a in carried.family.architectures if a != carried.architecture)})"
            )
        if gate_reference(parameters) is not None:
            _check_gated_tasks(layouts)

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """The rescalers (§3.3) sum over the whole model: a pass over every task vector before the merge; with a
        gate, the gating merge's gate training."""
        from hfmerge.methods.gating.training import TrainGate

        stages: list[Stage] = [Derive(self._derive)]
        if gate_reference(ctx.params) is not None:
            stages.append(TrainGate(
                gate="gate", fraction=float(ctx.params.get("gate_fraction", 0.15)),
                epochs=int(ctx.params.get("gate_epochs", 5)),
                learning_rate=float(ctx.params.get("gate_learning_rate", 1e-3)),
                batch_size=int(ctx.params.get("batch_size", 32)),
                need=DataNeed(required=True, purpose=GATE_DATA_PURPOSE, per_source=True), feed=_gate_input,
            ))
        return stages

    # -- the plan ----------------------------------------------------------------------------
    def roles(self, ctx: MergeContext) -> Roles:
        """Which anchor tensors are task vectors (paired with the base's) and which each task keeps.

        Raises:
            RecipeError: no base model.
            IncompatibleModelsError: the base lacks a backbone tensor, or the sources differ outside their heads.
        """
        from hfmerge.engine.plan import require_all_shared
        from hfmerge.methods.task_vectors import base_refs, is_running_statistic, require_base_backbone

        if ctx.base is None:
            raise RecipeError(f"method '{self.name}' needs the pre-trained model: add --base org/name")
        if "gate" in ctx.auxiliary:
            _check_gate(ctx)
        else:
            idle = [p.name for p in self.parameters
                    if p.name in GATE_ONLY and ctx.params.get(p.name, p.default) != p.default]
            if idle:
                raise RecipeError(f"{', '.join(idle)} set how the gate trains, and there is no gate: add --param "
                                  "gate=default (or a MobileNetV2 classifier) with one --data per source, or leave "
                                  "them out")
        refs, _ = base_refs(ctx, ctx.base)
        require_base_backbone(ctx, refs)
        anchor = ctx.anchor
        own_shape = [name for name, info in anchor.tensors.items() if info.head is not None or name not in refs]
        require_all_shared(ctx, self.name, except_names=own_shape)
        task_vectors: dict[str, TensorRef] = {}
        own: list[str] = []
        for name, info in anchor.tensors.items():
            if info.head is not None or name not in refs or info.is_integer or is_running_statistic(name):
                own.append(name)
            else:
                task_vectors[name] = refs[name]
        return Roles(task_vectors, own)

    def plan(self, ctx: MergeContext) -> MergePlan:
        import math

        import torch

        from hfmerge.engine.ops import Copy
        from hfmerge.engine.plan import MergePlan, TensorPlan

        roles = self.roles(ctx)
        anchor, n = ctx.anchor, len(ctx.sources)
        entries: list[TensorPlan] = []
        for name, base in roles.task_vectors.items():
            info = anchor.tensors[name]
            sources = ctx.refs(name)
            entries += [
                TensorPlan(f"base.{info.key}", f"base.{info.key}", info.shape, info.dtype,
                           Copy(base, group="base model θ_base")),
                TensorPlan(f"unified.{info.key}", f"unified.{info.key}", info.shape, info.dtype,
                           UnifiedTaskVector(base, sources)),
                TensorPlan(f"masks.{info.key}", f"masks.{info.key}", (n, (math.prod(info.shape) + 7) // 8),
                           torch.uint8, PackedTaskMasks(base, sources)),
            ]
        for i, layout in enumerate(ctx.sources):
            for name in roles.own:
                key, info = anchor.tensors[name].key, layout.tensors[name]
                entries.append(TensorPlan(f"tasks.{i}.{key}", f"tasks.{i}.{key}", info.shape, info.dtype,
                                          Copy((i, info.key), group=_own_group(info))))
        entries.append(TensorPlan("rescalers", "rescalers", (n,), torch.float32,
                                  Copy(("derive", "rescalers"), group="rescalers λ_i (one per task)")))
        gate = ctx.auxiliary.get("gate")
        for info in gate.tensors.values() if gate is not None else ():
            shape = (n, *info.shape[1:]) if info.head is not None else info.shape  # its new head: one output a task
            entries.append(TensorPlan(f"gate.{info.key}", f"gate.{info.name}", shape, info.dtype,
                                      Copy(("gate", info.key), group="gate network (trained)")))
        output = self._output(ctx, roles)
        stored = sum(math.prod(t.shape) * t.dtype.itemsize for t in entries)
        sources_bytes = sum(_model_bytes(layout) for layout in ctx.sources)
        details: dict[str, Any] = {
            "rescaling": ctx.params.get("rescaling", "tensor_means"),
            "tasks": output.config.tasks,
            "task_vector_tensors": len(roles.task_vectors),
            "own": _own_kinds(anchor.tensors[name] for name in roles.own),
            "size": {"stored_bytes": stored, "sources_bytes": sources_bytes, "ratio": stored / sources_bytes},
            "source_architecture": anchor.architecture,
            "num_labels": len(output.config.id2label),
        }
        if gate is not None:
            details["gate"] = {"name": gate.source.name, "trained": False}
            details["size"]["gate_bytes"] = sum(math.prod(t.shape) * t.dtype.itemsize for t in entries
                                                if t.key.startswith("gate."))
        return MergePlan(entries, details=details, output=output)

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        d = plan.details
        gate = (f"; the gate {d['gate']['name']} picks the task of an image given with no task id"
                if "gate" in d else "")
        return [f"{d['task_vector_tensors']} task-vector tensors: θ_base, τ_uni and {len(ctx.sources)} bit-packed "
                f"masks each; each task keeps its own {', '.join(d['own']) or 'nothing else'}; "
                f"rescalers ({d['rescaling']}) from a pass over the task vectors before the merge; the repository is "
                f"{d['size']['ratio']:.1%} of the sources' size{gate}"]

    def _derive(self, ctx: MergeContext, load: Loader) -> Derived:
        """λ_i (§3.3) from one streamed pass over every task-vector tensor."""
        import torch

        roles = self.roles(ctx)
        n = len(ctx.sources)
        task_magnitude = torch.zeros(n, dtype=torch.float64)
        masked_magnitude = torch.zeros(n, dtype=torch.float64)
        per_entry = ctx.params.get("rescaling", "tensor_means") == "entries"
        for name, base in roles.task_vectors.items():
            election = elect(_task_vectors(load, base, ctx.refs(name)), n)
            count = 1 if per_entry else election.unified.numel()
            task_magnitude += election.task_magnitude / count
            masked_magnitude += election.masked_magnitude / count
        values = rescalers(task_magnitude, masked_magnitude)
        names = task_names(ctx)
        return Derived({"rescalers": values.to(torch.float32)},
                       {"rescalers": [(name, float(v)) for name, v in zip(names, values)]})

    def _output(self, ctx: MergeContext, roles: Roles) -> OutputSpec:
        """The EMR repository's config (``auto_map`` to its modeling file) and the modeling file itself."""
        import json

        from hfmerge.engine.plan import OutputSpec
        from hfmerge.methods.emr.model import AUTO_MAP, MODELING_FILE, EmrMergedConfig, EmrMergedModel, modeling_source
        from hfmerge.methods.heads import union_labels

        anchor = ctx.anchor
        source = {k: v for k, v in anchor.config.to_dict().items()
                  if not k.startswith("_") and k not in ("id2label", "label2id", "auto_map")}
        source["architectures"] = [anchor.architecture]
        labels = union_labels(ctx.sources)  # every task's labels, told apart where they clash: the gate's output
        config = EmrMergedConfig(
            source=source, tasks=task_names(ctx), task_labels=[layout.id2label for layout in ctx.sources],
            unified={anchor.tensors[name].key: list(anchor.tensors[name].shape) for name in roles.task_vectors},
            task_tensors=[{anchor.tensors[name].key: list(layout.tensors[name].shape) for name in roles.own}
                          for layout in ctx.sources],
            integer_tensors=[anchor.tensors[name].key for name in roles.own if anchor.tensors[name].is_integer],
            rescaling=str(ctx.params.get("rescaling", "tensor_means")),
            architectures=[EmrMergedModel.__name__],
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            **_gate_config(ctx),
        )
        config.auto_map = dict(AUTO_MAP)
        return OutputSpec(config=config, architecture=EmrMergedModel.__name__, task=anchor.task,
                          files={MODELING_FILE: modeling_source()}, loads_with_transformers=False,
                          auto_class="AutoModel", task_argument=f"task={json.dumps(config.tasks[0])}")


def gate_reference(parameters: dict[str, Any]) -> str | None:
    """The gate's repo id or folder (``default``: gating's, :data:`DEFAULT_GATE`), or ``None`` for no gate."""
    value = str(parameters.get("gate") or NO_GATE).strip()
    if value.lower() == NO_GATE:
        return None
    return DEFAULT_GATE if value.lower() == "default" else value


def _gate_input(gate: Any, config: Any) -> Any:
    """The gate wrapped for its training, fed as the EMR model feeds it (imported when the stage runs)."""
    from hfmerge.methods.emr.model import EmrGateInput

    return EmrGateInput(gate, config)


def _check_gated_tasks(layouts: list[ModelLayout]) -> None:
    """Image classifiers: the gate sends each image to one task's classifier.

    Raises:
        RecipeError: a source of another task, and how to merge it without a gate.
    """
    for layout in layouts:
        if layout.task != "image-classification":
            raise RecipeError(f"the gate sends each image to one task's classifier, and {layout.source.name} is a "
                              f"{layout.architecture}: leave out --param gate for an EMR merge of these models")


def _check_gate(ctx: MergeContext) -> None:
    """Image classifiers, two tasks at least, a different dataset per source, a MobileNetV2 gate; else one line.

    Raises:
        RecipeError: what is wrong, and how to merge without a gate.
    """
    from hfmerge.adapters.base import registered_families

    _check_gated_tasks(ctx.sources)
    if len(ctx.sources) < 2:
        raise RecipeError("the gate chooses among the tasks, and there is one: merge two sources at least, or leave "
                          "out --param gate")
    refs = [spec.ref for spec in ctx.data or []]
    if len(refs) != len(ctx.sources) or len(set(refs)) < len(refs):
        raise RecipeError("the gate learns to tell the sources' data apart: give one different --data per source, in "
                          f"source order ({len(ctx.sources)} sources)")
    gate = ctx.auxiliary["gate"]
    if gate.architecture != gate.family.gating_gate:
        gates = ", ".join(a.gating_gate for a in registered_families() if a.gating_gate)
        raise RecipeError(f"the gate must be a MobileNetV2 image classifier ({gates}), e.g. {DEFAULT_GATE}, as the "
                          f"gating merge's; {gate.source.name} is a {gate.family.name} {gate.architecture}")


def _gate_config(ctx: MergeContext) -> dict[str, Any]:
    """The config fields of a merge with a gate (:class:`~hfmerge.methods.emr.emr_model.EmrMergedConfig`): the gate's
    config with one output per task, each task's place in the union labels, both processors' numbers; none without."""
    from hfmerge.methods.gating.method import portable_config, processor_facts
    from hfmerge.methods.heads import source_prefixes

    gate = ctx.auxiliary.get("gate")
    if gate is None:
        return {}
    prefixes = source_prefixes(ctx.sources)  # the names the union labels are prefixed with where they clash
    values = portable_config(gate.config.to_dict())
    values.update(num_labels=len(ctx.sources), id2label=dict(enumerate(prefixes)),
                  label2id={name: i for i, name in enumerate(prefixes)}, architectures=[gate.architecture])
    source_labels, start = [], 0
    for layout in ctx.sources:
        source_labels.append(list(range(start, start + len(layout.id2label))))
        start += len(layout.id2label)
    mean, std, _ = processor_facts(ctx.anchor)
    gate_mean, gate_std, gate_size = processor_facts(gate)
    return {"gate": values, "gate_labels": prefixes, "source_labels": source_labels, "source_image_mean": mean,
            "source_image_std": std, "gate_image_mean": gate_mean, "gate_image_std": gate_std,
            "gate_image_size": gate_size}


def task_names(ctx: MergeContext) -> list[str]:
    """A name per task: the source's repo id as it was given (with its ``@revision``), a local folder's name;
    a name given twice gets ``#<position>`` (1-based) from its second time on."""
    names: list[str] = []
    for i, layout in enumerate(ctx.sources):
        source = layout.source
        name = source.spec.ref if source.repo_id else source.path.name
        names.append(f"{name}#{i + 1}" if name in names else name)
    return names


def _own_group(info: TensorInfo) -> str:
    return f"each task's own ({_own_kinds([info])[0]})"


def _own_kinds(infos: Any) -> list[str]:
    """What the tensors each task keeps are, for the card: classifier head, normalisation statistics..."""
    from hfmerge.methods.task_vectors import is_running_statistic

    kinds: list[str] = []
    for info in infos:
        kind = ("classifier head" if info.head is not None
                else "normalisation statistics" if is_running_statistic(info.name)
                else "integer buffers" if info.is_integer else "tensors the base lacks")
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _model_bytes(layout: Any) -> int:
    import math

    return sum(math.prod(info.shape) * info.dtype.itemsize for info in layout.tensors.values())
