"""The Gradio demo Space of a merged model: written from ``spaces/`` and pushed as a Space repo.

The Space is ``spaces/app.py`` with the files beside it: ``inference.py`` (the
models without Gradio; hfmerge imports its constants too), ``source_ref.py`` (a
copy of :mod:`hfmerge.source_ref`, the parser of model references), ``space_config.json`` (which model and which sources to show),
``README.md`` (Space metadata: sdk, app file, the models it uses),
``requirements.txt`` and ``examples/`` (images of the model's evaluation data, else of the data the merge read,
else none); for a gated merge, the model's own
class as ``modeling_hfmerge_gated.py`` (an EMR merge's as ``modeling_hfmerge_emr.py``).
It runs from its own repo alone: a static merge loads with plain transformers, a
gated or EMR one with that class, so the Space never installs hfmerge and never
runs a repository's code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import SpaceCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hfmerge import source_ref
from hfmerge.data.spec import DataSpec
from hfmerge.errors import HfMergeError, RecipeError, SourceError
from hfmerge.hub.resolve import ResolvedSource, resolve_source
from hfmerge.publish.result import RECIPE_FILE, atomic_folder, check_output_folder
from hfmerge.source import SourceSpec
from hfmerge.spaces.inference import IMAGE_SUFFIXES, RecipeFileError, head_kind, read_recipe

logger = logging.getLogger(__name__)

TEMPLATE_PACKAGE = "hfmerge.spaces"
TEMPLATE_FILES = ("app.py", "inference.py", "requirements.txt")
SOURCE_REF_FILE = "source_ref.py"
"""The name of the Space's copy of :mod:`hfmerge.source_ref`, which ``inference.py`` imports beside it."""
# What marks a folder as a Space written by hfmerge, so that --overwrite may replace it.
SPACE_CONFIG_FILE = "space_config.json"
EXAMPLES = 4
"""The most example images drawn from the model's data, spread over its datasets."""


@dataclass
class SpaceOptions:
    """What ``hfmerge space`` does, from the command line or Python.

    Attributes:
        model: the merged model, ``org/name[@revision]``, or a folder when only writing.
        space_id: the Space repo to create or update; default ``<model>-demo`` when pushing.
        sources: the models shown beside it; ``None`` takes the sources from its ``hfmerge.yaml``,
            an empty list shows it alone.
        examples: example images; ``None`` draws a few from the model's evaluation data (its ``hfmerge.yaml``'s
            ``eval_data``, else the datasets its card's ``model-index`` names), else from the data the merge read
            (``data``), else shows none: images of the model's own task, or none rather than unrelated ones.
        title: the Space's title; default from the model's name.
        private: create the Space as private.
        labels: for a zero-shot model (CLIP), the labels its labels box starts with; ``None`` takes the class names
            of its evaluation data (:func:`zero_shot_labels`), else the app's own (cat, dog, bird).
    """

    model: str
    space_id: str | None = None
    sources: list[str] | None = None
    examples: list[str] | None = None
    title: str | None = None
    private: bool = False
    labels: list[str] | None = None


@dataclass(frozen=True)
class SpaceExample:
    """One example image of the Space: its file name in ``examples/``, and its bytes."""

    name: str
    data: bytes


@dataclass
class SpacePlan:
    """The Space's contents, decided before anything is written."""

    model: ResolvedSource
    model_ref: str
    sources: list[str]
    examples: list[SpaceExample]
    title: str
    gated: bool
    license: str | None
    examples_note: str = ""
    """Where the examples were drawn from, for the Space's README (empty when the user chose them, or there are none)."""
    warnings: list[str] = field(default_factory=list)
    emr: bool = False
    """An EMR merge: the Space shows each task's model, built by ``modeling_hfmerge_emr.py`` beside the app."""
    labels: list[str] | None = None
    """A zero-shot model's first labels (``space_config.json``); ``None``: the app's defaults."""

    def placed_in(self, home: Path) -> SpacePlan:
        """The plan of a Space written to the folder ``home``: local models named relative to it.

        No path of this machine is written into the Space, and its app (which reads a relative folder in
        ``space_config.json`` from its own folder) finds the models from wherever it is started, and
        after the Space and the models are moved together.
        """
        return replace(self, model_ref=_relative_to(self.model_ref, home),
                       sources=[_relative_to(ref, home) for ref in self.sources])

    @property
    def hub_models(self) -> list[str]:
        """The repo ids a Space README lists under ``models:`` (no revisions, no folders)."""
        refs = [self.model_ref, *self.sources]
        specs = [SourceSpec.parse(ref) for ref in refs]
        return list(dict.fromkeys(s.model for s in specs if not s.is_local))


