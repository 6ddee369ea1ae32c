"""The demo Space's models, without the interface: loading, prediction, segmentation maps, the merge's recipe.

``app.py`` is the Gradio interface and command line over this module; this
one imports no Gradio, so it runs (and is tested) where Gradio is not
installed. It ships in every Space that ``hfmerge space`` writes, and hfmerge
imports its constants (``hfmerge.spaces.inference``) so that the command and
the app agree on what the app can show.

Where the Hub cannot be used (``HF_HUB_OFFLINE`` is set, or one request to the
endpoint gets no answer), Hub models are loaded from the local cache only, at
once, instead of after huggingface_hub's retries for every file; what did not
load is a note that the page and ``/predict`` both show.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import transformers
import yaml
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

if __package__:  # hfmerge.spaces, installed with hfmerge
    from hfmerge.source_ref import SourceRef, SourceRefError, parse_source_ref
else:
    try:  # a Space: hfmerge space wrote the parser beside app.py
        from source_ref import SourceRef, SourceRefError, parse_source_ref
    except ModuleNotFoundError:  # `python spaces/app.py` in hfmerge's source tree: the parser is hfmerge's
        from hfmerge.source_ref import SourceRef, SourceRefError, parse_source_ref

TOP_K = 5
OVERLAY_SIDE = 512            # segmentation maps are drawn at most this large
LEGEND_CLASSES = 10           # classes named in an overlay's legend
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RECIPE_FILE = "hfmerge.yaml"
PROBE_TIMEOUT = 5.0           # seconds the Hub endpoint has to answer before models come from the cache only

# What each head architecture returns, by the class-name suffix transformers uses. The app runs without
# hfmerge, so it keeps this table itself; a test checks it against hfmerge's adapters.
HEAD_KINDS = {
    "ForImageClassification": "classification",
    "ForImageClassificationWithTeacher": "classification",  # DeiT's: the mean of its class and distillation heads
    "ForSemanticSegmentation": "segmentation",
    "ForUniversalSegmentation": "segmentation",
    "CLIPModel": "zero-shot",
    "CLIPVisionModel": "zero-shot",
    "CLIPVisionModelWithProjection": "zero-shot",
}
ZERO_SHOT_PROMPT = "a photo of a {}."  # CLIP's default prompt; the labels the user types fill it
DEFAULT_LABELS = ("cat", "dog", "bird")
GATED_MODEL_TYPE = "hfmerge-gated-vit"  # a gated merge's config.model_type, whichever method (a plug-in's too) made it
EMR_MODEL_TYPE = "hfmerge-emr"  # an EMR merge's: one model per task, each shown with its own prediction
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a Space on GPU hardware uses it


class ModelLoadError(Exception):
    """A model could not be loaded; the message is one line for the user."""


class RecipeFileError(ValueError):
    """A model's ``hfmerge.yaml`` cannot be read as a recipe; the message names the file and the problem."""


def head_kind(architecture: str) -> str | None:
    """``classification``, ``segmentation`` or ``zero-shot`` (a CLIP model, or a CLIP image encoder beside a CLIP
    model's text tower) for a transformers class name the app can show, else ``None``."""
    return next((kind for suffix, kind in HEAD_KINDS.items() if architecture.endswith(suffix)), None)


# --------------------------------------------------------------------------- the Hub or the cache


