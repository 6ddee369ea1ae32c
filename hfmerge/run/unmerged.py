"""What a merge writes besides what its method combines: the tensors a family never merges, and the output formats
a family offers, both as its adapter declares them.

A ``CLIPModel``'s text tower is the first such part (the adapter's ``not_merged``): no method merges it, the output
takes the base's. A CLIP image encoder can be written as a whole ``CLIPModel`` (``--output-format clip``, the
adapter's ``output_formats``), its other parts the base's; and an evaluation of encoders scored zero-shot needs the
text tower of such a base. These steps read only the adapter's fields, never a family's name.
"""

from __future__ import annotations

from dataclasses import replace

from hfmerge.engine.ops import Copy
from hfmerge.engine.plan import MergeContext, MergePlan, OutputSpec, TensorPlan
from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.recipe import Recipe

NOT_MERGED = "carried, not merged (the family's not_merged)"


def check_text_tower(recipe: Recipe, context: MergeContext) -> None:
    """Refuse, before anything runs, an evaluation of zero-shot image encoders (CLIP towers) with no text tower,
    and prompts for a family scored without them."""
    family, base = context.anchor.family, context.base
    if recipe.prompts and family.zero_shot is None:
        raise RecipeError(f"--prompt: {family.name} models have their own classifier and are scored without "
                          "prompts; drop --prompt")
    if not recipe.eval_data or family.zero_shot is None or context.anchor.architecture == family.zero_shot:
        return
    if base is None or base.architecture != family.zero_shot:
        raise RecipeError(
            f"--eval-data: {family.name} image encoders are scored by zero-shot classification with a text tower: "
            f"give --base the pre-trained {family.zero_shot} the sources were fine-tuned from "
            "(e.g. openai/clip-vit-base-patch32)"
        )


def carry_unmerged_tensors(plan: MergePlan, context: MergeContext) -> None:
    """Append the tensors no method merges (the adapter's ``not_merged``: a ``CLIPModel``'s text tower).

    The base's are taken where the base has the tensor in the anchor's shape (the pre-trained text tower the
    sources were fine-tuned beside), else the anchor's. The plan's ``not_merged`` detail counts each, for the
    card (:func:`~hfmerge.publish.card.carried_text`).
    """
    base = context.base
    origins = {"base": 0, "anchor": 0}
    for info in context.anchor.carried.values():
        other = base.carried.get(info.name) if base is not None else None
        if other is not None and other.shape == info.shape:
            op = Copy((context.base_index, other.key), group=f"{NOT_MERGED} from the base")
            origins["base"] += 1
        else:
            op = Copy((context.anchor_index, info.key), group=f"{NOT_MERGED} from the anchor")
            origins["anchor"] += 1
        plan.tensors.append(TensorPlan(info.key, info.name, info.shape, info.dtype, op))
    if context.anchor.carried:
        plan.details["not_merged"] = {"part": context.anchor.family.not_merged_name, **origins}


def write_as_format(plan: MergePlan, context: MergeContext, name: str, method: str) -> None:
    """Turn ``plan`` into one that writes the base's architecture (``--output-format``, :class:`OutputFormat`).

    Every planned tensor goes in under the base's name for it; every other tensor of the base is copied.

    Raises:
        RecipeError: a format the family does not have, a method that writes a model of its own, or a base
            that is not of the format's architecture.
        IncompatibleModelsError: a merged tensor the base has no place for.
    """
    from hfmerge.methods.task_vectors import base_candidates

    anchor, base = context.anchor, context.base
    formats = anchor.family.output_formats
    if name not in formats:
        offered = f"choose {', '.join(sorted(formats))}" if formats else "drop --output-format"
        raise RecipeError(f"--output-format {name!r}: {anchor.family.name} merges have no such format; {offered}")
    spec = formats[name]
    if plan.output is not None:
        raise RecipeError(f"method '{method}' writes a model of its own ({plan.output.architecture}); "
                          "drop --output-format")
    if anchor.architecture == spec.architecture:
        return
    if base is None or base.architecture != spec.architecture:
        given = f"the base {base.source.name} is a {base.architecture}" if base is not None else "no --base is given"
        raise RecipeError(f"--output-format {name} writes a {spec.architecture}, whose other parts come from the base, "
                          f"but {given}: give --base a {spec.architecture} the sources were fine-tuned from")
    placed: set[str] = set()
    for i, entry in enumerate(plan.tensors):
        target = next((base.tensors[c] for c in base_candidates(anchor, entry.name) if c in base.tensors), None)
        if target is None or target.shape != entry.shape:
            raise IncompatibleModelsError(
                f"--output-format {name}: the base {base.source.name} ({base.architecture}) has no tensor for "
                f"{entry.name} {list(entry.shape)}; give --base the model the sources were fine-tuned from")
        plan.tensors[i] = replace(entry, key=target.key, name=target.name)
        placed.add(target.name)
    for info in [*base.tensors.values(), *base.carried.values()]:
        if info.name not in placed:
            plan.tensors.append(TensorPlan(info.key, info.name, info.shape, info.dtype,
                                           Copy((context.base_index, info.key), group=f"from the base ({name} format)")))
    if base.carried:  # the format's part that no method merges (a CLIPModel's text tower) is the base's
        lacking = [info.name for info in base.tensors.values() if info.name not in placed]  # the sources lack them
        plan.details["not_merged"] = {"part": anchor.family.not_merged_name, "base": len(base.carried), "anchor": 0,
                                      "lacking": lacking}
    plan.output = OutputSpec(config=base.config, architecture=spec.architecture,
                             task=anchor.family.architectures[spec.architecture], loads_with_transformers=True,
                             processor_from=base.source.path)