def plan_space(options: SpaceOptions, *, for_hub: bool, token: str | bool | None = None) -> SpacePlan:
    """Check the model, its sources and the examples; decide what the Space shows.

    Only configs, cards and recipes are downloaded, never weights.

    Raises:
        SourceError: the model or a source does not exist, or the model has a head the app cannot show.
        RecipeError: a local folder where the Hub needs a repo id, or an example that is not an image.
    """
    labels = _checked_labels(options.labels) if options.labels is not None else None
    model = resolve_source(options.model, token=token, metadata_only=True)
    if for_hub and model.is_local:
        raise _local_model_refused(options.model)
    config = json.loads((model.path / "config.json").read_text())
    from hfmerge.methods.emr.model import MODEL_TYPE as EMR_MODEL_TYPE
    from hfmerge.methods.gating.model import MODEL_TYPE as GATED_MODEL_TYPE

    # the model says what it is, whichever method (a plug-in's) made it; an EMR merge shows its sources' head
    emr = config.get("model_type") == EMR_MODEL_TYPE
    architecture = ((config.get("source") or {}) if emr else config).get("architectures", [""])[0]
    if head_kind(architecture) is None:
        raise SourceError(
            f"{model.name} is a {architecture or config.get('model_type', 'model')}; the demo Space shows image "
            "classification and segmentation models"
        )
    if head_kind(architecture) == "zero-shot" and "text_config" not in config:
        raise SourceError(
            f"{model.name} is a {architecture}, a CLIP image encoder with no text tower to classify with: merge the "
            "towers with --output-format clip and a CLIPModel --base, and make the Space of that"
        )
    warnings: list[str] = []
    try:
        recipe = _read_recipe(model.path, f"{model.name}/{RECIPE_FILE}")
    except RecipeFileError as exc:
        recipe = None
        warnings.append(f"{exc}; the Space shows the model alone (pass --sources to show models beside it)")
    if labels is not None and head_kind(architecture) != "zero-shot":
        raise RecipeError(f"--labels sets the labels a zero-shot (CLIP) model chooses among; {model.name} is a "
                          f"{architecture} with labels of its own: drop --labels")
    gated = config.get("model_type") == GATED_MODEL_TYPE
    if options.sources is None:
        sources = _recipe_sources(recipe or {}, model, for_hub=for_hub, warnings=warnings)
        if recipe == {}:
            warnings.append(f"{model.name} has no {RECIPE_FILE} (not made by hfmerge); the Space shows it alone")
    else:
        sources = [_checked_source(ref, for_hub=for_hub, token=token) for ref in options.sources]
    model_ref = str(model.path) if model.is_local else model.spec.ref
    name = model.repo_id.split("/")[-1] if model.repo_id else model.path.name
    datasets = _example_datasets(recipe or {}, model.path / "README.md")
    if options.examples is None:
        examples, note = _drawn_examples(datasets, warnings)
    else:
        examples, note = _examples(options.examples), ""
    if head_kind(architecture) == "zero-shot":
        labels = labels if labels is not None else zero_shot_labels(datasets[0])
    for message in warnings:
        logger.warning(message)
    return SpacePlan(
        model=model, model_ref=model_ref, sources=sources, examples=examples, examples_note=note,
        title=options.title or f"{name} demo", gated=gated, emr=emr, license=model.license, warnings=warnings,
        labels=labels,
    )