def hub_unreachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why Hub models cannot be downloaded now, or ``None`` when they can.

    ``HF_HUB_OFFLINE`` is honoured. Otherwise one request, without retries,
    asks the endpoint for any answer (an HTTP error status is an answer).
    """
    if hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = endpoint or hf_constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        exc.close()
    except urllib.error.URLError as exc:
        return f"the Hub at {endpoint} cannot be reached ({exc.reason})"
    except (OSError, http.client.HTTPException) as exc:
        return f"the Hub at {endpoint} cannot be reached ({exc or type(exc).__name__})"
    return None


@dataclass
class HubAccess:
    """Whether Hub models are downloaded or taken from the local cache only; the Hub is asked once, when needed."""

    reason: str | None = None
    checked: bool = False

    def local_only(self, ref: SourceRef) -> bool:
        """Whether ``ref`` must come from the local cache (folders never touch the Hub)."""
        if ref.is_folder:
            return False
        if not self.checked:
            self.checked = True
            self.reason = hub_unreachable()
        return self.reason is not None

    @property
    def note(self) -> str | None:
        if self.reason is None:
            return None
        return f"Models on the Hub were loaded from the local cache only: {self.reason}."


# --------------------------------------------------------------------------- models


@dataclass
class Prediction:
    """One model's answer for one image.

    Attributes:
        top: the best labels with scores (probabilities, or pixel shares for segmentation).
        overlay: for segmentation, the base image and one mask per legend class.
        gate: for a gated merge, the gate's probability of each task.
    """

    top: list[dict[str, Any]]
    overlay: tuple[PIL.Image.Image, list[tuple[np.ndarray, str]]] | None = None
    gate: dict[str, float] | None = None


@dataclass
class DemoModel:
    """A loaded model with its image processor and what its head returns."""

    name: str
    model: torch.nn.Module
    processor: Any
    kind: str
    labels: dict[int, str]
    text: Any = None
    """For ``zero-shot``: the ``CLIPModel`` whose text tower embeds the labels (the model itself, or the merged
    model's for a CLIP image encoder), with its ``tokenizer`` attribute set."""

    @torch.inference_mode()
    def predict(self, image: PIL.Image.Image, labels: list[str] | None = None) -> Prediction:
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        parameter = next(self.model.parameters())
        pixel_values = pixel_values.to(parameter.device, parameter.dtype)
        if self.kind == "zero-shot":
            return self._zero_shot(pixel_values, list(labels or DEFAULT_LABELS))
        outputs = self.model(pixel_values=pixel_values)
        gate = _gate_probabilities(self.model, outputs)
        if self.kind == "classification":
            return Prediction(top=self._top_labels(outputs.logits[0].float().softmax(-1)), gate=gate)
        label_map, shown = segment(outputs, image.size, self.processor)
        counts = torch.bincount(label_map.flatten(), minlength=len(self.labels)).float()
        shares = counts / counts.sum()
        legend = [int(i) for i in shares.argsort(descending=True)[:LEGEND_CLASSES] if shares[i] > 0]
        masks = [((label_map == i).numpy().astype(np.float32), self._label(i)) for i in legend]
        top = [{"label": self._label(i), "score": round(float(shares[i]), 4)} for i in legend[:TOP_K]]
        return Prediction(top=top, overlay=(image.resize(shown), masks), gate=gate)

    def _zero_shot(self, pixel_values: torch.Tensor, labels: list[str]) -> Prediction:
        """CLIP's zero-shot answer: the softmax of the scaled cosines between the image and each label's prompt."""
        text = self.text
        tokens = text.tokenizer([ZERO_SHOT_PROMPT.format(label) for label in labels], padding=True,
                                truncation=True, max_length=text.config.text_config.max_position_embeddings,
                                return_tensors="pt").to(DEVICE)
        texts = text.text_projection(text.text_model(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens["attention_mask"]).pooler_output)
        encoder = getattr(self.model, "vision_model", None) or self.model
        projection = getattr(self.model, "visual_projection", None) or text.visual_projection
        images = projection(encoder(pixel_values=pixel_values).pooler_output)
        images, texts = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (images, texts))
        probabilities = (text.logit_scale.exp().float() * images @ texts.T)[0].softmax(-1)
        self.labels = dict(enumerate(labels))
        return Prediction(top=self._top_labels(probabilities))

    def _top_labels(self, probabilities: torch.Tensor) -> list[dict[str, Any]]:
        values, indices = probabilities.topk(min(TOP_K, probabilities.numel()))
        return [{"label": self._label(int(i)), "score": round(float(v), 4)} for v, i in zip(values, indices)]

    def _label(self, index: int) -> str:
        return str(self.labels.get(index, f"LABEL_{index}"))


