"""Gating merge of ViTs (Ye et al., "Merging Vision Transformers from Different Tasks and Domains", §3.2-3.3).

One model serves N tasks without being told which: a small gating network
G (a MobileNetV2) predicts from the image which source's task it comes from,
P(x) = softmax(G(x)) (Eq. 1); the layers where the sources disagree most keep
one copy per source and are mixed per input, W = Σᵢ pᵢ Wᵢ (Eq. 2); the
classifier is the one of argmax P (Eq. 3); everything else is merged once by
``static`` (AvgMean or RegMean). Which layers disagree most comes from the
weights: per transformer layer, the summed pairwise cosine similarity of the
sources' attention weights, concatenated, and of their MLP weights (Eq. 4,
"concat-layers + combined-FFN", Table 9); the m attention and m MLP modules
of lowest similarity are gated, with the embeddings and every LayerNorm
(Table 2, strategy 4).

The output is a model of its own (:mod:`hfmerge.methods.gating.gated_vit`), written
with its modeling file so that ``trust_remote_code=True`` loads it without
hfmerge, and :func:`hfmerge.load` loads it without running any repository code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.methods.stages import Analyse, Compare, Comparison, DataNeed, Stage, Statistics

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan, OutputSpec
    from hfmerge.engine.statistics import StatisticsRequest

DEFAULT_GATE = "google/mobilenet_v2_1.0_224"
SIMILARITY_SVG = "similarity.svg"
GATE_TRAINING = (
    ParamSpec("gate_fraction", float, 0.15, "fraction of each source's data the gate trains on; the rest "
              "measures its accuracy", minimum=0.0, maximum=1.0),
    ParamSpec("gate_epochs", int, 5, "epochs of gate training (early stopping on a held-out tenth)", minimum=1),
    ParamSpec("gate_learning_rate", float, 1e-3, "the gate's learning rate (AdamW, linear decay)", minimum=0.0),
)
"""How the gate is trained (:class:`~hfmerge.methods.gating.training.TrainGate`): the gating merge's, and EMR's
where it has a gate. ``gate_fraction``: at most 15% of each task's data, as the paper's §4.1."""
DATA_PURPOSE = "to train its gate, which learns which source's data an image comes from (and for RegMean)"

def embedding_and_norm_keys(layout: ModelLayout) -> list[str]:
    """Checkpoint keys of the embeddings (patch, position, CLS) and of every normalisation layer, by module kind.

    Table 2's strategy 4 (the paper's method) gates these always, besides the
    m least similar attention and MLP modules.
    """
    kinds = layout.module_kinds
    chosen = []
    for info in layout.tensors.values():
        parts = info.module.split(".")
        enclosing = {kinds.get(".".join(parts[:n])) for n in range(1, len(parts) + 1)}
        if "embedding" in enclosing or kinds.get(info.module) == "norm":
            chosen.append(info.key)
    return chosen


@dataclass(frozen=True)
class Stack:
    """Keep every source's tensor, stacked on a new leading dimension: (N, *shape).

    For an output model that holds one copy of a module per source (the gated
    layers of the gating merge, whose weights are mixed per input at run time,
    vit-gating-merge Eq. 2), so the merge itself computes nothing.
    """

    sources: tuple[TensorRef, ...]
    group: str = "stacked per source"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        first = load(self.sources[0]).to(torch.float32)
        out = torch.empty((len(self.sources), *first.shape), dtype=torch.float32)
        out[0] = first
        for i, ref in enumerate(self.sources[1:], start=1):
            out[i] = load(ref)
        return out


@register_method
class Gating(MergeMethod):
    """Gating merge of ViTs fine-tuned from one pre-training (vit-gating-merge §3.2-3.3, Algorithm 1)."""

    name = "gating"
    title = "Gating merge of ViTs (a gate network mixes the least similar layers per input)"
    reference = ("Ye et al., Merging Vision Transformers from Different Tasks and Domains, 2023 "
                 "(gating network §3.2, weight similarity §3.3)")
    reference_url = "https://arxiv.org/abs/2312.16240"
    uses_weights = False
    uses_seed = True
    accepts_base = True
    parameters = (
        ParamSpec("m", int, 3, "attention and MLP modules gated: the m of each with the lowest similarity (Eq. 4)",
                  minimum=0),
        ParamSpec("static", str, "regmean", "how the layers that are not gated are merged",
                  choices=("regmean", "average")),
        ParamSpec("gate", str, DEFAULT_GATE, "the gate network: a MobileNetV2 image classifier, repo id or folder"),
        *GATE_TRAINING,
        ParamSpec("routing", str, "soft", "soft: every gated layer is Σᵢ pᵢ Wᵢ (Eq. 2); top1: the gated layers of "
                  "the most probable source only", choices=("soft", "top1")),
        ParamSpec("gate_embeddings_norms", bool, True, "also gate the embeddings and every LayerNorm (Table 2, "
                  "strategy 4; false: they are merged by static too)"),
        ParamSpec("compare", bool, True, "with --eval-data, also evaluate the paper's comparison (Tables 3-4): "
                  "average and regmean with the task given, and gating with either for m in 0, 1, 3, 5"),
        ParamSpec("alpha", float, 0.9, "RegMean's off-diagonal scale (static=regmean)", minimum=0.0, maximum=1.0),
        ParamSpec("lambda", float, 0.3, "task arithmetic's scale, for its comparison rows (needs --base, the "
                  "sources' pre-trained ViT)", minimum=0.0, search=()),
        ParamSpec("samples", int, 256, "images of each source's data for RegMean's Gram matrices (static=regmean)",
                  minimum=1),
        ParamSpec("batch_size", int, 32, "images per forward pass of the statistics and training stages", minimum=1),
    )
    card_template = """\
