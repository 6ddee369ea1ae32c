"""The model card of a merged model, rendered from ``model_cards/`` through huggingface_hub.

The card says only what is true of this merge. Each method writes its own
paragraph (:attr:`~hfmerge.methods.base.MergeMethod.card_template`), so the
template never guesses what an unknown method computes. Local folders appear
by their folder name only: no path of the machine that merged reaches the card
or its metadata. The reproduce block is a command that runs as written from a
folder holding the merge's ``hfmerge.yaml``.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from huggingface_hub import ModelCard, ModelCardData

from hfmerge.eval.search import SEARCH_RESULT, SEARCH_SVG

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.eval.report import EvaluationReport
    from hfmerge.eval.search import ParameterSearch
    from hfmerge.hub.resolve import ResolvedSource
    from hfmerge.methods.base import MergeMethod
    from hfmerge.methods.stages import RunRecord
    from hfmerge.recipe import PlannedMerge

TEMPLATE = "model_card.md.j2"
PLACEHOLDER_REF = "path/to/merged-model"
REPRODUCE_COMMAND = "hfmerge run hfmerge.yaml --output merged"
EVALUATION_SVG = "evaluation.svg"  # the bar chart, written beside README.md
EVALUATION_HEADING = "## Evaluation"
_EVALUATION_SECTION = re.compile(r"^## Evaluation[^\n]*\n.*?(?=^## |\Z)", re.M | re.S)

AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "image-segmentation": "AutoModelForSemanticSegmentation",
    "image-feature-extraction": "AutoModel",
}


class CardFacts(Protocol):
    """What a card is made from: a finished merge (:class:`hfmerge.publish.result.MergeResult` has these)."""

    @property
    def planned(self) -> PlannedMerge: ...

    @property
    def config(self) -> Any: ...

    @property
    def warnings(self) -> list[str]: ...

    @property
    def license(self) -> str | None: ...

    @property
    def recipe_yaml(self) -> str: ...

    @property
    def details(self) -> dict[str, Any]: ...

    @property
    def record(self) -> RunRecord: ...

    # Optional: ``evaluation`` (an EvaluationReport or None), read with getattr so that facts without it render.


def render_card(result: CardFacts, repo_id: str | None = None) -> str:
    """The card's full text: YAML metadata, then the body from the Jinja template.

    ``repo_id`` (default: the recipe's ``push_to_hub``) fills the usage
    snippet; without one the snippet shows a placeholder path.
    """
    from hfmerge import __version__

    planned = result.planned
    method = planned.method
    repo_id = repo_id or planned.recipe.push_to_hub
    names = PublicNames.for_merge(planned)
    everything = [*planned.sources, *([planned.base] if planned.base is not None else [])]
    hub_models = list(dict.fromkeys(s.repo_id for s in everything if s.repo_id))
    evaluation: EvaluationReport | None = getattr(result, "evaluation", None)
    model_name = repo_id or (evaluation.merged().name if evaluation is not None else None)
    data = ModelCardData(
        base_model=hub_models or None,
        base_model_relation="merge" if hub_models else None,
        library_name="transformers",
        pipeline_tag=planned.plan.output.task if planned.plan.output is not None else planned.anchor.task,
        tags=["hfmerge", "merge", method.name],
        license=result.license,
        model_name=model_name if evaluation is not None else None,
        eval_results=evaluation.eval_results(model_name) if evaluation is not None else None,
    )
    weights = planned.context.normalised_weights()
    rows = []
    for i, source in enumerate(planned.sources):
        rows.append({
            "name": names.of(source),
            "url": _hub_url(source),
            "revision": source.revision or ("main" if source.repo_id else "local folder"),
            "commit": source.commit_sha or "—",
            "weight": f"{weights[i]:.4g}",
            "role": "anchor" if method.uses_anchor and i == planned.context.anchor_index else "",
            "labels": len(planned.context.sources[i].id2label),  # shown for families with labels of their own
        })
    base = None
    if planned.base is not None:
        base = {"name": names.of(planned.base), "url": _hub_url(planned.base), "commit": planned.base.commit_sha}
    output = planned.plan.output
    architecture = output.architecture if output is not None else planned.anchor.architecture
    task = output.task if output is not None else planned.anchor.task
    auto_class = ((output.auto_class if output is not None else None)
                  or planned.anchor.family.auto_classes.get(architecture) or AUTO_CLASSES.get(task, "AutoModel"))
    family = planned.anchor.family
    text = method_text(
        method, details=result.details, parameters=planned.recipe.parameters, base=base, sources=rows,
        architecture=architecture, task=task, batch_norm=has_batch_norm(planned.anchor),
    )
    carried = carried_text(result.details.get("not_merged"), base=base["name"] if base else None,
                           anchor=rows[planned.context.anchor_index]["name"])
    if carried:
        text = f"{text}\n\n{carried}"
    plain_transformers = output.loads_with_transformers if output is not None else family.classes is None
    model_ref = repo_id or PLACEHOLDER_REF
    id2label = getattr(result.config, "id2label", {}) or {}
    data_rows = [
        {"source": names.scrub(use.source) if use.source else "", "data": names.scrub(use.data),
         "commit": use.commit_sha or "—", "samples": use.samples, "skipped": use.skipped}
        for use in result.record.data_uses
    ]
    search = result.record.results.get(SEARCH_RESULT)  # parameters chosen on validation data (hfmerge.run.search)
    card = ModelCard.from_template(
        data,
        template_str=resources.files("hfmerge.model_cards").joinpath(TEMPLATE).read_text(),
        method=method,
        method_text=text,
        sources=rows,
        columns={
            "weight": method.uses_weights,
            "role": method.uses_anchor,
            "commit": any(s.commit_sha for s in planned.sources),
            "labels": family.zero_shot is None,  # a zero-shot family's models have none (the header says so)
        },
        base=base,
        parameters=_parameters(planned.recipe.parameters, search),
        summary=planned.plan.summary(),
        recipe_yaml=result.recipe_yaml,
        reproduce=REPRODUCE_COMMAND,
        merge_command=merge_command(planned, result.record.data_pins),
        any_hub=bool(hub_models),
        local_sources=[names.of(s) for s in everything if s.is_local],
        auto_class=auto_class,
        architecture=architecture,
        family=family.name,
        task=task,
        plain_transformers=plain_transformers,
        remote_code=bool(getattr(result.config, "auto_map", None)),
        own_output=output is not None,
        task_argument=output.task_argument if output is not None else None,
        labels_text=family.labels_text(id2label) if id2label or family.zero_shot is not None else None,
        usage=usage_snippet(planned, architecture, task, model_ref, names, plain_transformers=plain_transformers),
        warnings=result.warnings,
        data_rows=data_rows,
        # the search scored on validation data, before the evaluation's test scores
        evaluation=(search.markdown(chart=SEARCH_SVG) + "\n" if search is not None else "")
        + (evaluation_section(evaluation) if evaluation is not None else ""),
        model_ref=model_ref,
        repo_id=repo_id,
        version=__version__,
    )
    return names.scrub(str(card))


def carried_text(carried: dict[str, Any] | None, *, base: str | None, anchor: str) -> str | None:
    """The card's sentence on the tensors no method merged (the family's ``not_merged``, a ``CLIPModel``'s text
    tower): whose they are, so that the method's paragraph is not read as merging every parameter. ``carried``:
    the plan's ``not_merged`` detail (how many tensors came from the base and from the anchor, what they are, and
    the other tensors of the base an ``--output-format`` took because the sources lack them), ``None`` when the
    merge carried none."""
    if not carried:
        return None
    part = carried.get("part") or "part that no method merges"
    from_base, from_anchor = carried.get("base", 0), carried.get("anchor", 0)
    if from_base and from_anchor:
        return (f"The {part} is not merged: {from_base} of its tensors are the base's ({base}), unchanged, and "
                f"{from_anchor}, which the base lacks or shapes otherwise, the anchor's ({anchor}).")
    if from_base:
        lacking = carried.get("lacking") or []  # the base's tensors that a format adds and the sources lack
        also = ""
        if lacking:
            named = ", ".join(f"`{name}`" for name in lacking[:3]) + (f" and {len(lacking) - 3} more"
                                                                      if len(lacking) > 3 else "")
            also = f"; so {'is' if len(lacking) == 1 else 'are'} {named}, which the sources lack"
        return f"The {part} ({from_base} tensors) is not merged: it is the base's ({base}), unchanged{also}."
    return f"The {part} ({from_anchor} tensors) is not merged: it is the anchor's ({anchor}), unchanged."


PIPELINE_USAGE = {"zero-shot-image-classification":
                  'candidate_labels=["cat", "dog", "bird"],\n                       hypothesis_template="{prompt}"'}
"""Tasks whose models the card's usage runs through ``transformers.pipeline`` (a model that loads with plain
transformers), with the call's arguments beyond the image: a zero-shot classifier is of no use without the class
names it chooses among, and scores them as the card's evaluation did with its prompt (``{prompt}``), not with
the pipeline's own ("This is a photo of {}.")."""