def segment(outputs: Any, image_size: tuple[int, int], processor: Any = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-pixel class indices at display size, and that size (width, height).

    The map is drawn at the image's size, at most OVERLAY_SIDE pixels on its
    long side. The image processor's own ``post_process_semantic_segmentation``
    makes it where the processor has one (SegFormer, MobileNetV2, Mask2Former);
    otherwise it is made here the same way: semantic heads give class logits
    at a reduced resolution, Mask2Former per-query class scores and masks whose
    semantic map is Σ_q softmax(class_q)[:-1] · sigmoid(mask_q), the "no
    object" class dropped; either is upsampled bilinearly before the argmax.
    """
    width, height = image_size
    scale = min(1.0, OVERLAY_SIDE / max(width, height))
    shown = (max(1, round(width * scale)), max(1, round(height * scale)))
    post_process = getattr(processor, "post_process_semantic_segmentation", None)
    if post_process is not None:
        return post_process(outputs, target_sizes=[(shown[1], shown[0])])[0].cpu(), shown
    if getattr(outputs, "class_queries_logits", None) is not None:
        classes = outputs.class_queries_logits[0].float().softmax(-1)[:, :-1]
        masks = outputs.masks_queries_logits[0].float().sigmoid()
        scores = torch.einsum("qc,qhw->chw", classes, masks)
    else:
        scores = outputs.logits[0].float()
    scores = torch.nn.functional.interpolate(scores[None], size=(shown[1], shown[0]), mode="bilinear",
                                             align_corners=False)[0]
    return scores.argmax(0).cpu(), shown


def _gate_probabilities(model: torch.nn.Module, outputs: Any) -> dict[str, float] | None:
    """A gated merge's outputs carry ``gate_probs`` (batch × tasks); its config may name the tasks."""
    probabilities = getattr(outputs, "gate_probs", None)
    if probabilities is None:
        return None
    names = list(getattr(model.config, "gate_labels", None) or [])
    row = probabilities[0].float()
    return {(names[i] if i < len(names) else f"task {i}"): round(float(p), 4) for i, p in enumerate(row)}


def _parse(ref: str) -> SourceRef:
    try:
        return parse_source_ref(ref)
    except SourceRefError as exc:
        raise ModelLoadError(str(exc)) from None


def fetch_file(ref: str, filename: str, *, local_only: bool = False) -> Path | None:
    """``filename`` from a model folder or Hub repo, or ``None`` where it has none."""
    parsed = _parse(ref)
    if parsed.is_folder:
        path = parsed.path / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(parsed.model, filename, revision=parsed.revision,
                                    local_files_only=local_only))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def read_recipe(text: str, where: str) -> dict[str, Any]:
    """An ``hfmerge.yaml`` recipe as a mapping.

    Raises:
        RecipeFileError: the text is not YAML, or not a mapping; the message names ``where``.
    """
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeFileError(f"{where} is not valid YAML: {problem}{at}") from None
    if not isinstance(loaded, dict):
        raise RecipeFileError(f"{where} is not a recipe (a YAML mapping with method and sources)")
    return loaded


def merge_metadata(ref: str, *, local_only: bool = False) -> dict[str, Any] | None:
    """The ``hfmerge.yaml`` recipe of a merged model, or ``None`` for a model that has none.

    Raises:
        RecipeFileError: the model has an ``hfmerge.yaml`` that cannot be read.
    """
    try:
        path = fetch_file(ref, RECIPE_FILE, local_only=local_only)
        text = path.read_text(encoding="utf-8") if path else None
    except (OSError, ValueError, HfHubHTTPError, ModelLoadError):
        return None
    if text is None:
        return None
    return read_recipe(text, f"{_parse(ref).display_name}/{RECIPE_FILE}")


def is_gated(ref: str, *, local_only: bool = False) -> bool:
    """Whether ``ref`` is a gated merge: its ``config.json`` names :data:`GATED_MODEL_TYPE`.

    Told by the model, not by the name of the method in its ``hfmerge.yaml``: a plug-in's method may
    make a gated model under a name of its own.
    """
    return model_type(ref, local_only=local_only) == GATED_MODEL_TYPE


def model_type(ref: str, *, local_only: bool = False) -> str | None:
    """The ``model_type`` in ``ref``'s ``config.json``; ``None`` where it cannot be read (loading says why)."""
    try:
        path = fetch_file(ref, "config.json", local_only=local_only)
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") if path is not None else None
    except (OSError, ValueError, AttributeError, HfHubHTTPError, ModelLoadError):
        return None