def write_space(plan: SpacePlan, folder: Path, space_id: str | None = None) -> None:
    """Write the Space's files into the empty ``folder``."""
    template = resources.files(TEMPLATE_PACKAGE)
    for name in TEMPLATE_FILES:
        (folder / name).write_bytes(template.joinpath(name).read_bytes())
    (folder / SOURCE_REF_FILE).write_bytes(Path(source_ref.__file__).read_bytes())  # the core's parser, standard library only
    if plan.gated:  # the gated model's class, beside app.py: the Space runs it without hfmerge or remote code
        from hfmerge.methods.gating.model import MODELING_FILE, modeling_source

        (folder / MODELING_FILE).write_text(modeling_source())
    if plan.emr:  # likewise the EMR model's class, which rebuilds each task's model
        from hfmerge.methods.emr.model import MODELING_FILE as EMR_MODELING_FILE
        from hfmerge.methods.emr.model import modeling_source as emr_modeling_source

        (folder / EMR_MODELING_FILE).write_text(emr_modeling_source())
    settings: dict[str, Any] = {"model": plan.model_ref, "sources": plan.sources}
    if plan.labels:
        settings["labels"] = plan.labels
    (folder / SPACE_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "README.md").write_text(space_card(plan, space_id))
    examples = folder / "examples"
    examples.mkdir()
    for i, example in enumerate(plan.examples):
        name = example.name if not (examples / example.name).exists() else f"{i}-{example.name}"
        (examples / name).write_bytes(example.data)


def space_card(plan: SpacePlan, space_id: str | None = None) -> str:
    """The Space README: the template's metadata and text, filled for this model and Space."""
    card = SpaceCard(resources.files(TEMPLATE_PACKAGE).joinpath("README.md").read_text(encoding="utf-8"))
    card.data.title = plan.title
    card.data.models = plan.hub_models
    if plan.license:
        card.data.license = plan.license
    try:
        import gradio

        card.data.sdk_version = gradio.__version__
    except ImportError:
        pass  # the template's version, the one hfmerge was released with
    shown = ", ".join(f"`{s}`" for s in plan.sources) or "none"
    intro = f"Model: `{plan.model_ref}`. Sources shown beside it: {shown}.\n\n"
    text = card.text.replace("# Merged model demo\n\n", f"# {plan.title}\n\n{intro}", 1)
    text = text.replace("SPACE_ID", space_id or "OWNER/SPACE")
    text = text.split("\nExample images:", 1)[0]  # the credits of the template's own photos, which it does not ship
    if plan.examples_note:
        text = f"{text.rstrip()}\n\nExample images: {plan.examples_note}\n"
    card.text = text
    return str(card)


def save_space(options: SpaceOptions, output: str | Path, *, overwrite: bool = False,
               token: str | bool | None = None) -> Path:
    """Write the Space folder to ``output`` atomically and return its path.

    With ``options.space_id`` set, the folder is checked as for the Hub (no
    local folders as models or sources) and can be pushed with :func:`push_space`.
    ``overwrite`` replaces only a folder holding an earlier Space (``space_config.json``) and no
    file but those hfmerge wrote there (see :func:`~hfmerge.publish.result.check_output_folder`).
    """
    check_output_folder(output, overwrite=overwrite, marker=SPACE_CONFIG_FILE)
    for_hub = options.space_id is not None
    if for_hub:
        _check_space_id(options.space_id)
    plan = plan_space(options, for_hub=for_hub, token=token).placed_in(Path(output).expanduser().resolve())
    with atomic_folder(output, overwrite=overwrite, marker=SPACE_CONFIG_FILE) as partial:
        write_space(plan, partial, options.space_id)
    return Path(output).expanduser().resolve()


def push_space(options: SpaceOptions, *, folder: str | Path | None = None,
               token: str | bool | None = None) -> tuple[str, str]:
    """Push the Space as a Gradio Space repo in one commit; create the repo if needed.

    ``folder`` is one written by :func:`save_space` with the same options;
    without it the Space is written to a temporary folder first. Example
    images the Space had before and no longer has are deleted in that commit.

    Returns:
        The Space's repo id and the commit URL.
    """
    from hfmerge.publish.hub import push_folder

    space_id = check_space_push(options, token=token)

    def push(path: str | Path) -> str:
        return push_folder(
            path, space_id, private=options.private, token=token, repo_type="space", space_sdk="gradio",
            commit_message=f"Demo of {options.model} with hfmerge", delete_patterns=["examples/*"],
        )

    if folder is not None:
        return space_id, push(folder)
    plan = plan_space(options, for_hub=True, token=token)
    with tempfile.TemporaryDirectory(prefix="hfmerge-space-") as tmp:
        write_space(plan, Path(tmp), space_id)
        return space_id, push(tmp)