def usage_prompt(planned: PlannedMerge) -> str:
    """The prompt a zero-shot usage snippet writes each class name into: the merge's first ``--prompt``, else
    CLIP's default, the first of the evaluation's default templates."""
    from hfmerge.eval.zero_shot import PROMPTS

    return (planned.recipe.prompts or PROMPTS)[0]


def usage_snippet(planned: PlannedMerge, architecture: str, task: str, model_ref: str, names: PublicNames, *,
                  plain_transformers: bool) -> str | None:
    """The card's usage code where it is not the task's Auto class and image processor (``None``: the template's).

    The family's own snippet for ``architecture`` comes first (:attr:`~hfmerge.adapters.base.FamilyAdapter.usage`:
    a CLIP image encoder put beside the text tower of its base, named ``base_ref``: the base when it is of the
    family's zero-shot architecture, else a placeholder); then :data:`PIPELINE_USAGE` by task.
    """
    family = planned.anchor.family
    template = family.usage.get(architecture)
    if template is not None:
        import jinja2

        base = planned.context.base
        completing = family.zero_shot or "base"
        base_ref = (names.of(base.source) if base is not None and base.architecture == completing
                    else f"path/to/pre-trained-{completing}")
        environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        return environment.from_string(template).render(model_ref=model_ref, base_ref=base_ref,
                                                        architecture=architecture, prompt=usage_prompt(planned)).strip()
    arguments = PIPELINE_USAGE.get(task)
    if arguments is not None and plain_transformers:
        arguments = arguments.replace("{prompt}", usage_prompt(planned))
        return (f'from transformers import pipeline\n\nclassify = pipeline("{task}", model="{model_ref}")\n'
                f'predictions = classify("image.jpg", {arguments})')
    return None