def recipe_sources(metadata: dict[str, Any] | None) -> list[str]:
    """The sources of a merge, pinned to the commits it was made from."""
    refs = []
    for entry in (metadata or {}).get("sources") or []:
        if isinstance(entry, str):
            refs.append(entry)
        elif isinstance(entry, dict) and entry.get("model"):
            pin = entry.get("commit") or entry.get("revision")
            refs.append(f"{entry['model']}@{pin}" if pin else str(entry["model"]))
    return refs


def load_model(ref: str, *, gated: bool = False, local_only: bool = False) -> DemoModel:
    """Load a classification or segmentation model by repo id (``@revision`` allowed) or folder.

    With ``local_only``, a Hub model comes from the local cache and no request is made.

    Raises:
        ModelLoadError: the model does not exist, cannot be read, or has a head this demo cannot show.
    """
    parsed = _parse(ref)
    name = parsed.display_name
    if parsed.is_folder and not parsed.path.is_dir():
        raise ModelLoadError(f"folder {ref} does not exist; give a model folder or a Hub repo id org/name")
    where = {"revision": parsed.revision, "local_files_only": local_only}
    try:
        if gated:  # its own model class, which hfmerge loads without running the repository's code
            model = _load_gated(ref, **where)
            kind = "classification"
        else:
            config = transformers.AutoConfig.from_pretrained(parsed.model, trust_remote_code=False, **where)
            architecture = (getattr(config, "architectures", None) or [""])[0]
            kind = head_kind(architecture)
            model_class = getattr(transformers, architecture, None) if kind else None
            if model_class is None:
                raise ModelLoadError(
                    f"{name} is a {architecture or config.model_type} model; this demo shows image classification "
                    "and segmentation models"
                )
            model = model_class.from_pretrained(parsed.model, **where)
        processor = transformers.AutoImageProcessor.from_pretrained(parsed.model, **where)
        text = None
        if kind == "zero-shot" and hasattr(model, "text_model"):
            text = model
            text.tokenizer = transformers.AutoTokenizer.from_pretrained(parsed.model, **where)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, HfHubHTTPError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        cache = " from the local cache" if local_only else ""
        raise ModelLoadError(f"{name} could not be loaded{cache}: {first}") from None
    labels = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if kind == "zero-shot":
        labels = {}
    return DemoModel(name=name, model=model.to(DEVICE).eval(), processor=processor, kind=kind, labels=labels,
                     text=text)


def load_emr_tasks(ref: str, *, local_only: bool = False) -> tuple[DemoModel | None, list[DemoModel]]:
    """Each task's model of an EMR merge, by its own class (never the repository's code): one DemoModel per task,
    named ``<merge> · <task>``, with that task's head and labels; and, where the merge has a gate, the merge
    itself given no task id (``<merge> · the gate's choice``: the gate picks the task, whose prediction it shows
    over the union of the labels, with the gate's probabilities), else ``None``.

    Raises:
        ModelLoadError: the merge cannot be read, or its sources have a head this demo cannot show.
    """
    try:
        from modeling_hfmerge_emr import EmrMergedModel
    except ImportError:
        try:
            from hfmerge.methods.emr.emr_model import EmrMergedModel
        except ImportError:
            raise ModelLoadError(f"{ref} is an EMR merge: put modeling_hfmerge_emr.py (hfmerge space writes it) "
                                 "beside app.py, or install hfmerge") from None
    parsed = _parse(ref)
    where = {"revision": parsed.revision, "local_files_only": local_only}
    try:
        merge = EmrMergedModel.from_pretrained(parsed.model, **where).eval()
        kind = head_kind(merge.config.source["architectures"][0])
        if kind is None:
            raise ModelLoadError(f"{parsed.display_name} merges {merge.config.source['architectures'][0]} models; "
                                 "this demo shows image classification and segmentation models")
        processor = transformers.AutoImageProcessor.from_pretrained(parsed.model, **where)
        merge.kept_task_models = merge.config.num_tasks  # each task's model built once: the gate's choice reuses it
        tasks = [merge.task_model(i) for i in range(merge.config.num_tasks)]
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, HfHubHTTPError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{parsed.display_name} could not be loaded: {first}") from None
    models = [DemoModel(name=f"{parsed.display_name} · {task}", model=model.to(DEVICE).eval(), processor=processor,
                        kind=kind, labels={int(k): str(v) for k, v in model.config.id2label.items()})
              for task, model in zip(merge.config.tasks, tasks)]
    routed = None
    if getattr(merge.config, "gate", None) is not None:
        routed = DemoModel(name=f"{parsed.display_name} · the gate's choice", model=merge.to(DEVICE).eval(),
                           processor=processor, kind=kind,
                           labels={int(k): str(v) for k, v in merge.config.id2label.items()})
    return routed, models