def check_space_push(options: SpaceOptions, *, token: str | bool | None = None) -> str:
    """The Space's repo id, once the token is known to be able to create or write it.

    Called before anything is written or downloaded, so a push that cannot
    happen fails first, in one line.

    Raises:
        RecipeError: the Space id is not a valid repo id.
        PublishError: no token, an invalid one, or one without write access there.
    """
    from hfmerge.publish.hub import check_push_access

    if options.space_id is None and SourceSpec.parse(options.model).is_local:
        raise _local_model_refused(options.model)  # no Space id can be made from a folder's path
    space_id = options.space_id or f"{options.model.partition('@')[0]}-demo"
    _check_space_id(space_id, given=options.space_id is not None)
    check_push_access(space_id, token=token, repo_type="space")
    return space_id


def _local_model_refused(model: str) -> RecipeError:
    """Why a Space of a local folder cannot be pushed, and the two things the user can do instead."""
    return RecipeError(
        f"a Space loads its model from the Hub, and {model!r} is a local folder: push the merged model first "
        "(hfmerge merge ... --push-to-hub ORG/NAME) and name it by repo id, or pass --output FOLDER to write the "
        "Space's folder only"
    )


def _check_space_id(space_id: str, *, given: bool = True) -> None:
    """``space_id`` is a valid repo id; the error names --space-id only when the user gave it."""
    try:
        validate_repo_id(space_id)
    except HFValidationError:
        if given:
            raise RecipeError(f"--space-id {space_id!r} is not a valid repo id; write it as owner/name") from None
        raise RecipeError(f"the Space's default id {space_id!r} (the model's, with -demo) is not a valid repo id; "
                          "give one with --space-id owner/name") from None


def _read_recipe(folder: Path, where: str) -> dict:
    """The model's recipe, or ``{}`` where it has none; :class:`RecipeFileError` where it cannot be read."""
    path = folder / RECIPE_FILE
    return read_recipe(path.read_text(encoding="utf-8"), where) if path.is_file() else {}


def _recipe_sources(recipe: dict, model: ResolvedSource, *, for_hub: bool, warnings: list[str]) -> list[str]:
    """The merge's sources pinned to their commits; folders are kept only for a local Space that can reach them."""
    refs = []
    for entry in recipe.get("sources") or []:
        spec = SourceSpec.parse(entry)
        folder = spec.source_ref.path
        if spec.is_local:
            if not for_hub and folder.is_dir():
                refs.append(str(folder.resolve()))
            else:
                warnings.append(f"source {spec.model!r} of {model.name} is a local folder, which the Space cannot "
                                "load; it is left out (pass --sources with repo ids to show it)")
            continue
        pin = spec.commit or spec.revision
        refs.append(f"{spec.model}@{pin}" if pin else spec.model)
    return refs


def _checked_source(ref: str, *, for_hub: bool, token: str | bool | None) -> str:
    source = resolve_source(ref, token=token, metadata_only=True)
    if source.is_local:
        if for_hub:
            raise RecipeError(f"--sources {ref!r} is a local folder, which a Space cannot load; give a Hub repo id")
        return str(source.path)
    return source.spec.ref


def _relative_to(ref: str, home: Path) -> str:
    """``ref`` as ``space_config.json`` holds it in a Space at ``home``: a folder by its path from there
    (``../merged``; the app reads it from its own folder), a Hub repo as it is."""
    if not SourceSpec.parse(ref).is_local:
        return ref
    relative = Path(os.path.relpath(Path(ref).expanduser().resolve(), home)).as_posix()
    return relative if relative.startswith(".") else f"./{relative}"


def _example_datasets(recipe: dict[str, Any], card: Path) -> tuple[list[DataSpec], str]:
    """The datasets to draw examples from, and what they are to the model (for the Space's README).

    The model's evaluation data first (``eval_data`` in its ``hfmerge.yaml``, else the Hub datasets its card's
    ``model-index`` names, as ``hfmerge evaluate --update-card`` writes them), else the data the merge read;
    none when the model names neither.
    """
    evaluation = [DataSpec.parse(entry) for entry in recipe.get("eval_data") or []] or _card_datasets(card)
    if evaluation:
        return evaluation, "the model's evaluation data"
    merged_on = [DataSpec.parse(entry) for entry in recipe.get("data") or []]
    return merged_on, "the data the merge read"