def _parameters(parameters: dict[str, Any], search: ParameterSearch | None) -> dict[str, Any]:
    """The parameters table's values; those a search chose say so."""
    chosen = set(search.space) if search is not None else set()
    return {name: f"{value} (chosen on validation data: see Parameter search)" if name in chosen else value
            for name, value in parameters.items()}


def evaluation_section(report: EvaluationReport) -> str:
    """The card's ``## Evaluation`` section: the report's tables and the bar chart (:data:`EVALUATION_SVG`)."""
    return f"{EVALUATION_HEADING}\n\n{report.markdown(chart=EVALUATION_SVG)}"


def update_card(text: str, report: EvaluationReport, model_name: str) -> str:
    """``text`` (a model card) with its evaluation section and ``model-index`` replaced by ``report``'s.

    An existing ``## Evaluation`` section is replaced where it is; otherwise the section goes before
    ``## Usage`` (where a rendered card has it), or at the end. The other metadata and sections stay as they
    are, so updating twice gives one section, the second report's. The chart file
    (:data:`EVALUATION_SVG`, from :meth:`EvaluationReport.bar_chart_svg`) is the caller's to write beside it.
    """
    card = ModelCard(text, ignore_metadata_errors=True)
    card.data.model_name = model_name
    card.data.eval_results = report.eval_results(model_name)
    section = evaluation_section(report)
    body = card.text
    if _EVALUATION_SECTION.search(body):
        body = _EVALUATION_SECTION.sub(lambda m: section + ("\n" if m.end() < len(body) else ""), body, count=1)
    elif re.search(r"^## Usage$", body, re.M):
        body = re.sub(r"^(?=## Usage$)", lambda _: section + "\n", body, count=1, flags=re.M)
    else:
        body = body.rstrip("\n") + "\n\n" + section
    card.text = body
    return str(card)


def has_batch_norm(layout: ModelLayout) -> bool:
    """Whether the model has BatchNorm running statistics, which the method paragraphs then say what became of."""
    from hfmerge.methods.task_vectors import is_running_statistic

    return any(is_running_statistic(name) for name in layout.tensors)


def method_text(method: MergeMethod, **context: Any) -> str:
    """The method's own paragraph: its ``card_template`` rendered with ``context``.

    An undefined variable is an error rather than an empty string, so a typo
    in a method's snippet fails its tests instead of printing a wrong formula.
    A method without a snippet gets a sentence pointing to its reference,
    never another method's formula.
    """
    if not method.card_template.strip():
        return f"hfmerge has no description of `{method.name}` for this card; see the reference above for what it computes."
    import jinja2

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    return environment.from_string(method.card_template).render(method=method, **context).strip()