def _load_gated(ref: str, **where: Any) -> torch.nn.Module:
    """A gated merge by its own class, never by running the repository's code.

    The class comes from the copy of its modeling file that ``hfmerge space`` writes beside this app, or
    from hfmerge where that is installed.
    """
    try:
        from modeling_hfmerge_gated import GatedMergedForImageClassification
    except ImportError:
        try:
            from hfmerge.methods.gating.model import GatedMergedForImageClassification
        except ImportError:
            raise ModelLoadError(f"{ref} is a gated merge: put modeling_hfmerge_gated.py (hfmerge space writes it) "
                                 "beside app.py, or install hfmerge") from None
    return GatedMergedForImageClassification.from_pretrained(_parse(ref).model, **where)


@dataclass
class DemoModels:
    """The merged model, the sources that loaded, and notes on what did not."""

    merged: DemoModel
    sources: list[DemoModel]
    metadata: dict[str, Any] | None
    card: str
    card_files: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    gated: bool = False
    """The merged model is a gated merge (or an EMR merge with a gate, given no task id): its answers carry the
    gate's task probabilities."""
    tasks: list[DemoModel] = field(default_factory=list)
    """An EMR merge's model of each task: each shows its own prediction. ``merged`` is the first, or, where the
    merge has a gate, the merge given no task id (the gate's choice)."""

    @property
    def task(self) -> str:
        return {"classification": "image-classification", "zero-shot": "zero-shot-image-classification"}.get(
            self.merged.kind, "image-segmentation")

    @property
    def merged_models(self) -> list[DemoModel]:
        """What the merge shows: its one model, or an EMR merge's model of each task (after the gate's choice)."""
        if not self.tasks:
            return [self.merged]
        return [self.merged, *self.tasks] if self.gated else self.tasks

    def predict(self, image: PIL.Image.Image,
                labels: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Prediction]]:
        """Every model's prediction, and the JSON that ``/predict`` returns (the load notes included).

        ``labels`` are the classes a zero-shot model (CLIP) chooses among (default: :data:`DEFAULT_LABELS`).

        An EMR merge answers once per task: ``"tasks"`` maps each task's model (``<merge> · <task>``) to its
        answer, and ``"merged"`` is ``None``, or, where the merge has a gate, the answer of the task the gate
        picks (``"gate"``: its probabilities).
        """
        answers = {m.name: m.predict(image, labels) for m in [*self.merged_models, *self.sources]}
        merged = answers[self.merged.name]
        payload = {
            "task": self.task,
            "merged": merged.top if self.gated or not self.tasks else None,
            "tasks": {m.name: answers[m.name].top for m in self.tasks} if self.tasks else None,
            "sources": {m.name: answers[m.name].top for m in self.sources},
            "gate": merged.gate,
            "notes": list(self.notes),
        }
        return payload, answers