def _card_datasets(card: Path) -> list[DataSpec]:
    """The Hub datasets a model card's ``model-index`` names, at their split and revision, once each."""
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(card) if card.is_file() else None
    except (ValueError, OSError) as exc:  # YAML errors are ValueErrors: a card we cannot read names nothing
        logger.debug("the card %s cannot be read: %s", card, exc)
        metadata = None
    specs: list[DataSpec] = []
    for entry in (metadata or {}).get("model-index") or []:
        for result in (entry.get("results") or [] if isinstance(entry, dict) else []):
            dataset = result.get("dataset") if isinstance(result, dict) else None
            if not isinstance(dataset, dict) or not source_ref.is_repo_id(str(dataset.get("type", ""))):
                continue  # a local folder's name: nothing to read
            revision = str(dataset["revision"]) if dataset.get("revision") else None
            pinned = revision is not None and source_ref.is_commit_sha(revision)
            spec = DataSpec(dataset=str(dataset["type"]), split=str(dataset["split"]) if dataset.get("split") else None,
                            revision=None if pinned else revision, commit=revision if pinned else None)
            if spec not in specs:
                specs.append(spec)
    return specs


def _drawn_examples(datasets: tuple[list[DataSpec], str], warnings: list[str]) -> tuple[list[SpaceExample], str]:
    """A few images of ``datasets`` (at most :data:`EXAMPLES`, spread over them), and the README's note on them.

    A dataset that cannot be read gives no examples and a warning; the Space works without them.
    """
    from hfmerge.data.load import load_image_data

    specs, role = datasets
    specs = list(dict.fromkeys(specs))[:EXAMPLES]
    examples: list[SpaceExample] = []
    names: list[str] = []
    for spec in specs:
        try:
            data = load_image_data(spec, samples=EXAMPLES // len(specs), seed=0)
        except HfMergeError as exc:
            warnings.append(f"no example images from {spec.ref}: {exc}; pass --examples to choose some")
            continue
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", data.name).strip("-")
        for i, image in enumerate(data.images):
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            examples.append(SpaceExample(f"{stem}-{i}.png", encoded.getvalue()))
        names.append(f"`{data.name}`")
    if not examples:
        return [], ""
    return examples, f"drawn from {', '.join(names)}, {role}."


MAX_LABELS = 20
"""The most labels a zero-shot Space starts with: each is embedded by the text tower at every prediction."""


def zero_shot_labels(specs: list[DataSpec]) -> list[str] | None:
    """The class names of ``specs`` (the model's evaluation data), in order, each once, at most :data:`MAX_LABELS`:
    what a zero-shot Space's labels box starts with. A name's first comma-separated part is kept (``"tench, Tinca
    tinca"`` → ``"tench"``), as the box separates labels by commas. ``None`` where no dataset can be read."""
    from hfmerge.data.load import load_image_data

    names: list[str] = []
    for spec in specs:
        try:
            data = load_image_data(spec, samples=1, seed=0)
        except HfMergeError:
            continue  # the examples' warning already says so
        names.extend(name.split(",")[0].strip() for name in data.label_names or [])
    return list(dict.fromkeys(name for name in names if name))[:MAX_LABELS] or None


def _checked_labels(labels: list[str]) -> list[str]:
    """``--labels`` as given, each once; a label with a comma is refused (the labels box splits on commas)."""
    for label in labels:
        if "," in label or not label.strip():
            raise RecipeError(f"--labels {label!r}: give each label as one word or phrase without commas, "
                              "e.g. --labels cat dog 'tabby cat'")
    return list(dict.fromkeys(label.strip() for label in labels))


def _examples(paths: list[str]) -> list[SpaceExample]:
    import PIL.Image

    checked = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise RecipeError(f"--examples {raw!r} does not exist; give image files (PNG, JPEG or WebP)")
        try:
            with PIL.Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError):
            raise RecipeError(f"--examples {raw!r} is not an image; give PNG, JPEG or WebP files") from None
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise RecipeError(f"--examples {raw!r}: name it .png, .jpg or .webp so the Space shows it")
        checked.append(SpaceExample(path.name, path.read_bytes()))
    return checked
