"""The model card of a merged model, rendered from ``model_cards/`` through huggingface_hub."""

from __future__ import annotations

import shlex
from importlib import resources
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from hfmerge.result import MergeResult

TEMPLATE = "model_card.md.j2"

AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "image-segmentation": "AutoModelForSemanticSegmentation",
    "image-feature-extraction": "AutoModel",
}


def render_card(result: MergeResult, repo_id: str | None = None) -> str:
    """The card's full text: YAML metadata, then the body from the Jinja template.

    ``repo_id`` fills the usage snippet when the card is pushed; a saved folder's
    card shows a placeholder path.
    """
    planned = result.planned
    method = planned.method
    hub_sources = [s.repo_id for s in planned.sources if s.repo_id]
    if planned.base is not None and planned.base.repo_id:
        hub_sources.append(planned.base.repo_id)
    data = ModelCardData(
        base_model=list(dict.fromkeys(hub_sources)) or None,
        base_model_relation="merge",
        library_name="transformers",
        pipeline_tag=planned.anchor.task,
        tags=["hfmerge", "merge", method.name],
        license=result.license,
    )
    weights = planned.context.normalised_weights()
    rows = []
    for i, source in enumerate(planned.sources):
        rows.append({
            "name": source.repo_id or source.path.name,
            "url": f"https://huggingface.co/{source.repo_id}" if source.repo_id else None,
            "revision": source.revision or ("main" if source.repo_id else "local folder"),
            "commit": source.commit_sha or "—",
            "weight": f"{weights[i]:.4g}",
            "role": "anchor" if method.uses_anchor and i == planned.context.anchor_index else "",
            "labels": len(planned.context.sources[i].id2label),
        })
    architecture = planned.anchor.architecture
    auto_class = AUTO_CLASSES.get(planned.anchor.task, "AutoModel")
    if architecture == "Mask2FormerForUniversalSegmentation":
        auto_class = "AutoModelForUniversalSegmentation"
    card = ModelCard.from_template(
        data,
        template_str=resources.files("hfmerge.model_cards").joinpath(TEMPLATE).read_text(),
        method=method,
        sources=rows,
        base=planned.base,
        parameters=planned.recipe.parameters,
        details=planned.plan.details,
        summary=planned.plan.summary(),
        recipe_yaml=result.recipe_yaml if (result.staging / "hfmerge.yaml").exists() else "",
        command=reproduce_command(result),
        auto_class=auto_class,
        architecture=architecture,
        family=planned.anchor.family.name,
        task=planned.anchor.task,
        num_labels=len(getattr(result.config, "id2label", {}) or {}),
        warnings=result.warnings,
        model_ref=repo_id or "path/to/merged-model",
    )
    return str(card)


def reproduce_command(result: MergeResult) -> str:
    """An ``hfmerge merge`` command line that reproduces this merge from pinned commits."""
    planned = result.planned
    recipe = planned.recipe
    words = ["hfmerge", "merge"]
    for source in planned.sources:
        if source.repo_id:
            words.append(f"{source.repo_id}@{source.commit_sha}" if source.commit_sha else source.repo_id)
        else:
            words.append(str(source.spec.model))
    words += ["--method", recipe.method]
    if recipe.weights:
        words += ["--weights", ",".join(f"{w:g}" for w in recipe.weights)]
    if recipe.anchor:
        anchor = planned.sources[planned.context.anchor_index]
        words += ["--anchor", f"{anchor.repo_id}@{anchor.commit_sha}" if anchor.repo_id else str(anchor.spec.model)]
    if planned.base is not None:
        base = planned.base
        words += ["--base", f"{base.repo_id}@{base.commit_sha}" if base.repo_id else str(base.spec.model)]
    for key, value in recipe.parameters.items():
        if key == "lambda":
            words += ["--lambda", f"{value:g}"]
        else:
            words += ["--param", f"{key}={value}"]
    if recipe.dtype:
        words += ["--dtype", recipe.dtype]
    words += ["--output", "./merged"]
    return shlex.join(words)