def load_demo(model: str, sources: list[str] | None = None, *, hub: HubAccess | None = None) -> DemoModels:
    """Load the merged model and its sources: ``sources``, or by default those its ``hfmerge.yaml`` names.

    A source that fails to load becomes a note, and so does an ``hfmerge.yaml``
    that cannot be read (the model is then shown alone); the merged model
    failing is an error.
    """
    hub = hub or HubAccess()
    local_only = hub.local_only(_parse(model))
    notes = []
    try:
        metadata = merge_metadata(model, local_only=local_only)
    except RecipeFileError as exc:
        metadata = None
        if sources is None:
            sources = []
            notes.append(f"{exc}, so the model is shown alone.")
    kind = model_type(model, local_only=local_only)
    gated, tasks = kind == GATED_MODEL_TYPE, []
    try:
        if kind == EMR_MODEL_TYPE:
            routed, tasks = load_emr_tasks(model, local_only=local_only)
            merged, gated = routed or tasks[0], routed is not None
        else:
            merged = load_model(model, gated=gated, local_only=local_only)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc} ({hub.reason})" if local_only else str(exc)) from None
    if metadata is None and sources is None:
        notes.append(f"{merged.name} was not made by hfmerge (it has no {RECIPE_FILE}), so it is shown alone.")
    loaded = []
    for ref in recipe_sources(metadata) if sources is None else sources:
        try:
            loaded.append(load_model(ref, local_only=hub.local_only(_parse(ref))))
        except ModelLoadError as exc:
            notes.append(f"Source not shown: {exc}.")
    for source in [s for s in loaded if s.kind == "zero-shot" and s.text is None]:  # a CLIP image encoder
        if merged.text is None:
            loaded.remove(source)
            notes.append(f"Source not shown: {source.name} is a CLIP image encoder and the merge has no text tower "
                         "to score it.")
        source.text = merged.text  # the merge's text tower is the base's, which the sources were fine-tuned beside
    if merged.kind == "zero-shot" and merged.text is None:
        raise ModelLoadError(f"{merged.name} is a CLIP image encoder with no text tower: merge it with "
                             "--output-format clip and a CLIPModel --base to show it zero-shot")
    if hub.note:
        notes.insert(0, hub.note)
    seen = {m.name for m in [merged, *tasks]}
    for source in loaded:  # names key the JSON answer, so two models never share one
        base, n = source.name, 2
        while source.name in seen:
            source.name, n = f"{base} ({n})", n + 1
        seen.add(source.name)
    card, card_files = read_card(model, local_only=local_only)
    return DemoModels(merged=merged, sources=loaded, metadata=metadata, card=card, card_files=card_files,
                      notes=notes, gated=gated, tasks=tasks)


def read_card(ref: str, *, local_only: bool = False) -> tuple[str, dict[str, Path]]:
    """The model card's evaluation section (Markdown, images removed) and its plot files by path.

    A card without such a section but with ``model-index`` metadata gets a table made from it.
    """
    try:
        path = fetch_file(ref, "README.md", local_only=local_only)
        text = path.read_text(encoding="utf-8") if path else ""
    except (OSError, ValueError, HfHubHTTPError):
        return "", {}
    body = text.split("---", 2)[2] if text.startswith("---") and text.count("---") >= 2 else text
    match = re.search(r"^## [^\n]*Evaluation[^\n]*\n(.*?)(?=^## |\Z)", body, flags=re.M | re.S)
    if not match:
        return model_index_table(text), {}
    section = match.group(0)
    plots: dict[str, Path] = {}
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)", section):
        relative = target.removeprefix("./")
        if "://" in target or relative.startswith("/") or ".." in Path(relative).parts:
            continue  # only files inside the model's own repo or folder
        try:
            local = fetch_file(ref, relative, local_only=local_only)
        except (OSError, ValueError, HfHubHTTPError):
            local = None
        if local is not None:
            plots[target] = local
    return re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", section).strip(), plots


def model_index_table(text: str) -> str:
    """A Markdown ``## Evaluation`` table of a card's ``model-index`` results; empty when it has none."""
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except (ValueError, yaml.YAMLError):
        return ""
    results = getattr(data, "eval_results", None) or []
    if not results:
        return ""
    lines = [f"## Evaluation of {data.model_name}" if data.model_name else "## Evaluation", "",
             "| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
    for result in results:
        cells = [result.task_name or result.task_type, result.dataset_name or result.dataset_type,
                 result.dataset_split or "", result.metric_name or result.metric_type,
                 f"{result.metric_value:.4f}" if isinstance(result.metric_value, float) else result.metric_value]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