A gate network G ({{ details.gate.name }}, a MobileNetV2 given a new head of {{ sources | length }} outputs) predicts \
which source's task an image comes from: P(x) = softmax(G(x)) (Eq. 1). \
{{ details.gated_attention | length }} attention and {{ details.gated_mlp | length }} MLP modules (m = \
{{ parameters.m }}: those whose weights the sources agree on least, by Eq. 4) are kept once per source\
{%- if parameters.gate_embeddings_norms %}, together with the embeddings (patch, position, CLS) and every LayerNorm \
(Table 2, strategy 4),{% else %} (the embeddings and LayerNorms are not: `gate_embeddings_norms=false`){% endif %} \
and mixed for each input: W = Σᵢ pᵢ Wᵢ (Eq. 2)\
{%- if parameters.routing == 'top1' %}; with `routing=top1` each image uses the gated weights of its most \
probable source only{% endif %}. The classifier is the one of the most probable source (Eq. 3), its logits placed \
in the union of the {{ details.num_labels }} labels (the other sources' labels get −inf). The other layers are \
merged once, {{ 'by RegMean for the linear layers\\' weights (α = ' ~ parameters.alpha ~ ', Gram matrices of each \
linear layer\\'s inputs on its source\\'s data), their biases and the rest averaged (appendix A)' \
if parameters.static == 'regmean' else 'by averaging with equal weights' }}.{% if base %} The base model \
serves only the task-arithmetic row of the evaluation.{% endif %}

{% if details.similarity -%}
Weight similarity per transformer layer, Sim(l) = Σ_{i<j} cos(Wᵢˡ, Wⱼˡ) (Eq. 4; at most \
{{ details.similarity.pairs }}, over a layer's attention projections — query, key, value, output, weights and \
biases — concatenated, and over both MLP linears concatenated); \
gated layers are marked:

![weight similarity per layer](similarity.svg)

| layer |{% for l in details.similarity.attention %} {{ loop.index }} |{% endfor %}
|---|{% for l in details.similarity.attention %}---|{% endfor %}
| attention |{% for v in details.similarity.attention %} {{ '%.4f' | format(v) }}{{ ' ●' if loop.index0 in \
details.gated_attention }} |{% endfor %}
| MLP |{% for v in details.similarity.mlp %} {{ '%.4f' | format(v) }}{{ ' ●' if loop.index0 in details.gated_mlp }} |\
{% endfor %}

{% endif -%}
{% if details.gate.trained -%}
The gate was fine-tuned from {{ details.gate.name }} on {{ details.gate.train_images | sum }} unlabeled images \
(at most {{ '%.0f' | format(parameters.gate_fraction * 100) }}% of each source's data: \
{{ details.gate.train_images | join(', ') }}; label = the source's index; a tenth of them watched early stopping) for \
{{ details.gate.epochs_run }} epochs; on the {{ details.gate.held_out | sum }} held-out images it picks the right \
source for {{ '%.2f' | format(details.gate.accuracy * 100) }}% \
({% for name, acc in details.gate.per_source %}{{ name }}: {{ '%.2f' | format(acc * 100) }}%\
{{ ', ' if not loop.last }}{% endfor %}).
{%- endif %}"""

    # -- what the pipeline runs ------------------------------------------------------------
    def auxiliary_models(self, parameters: dict[str, Any]) -> dict[str, str]:
        return {"gate": str(parameters.get("gate") or DEFAULT_GATE)}

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """The weight similarity (Eq. 4), RegMean's Gram matrices, the gate's training, the paper's comparison rows."""
        from hfmerge.methods.gating.training import TrainGate

        need = DataNeed(required=True, purpose=DATA_PURPOSE, per_source=True)
        return [
            Analyse(self._analyse),
            Statistics(self._grams, samples=ctx.params.get("samples"), batch_size=int(ctx.params.get("batch_size", 32)),
                       need=need),
            TrainGate(gate="gate", fraction=float(ctx.params.get("gate_fraction", 0.15)),
                      epochs=int(ctx.params.get("gate_epochs", 5)),
                      learning_rate=float(ctx.params.get("gate_learning_rate", 1e-3)),
                      batch_size=int(ctx.params.get("batch_size", 32)), need=need),
            Compare(self._comparisons, told=_task_given),
        ]

    def _analyse(self, ctx: MergeContext) -> dict[str, Any]:
        from hfmerge.methods.gating.similarity import layer_similarity

        self._check_sources(ctx)
        return {"similarity": layer_similarity(ctx.sources)}

    def _grams(self, ctx: MergeContext, index: int) -> StatisticsRequest | None:
        """RegMean's Gram matrices: of the linear layers merged statically, or of all when the comparison runs."""
        from hfmerge.methods.regmean import gram_request, linear_groups

        groups = linear_groups(ctx)
        if not (ctx.evaluating and self._comparisons(ctx)):
            if ctx.params.get("static", "regmean") != "regmean":
                return None
            gated = set(self._gated(ctx))
            groups = [g for g in groups if not any(ctx.anchor.tensors[f"{m}.weight"].key in gated for m in g)]
        return gram_request(groups)

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        d = plan.details
        chosen = ("lowest weight similarity, Eq. 4" if d.get("layers_chosen")
                  else "the m of lowest weight similarity, chosen when the weights are read")
        return [f"gated layers ({chosen}): attention {[i + 1 for i in d['gated_attention']]}, "
                f"MLP {[i + 1 for i in d['gated_mlp']]}; embeddings and every LayerNorm"]

    # -- the plan ----------------------------------------------------------------------------
    def check_sources(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> None:
        """ViT image classifiers only: the architecture each adapter declares as the gating merge's source."""
        from hfmerge.adapters.base import registered_families

        sources = ", ".join(a.gating_source for a in registered_families() if a.gating_source)
        for layout in layouts:
            if layout.architecture != layout.family.gating_source:
                why = f": {layout.family.gating_refusal}" if layout.family.gating_refusal else ""
                raise IncompatibleModelsError(
                    f"gating merges ViT image classifiers ({sources}); {layout.source.name} is a "
                    f"{layout.family.name} {layout.architecture}{why}"
                )

    def _check_sources(self, ctx: MergeContext) -> None:
        """ViT image classifiers of one shape, one dataset per source, a MobileNetV2 gate; else one clear error."""
        from hfmerge.adapters.base import registered_families
        from hfmerge.engine.plan import require_all_shared

        self.check_sources(ctx.sources, ctx.params)
        # The adapters say which architectures the gating merge takes as its gate.
        gates = ", ".join(a.gating_gate for a in registered_families() if a.gating_gate)
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                "image_size", "num_channels", "qkv_bias", "hidden_act")
        anchor = ctx.anchor.config
        for layout in ctx.sources[1:]:
            differ = [k for k in keys if getattr(layout.config, k, None) != getattr(anchor, k, None)]
            if differ:
                k = differ[0]
                raise IncompatibleModelsError(
                    f"gating needs ViTs of one shape, but {k} differs: {ctx.anchor.source.name} has "
                    f"{getattr(anchor, k, None)}, {layout.source.name} has {getattr(layout.config, k, None)}"
                )
        require_all_shared(ctx, self.name, except_names=[i.name for i in ctx.anchor.head_tensors])
        refs = [spec.ref for spec in ctx.data or []]
        if len(refs) != len(ctx.sources) or len(set(refs)) < len(refs):
            raise RecipeError(
                "gating trains its gate to tell the sources' data apart: give one different --data per source, "
                f"in source order ({len(ctx.sources)} sources)"
            )
        gate = ctx.auxiliary.get("gate")
        if gate is None or gate.architecture != gate.family.gating_gate:
            what = f"a {gate.family.name} {gate.architecture}" if gate is not None else "missing"
            raise RecipeError(
                f"the gate must be a MobileNetV2 image classifier ({gates}), e.g. {DEFAULT_GATE}; "
                f"{gate.source.name if gate is not None else 'the gate'} is {what}"
            )

    def _layers(self, ctx: MergeContext) -> int:
        return int(ctx.anchor.config.num_hidden_layers)

    def _selection(self, ctx: MergeContext) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The gated (attention layers, MLP layers): the m least similar of each (Eq. 4)."""
        from hfmerge.methods.gating.similarity import select_gated

        m, layers = int(ctx.params.get("m", 3)), self._layers(ctx)
        if m > layers:
            raise RecipeError(f"m={m} is more than the {layers} transformer layers of the sources; the maximum is "
                              f"m={layers} (every layer gated)")
        if ctx.analysis is None:  # a dry run over Hub sources: the weights are not read, the layers not chosen
            return tuple(range(m)), tuple(range(m))
        return select_gated(ctx.analysis["similarity"], m)

    def _gated(self, ctx: MergeContext) -> list[str]:
        """The checkpoint keys stored once per source, in the anchor's forward order."""
        from hfmerge.methods.gating.similarity import gated_keys

        chosen = set(gated_keys(ctx.anchor, self._selection(ctx)))
        if ctx.params.get("gate_embeddings_norms", True):
            chosen.update(embedding_and_norm_keys(ctx.anchor))
        return [info.key for info in ctx.anchor.forward.values() if info.key in chosen]

    def _comparisons(self, ctx: MergeContext) -> list[Comparison]:
        """The rows of the paper's Tables 3-4 beside this merge, for its evaluation (``compare=true``).

        AvgMean and RegMean with the classifier of the task given (the paper's
        baselines select it by hand), then gating with either, m = 0, 1, 3, 5
        (those up to the number of layers); the merge itself is not repeated.
        """
        if not ctx.params.get("compare", True):
            return []
        layers, own = self._layers(ctx), (ctx.params.get("static"), int(ctx.params.get("m", 3)))
        rows = [Comparison(f"{static} (task given)", {"static": static, "m": 0, "gate_embeddings_norms": False},
                           task_given=True) for static in ("average", "regmean")]
        if ctx.base is not None:  # the paper's third baseline: θ_base + λ Σᵢ τᵢ, the classifier chosen by hand
            scale = float(ctx.params.get("lambda", 0.3))
            rows.append(Comparison(f"task arithmetic, λ={scale:g} (task given)",
                                   {"static": "task_arithmetic", "m": 0, "gate_embeddings_norms": False},
                                   task_given=True))
        for static in ("average", "regmean"):
            for m in (0, 1, 3, 5):
                if m <= layers and (static, m) != own:
                    rows.append(Comparison(f"gating + {static}, m={m}", {"static": static, "m": m}))
        return rows

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import Copy
        from hfmerge.engine.plan import MergePlan, TensorPlan
        from hfmerge.methods.base import get_method

        self._check_sources(ctx)
        attention, mlp = self._selection(ctx)
        gated = set(self._gated(ctx))
        n = len(ctx.sources)
        static = get_method(str(ctx.params.get("static", "regmean"))).plan(ctx)
        heads = {info.key for info in ctx.anchor.head_tensors}
        entries: list[TensorPlan] = []
        for entry in static.tensors:
            if entry.key in heads:
                continue
            if entry.key in gated:
                refs = tuple((i, layout.tensors[entry.name].key) for i, layout in enumerate(ctx.sources))
                entries.append(TensorPlan(entry.key, entry.name, (n, *entry.shape), entry.dtype, Stack(refs)))
            else:
                entries.append(entry)
        for i, layout in enumerate(ctx.sources):
            for info in layout.head_tensors:
                suffix = info.key.rsplit(".", 1)[-1]
                op = Copy((i, info.key), group="classifiers (one per source)")
                entries.append(TensorPlan(f"classifiers.{i}.{suffix}", f"classifiers.{i}.{suffix}", info.shape,
                                          info.dtype, op))
        gate = ctx.auxiliary["gate"]
        for info in gate.tensors.values():
            shape = info.shape
            if info.head is not None:  # the gate's new head: one output per source
                shape = (n, *shape[1:])
            entries.append(TensorPlan(f"gate.{info.key}", f"gate.{info.name}", shape, info.dtype,
                                      Copy(("gate", info.key), group="gate network (trained)")))
        output = self._output(ctx, self._gated(ctx))
        details: dict[str, Any] = {
            "gated_attention": list(attention), "gated_mlp": list(mlp), "num_labels": len(output.config.id2label),
            "gate": {"name": gate.source.name, "trained": False},
            "layers_chosen": ctx.analysis is not None, "static": static.details,
        }
        if ctx.analysis is not None:
            from hfmerge.methods.gating.similarity import similarity_svg

            similarity = ctx.analysis["similarity"]
            details["similarity"] = {"attention": list(similarity.attention), "mlp": list(similarity.mlp),
                                     "pairs": similarity.pairs}
            output.files[SIMILARITY_SVG] = similarity_svg(similarity, (attention, mlp))
        return MergePlan(entries, details=details, output=output)

    def _output(self, ctx: MergeContext, gated: list[str]) -> OutputSpec:
        """The gated model's config (its own class, with ``auto_map``) and its modeling file."""
        from hfmerge.engine.plan import OutputSpec
        from hfmerge.methods.gating.model import (
            AUTO_MAP,
            MODELING_FILE,
            GatedMergedConfig,
            GatedMergedForImageClassification,
            modeling_source,
        )
        from hfmerge.methods.heads import source_prefixes, union_labels

        gate = ctx.auxiliary["gate"]
        labels = union_labels(ctx.sources)
        source_labels, start = [], 0
        for layout in ctx.sources:
            source_labels.append(list(range(start, start + len(layout.id2label))))
            start += len(layout.id2label)
        tasks = source_prefixes(ctx.sources)
        gate_config = portable_config(gate.config.to_dict())
        gate_config.update(num_labels=len(ctx.sources), id2label=dict(enumerate(tasks)),
                           label2id={t: i for i, t in enumerate(tasks)})
        vit_mean, vit_std, _ = processor_facts(ctx.anchor)
        gate_mean, gate_std, gate_size = processor_facts(gate)
        config = GatedMergedConfig(
            vit=portable_config(ctx.anchor.config.to_dict()), gate=gate_config, num_sources=len(ctx.sources), gate_labels=tasks,
            gated=gated, source_labels=source_labels, routing=str(ctx.params.get("routing", "soft")),
            vit_image_mean=vit_mean, vit_image_std=vit_std, gate_image_mean=gate_mean, gate_image_std=gate_std,
            gate_image_size=gate_size, id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            architectures=[GatedMergedForImageClassification.__name__],
        )
        config.auto_map = dict(AUTO_MAP)
        return OutputSpec(config=config, architecture=GatedMergedForImageClassification.__name__,
                          task="image-classification", files={MODELING_FILE: modeling_source()},
                          loads_with_transformers=False)


def _task_given(model: Any, task: int) -> Any:
    """The gated model told that its input is of source ``task``: its comparison rows with the task given."""
    from hfmerge.methods.gating.model import TaskGiven

    return TaskGiven(model, task)


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A source's config as the gated config nests it: without private keys (``_name_or_path`` is the path the
    merging machine read it from, which must not be published)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def processor_facts(layout: ModelLayout) -> tuple[list[float], list[float], list[int]]:
    """(image_mean, image_std, [height, width]) of the image processor saved beside a model.

    The gated model makes its gate's input itself from the ViT's pixels (undo the
    ViT's normalisation, resize to the gate's input size, the gate's normalisation;
    no centre crop), so it needs both processors' numbers.
    """
    path = layout.source.path / "preprocessor_config.json"
    if not path.is_file():
        raise RecipeError(f"{layout.source.name} has no preprocessor_config.json: its image processor is needed to "
                          "feed it images; save one with the model (AutoImageProcessor.save_pretrained)")
    facts = json.loads(path.read_text())
    mean = [float(v) for v in facts.get("image_mean") or (0.5, 0.5, 0.5)]
    std = [float(v) for v in facts.get("image_std") or (0.5, 0.5, 0.5)]
    if facts.get("do_normalize") is False:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    size = facts.get("crop_size") if facts.get("do_center_crop") else None
    size = size or facts.get("size") or {}
    if isinstance(size, int):
        hw = [size, size]
    elif "height" in size:
        hw = [int(size["height"]), int(size["width"])]
    elif "shortest_edge" in size:
        hw = [int(size["shortest_edge"])] * 2
    else:
        hw = [int(layout.config.image_size)] * 2
    return mean, std, hw