def merge_command(planned: PlannedMerge, data_pins: dict[int, Any] | None = None) -> str | None:
    """An ``hfmerge merge`` line equivalent to the pinned ``hfmerge.yaml``.

    Every recipe field becomes its flag (``heads: concat`` → ``--heads concat``),
    so a field added to the recipe cannot silently go missing from the command.
    ``None`` when a source or the base is a local folder: the card names
    folders without their paths, so no such command would run as written.
    """
    everything = [*planned.sources, *([planned.base] if planned.base is not None else [])]
    recipe = planned.pinned_recipe(data_pins)
    datasets = [*(recipe.data or []), *(recipe.eval_data or [])]
    if any(s.is_local for s in everything) or any(spec.is_local for spec in datasets):
        return None
    pinned = recipe.to_dict()
    words = ["hfmerge", "merge", *(_pinned_ref(s) for s in planned.sources), "--method", pinned.pop("method")]
    pinned.pop("sources")
    for key, value in pinned.items():
        flag = "--" + key.replace("_", "-")
        if key == "weights":
            words += [flag, ",".join(_number(w) for w in value)]
        elif key == "parameters":
            for name, parameter in value.items():
                words += ["--param", f"{name}={_number(parameter)}"]
        elif key == "anchor":
            words += [flag, _pinned_ref(planned.sources[planned.context.anchor_index])]
        elif key == "base" and planned.base is not None:
            words += [flag, _pinned_ref(planned.base)]
        elif key in ("data", "eval_data"):
            for spec in getattr(recipe, key):
                pin = spec.commit or spec.revision
                words += [flag, f"{spec.dataset}{f'@{pin}' if pin else ''}{f':{spec.split}' if spec.split else ''}"]
        elif value is True:
            words.append(flag)
        elif value not in (False, None):
            words += [flag, _number(value)]
    words += ["--output", "merged"]
    return shlex.join(words)


def _pinned_ref(source: ResolvedSource) -> str:
    return f"{source.repo_id}@{source.commit_sha}" if source.commit_sha else source.spec.ref


def _number(value: Any) -> str:
    """A value as a command-line word; floats round-trip exactly (``repr``), ``1.0`` is written ``1``."""
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    return str(value)


def _hub_url(source: ResolvedSource) -> str | None:
    return f"https://huggingface.co/{source.repo_id}" if source.repo_id else None


_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


@dataclass(frozen=True)
class PublicNames:
    """How the card names the merge's models: Hub ids as they are, local folders by folder name.

    ``paths`` maps every spelling of a local folder's path (as given, expanded,
    resolved) to the name the card shows, longest first, so :meth:`scrub` can
    take any path out of free text such as warnings.

    Trainer ``checkpoint-N`` folders, and folders whose names clash, are
    shown with their parent folder's name (``run1/checkpoint-500``).
    """

    names: dict[Path, str]
    paths: tuple[tuple[str, str], ...]

    @classmethod
    def for_merge(cls, planned: PlannedMerge) -> PublicNames:
        auxiliary = [layout.source for layout in planned.context.auxiliary.values()]  # gating's gate network
        local = [s for s in [*planned.sources, planned.base, *auxiliary] if s is not None and s.is_local]
        folders = list(dict.fromkeys(s.path for s in local))
        short = {folder: folder.name for folder in folders}
        for folder in folders:
            clash = [f for f in folders if f.name == folder.name]
            if len(clash) > 1 or _CHECKPOINT.match(folder.name):
                # Trainer checkpoints and same-named folders: the parent's name tells them apart.
                short[folder] = f"{folder.parent.name}/{folder.name}"
        spellings: dict[str, str] = {}
        for source in local:
            shown = short[source.path]
            given = Path(source.spec.model).expanduser()
            for spelling in (str(source.path), str(given), str(given.absolute()), source.spec.model):
                # Paths only: a bare folder name ("vit-a", ".") could also be a word of the card.
                if Path(spelling).expanduser().is_absolute() or "/" in spelling or os.sep in spelling:
                    spellings[spelling] = shown
        recipe = planned.recipe
        for spec in [*(recipe.data or []), *(recipe.eval_data or [])]:
            if spec.is_local:  # a data folder is named by its folder name too, like ImageData.name
                given = spec.path
                for spelling in (str(given.resolve()), str(given.absolute()), spec.dataset):
                    if Path(spelling).is_absolute() or "/" in spelling or os.sep in spelling:
                        spellings.setdefault(spelling, given.resolve().name)
        ordered = tuple(sorted(spellings.items(), key=lambda item: -len(item[0])))
        return cls(names=short, paths=ordered)

    def of(self, source: ResolvedSource) -> str:
        """The name the card shows for ``source``."""
        return source.repo_id if source.repo_id else self.names[source.path]

    def scrub(self, text: str) -> str:
        """``text`` with every absolute spelling of a local source's path replaced by its shown name."""
        for path, shown in self.paths:
            text = text.replace(path, shown)
        return text
