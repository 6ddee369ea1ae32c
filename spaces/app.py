"""Try a merged vision model beside the models it was made from.

A Gradio app that runs as a Hugging Face Space (``hfmerge space`` writes this
file next to ``space_config.json``, ``requirements.txt``, ``README.md`` and
``examples/``) or locally on any merged folder or repo id::

    python app.py --model ./merged
    python app.py --model me/vit-merged --sources org/a org/b

One image goes to every model; the merged model's top-5 labels (or, for a
segmentation model, a colour overlay with a legend) sit beside each source's.
Static merges load with plain transformers, so the Space needs nothing of
hfmerge; a gated merge loads with ``hfmerge.load``. Remote code is never run.

The ``/predict`` endpoint returns JSON::

    {"task": ..., "merged": [{"label", "score"}, ...], "sources": {name: [...]}, "gate": {...} | null, "notes": [...]}

For segmentation a label's score is the share of pixels given that label.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch
import transformers
import yaml
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "space_config.json"
EXAMPLES_DIR = HERE / "examples"

TOP_K = 5
MAX_UPLOAD = "20mb"           # refused by the server before the app sees it
MAX_PIXELS = 50_000_000       # refused after reading the image header, before decoding
MAX_SIDE = 2048               # larger images are scaled down before inference
OVERLAY_SIDE = 512            # segmentation maps are drawn at most this large
LEGEND_CLASSES = 10           # classes named in an overlay's legend
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# What each head architecture returns, by the class-name suffix transformers uses.
HEAD_KINDS = {
    "ForImageClassification": "classification",
    "ForSemanticSegmentation": "segmentation",
    "ForUniversalSegmentation": "segmentation",
}
GATED_METHODS = {"gating"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a Space on GPU hardware uses it


class ModelLoadError(Exception):
    """A model could not be loaded; the message is one line for the user."""


class UserError(gr.Error):
    """A message for the person using the demo, shown in place of a result; no traceback in the log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, title="Cannot use this input", print_exception=False)


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

    @torch.inference_mode()
    def predict(self, image: PIL.Image.Image) -> Prediction:
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        parameter = next(self.model.parameters())
        outputs = self.model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
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


def split_ref(ref: str) -> tuple[str, str | None]:
    """``org/name@revision`` → (``org/name``, revision); a folder path stays whole."""
    if Path(ref).expanduser().exists() or "@" not in ref:
        return ref, None
    repo_id, _, revision = ref.rpartition("@")
    return repo_id, revision or None


def display_name(ref: str) -> str:
    """How the UI names a model: the repo id with a short commit, or the folder's name."""
    repo_id, revision = split_ref(ref)
    if Path(repo_id).expanduser().is_dir():
        return Path(repo_id).expanduser().resolve().name
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        revision = revision[:7]
    return f"{repo_id}@{revision}" if revision else repo_id


def fetch_file(ref: str, filename: str) -> Path | None:
    """``filename`` from a model folder or Hub repo, or ``None`` where it has none."""
    repo_id, revision = split_ref(ref)
    folder = Path(repo_id).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def merge_metadata(ref: str) -> dict[str, Any] | None:
    """The ``hfmerge.yaml`` recipe of a merged model, or ``None`` for any other model."""
    try:
        path = fetch_file(ref, "hfmerge.yaml")
        loaded = yaml.safe_load(path.read_text()) if path else None
    except (OSError, ValueError, HfHubHTTPError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


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


def load_model(ref: str, *, gated: bool = False) -> DemoModel:
    """Load a classification or segmentation model by repo id (``@revision`` allowed) or folder.

    Raises:
        ModelLoadError: the model does not exist, cannot be read, or has a head this demo cannot show.
    """
    repo_id, revision = split_ref(ref)
    name = display_name(ref)
    if ref.startswith((".", "/", "~")) and not Path(repo_id).expanduser().is_dir():
        raise ModelLoadError(f"folder {ref} does not exist; give a model folder or a Hub repo id org/name")
    try:
        config = transformers.AutoConfig.from_pretrained(repo_id, revision=revision, trust_remote_code=False)
        architecture = (getattr(config, "architectures", None) or [""])[0]
        kind = next((k for suffix, k in HEAD_KINDS.items() if architecture.endswith(suffix)), None)
        model_class = getattr(transformers, architecture, None) if kind else None
        if model_class is None and not gated:
            raise ModelLoadError(
                f"{name} is a {architecture or config.model_type} model; this demo shows image classification "
                "and segmentation models"
            )
        if gated:
            model = _load_gated(ref)
            kind = kind or "classification"
        else:
            model = model_class.from_pretrained(repo_id, revision=revision)
        processor = transformers.AutoImageProcessor.from_pretrained(repo_id, revision=revision)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, HfHubHTTPError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{name} could not be loaded: {first}") from None
    labels = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    return DemoModel(name=name, model=model.to(DEVICE).eval(), processor=processor, kind=kind, labels=labels)


def _load_gated(ref: str) -> torch.nn.Module:
    try:
        import hfmerge
    except ImportError:
        raise ModelLoadError(f"{ref} is a gated merge; install hfmerge (`pip install hfmerge`) to load it") from None
    return hfmerge.load(ref)


@dataclass
class DemoModels:
    """The merged model, the sources that loaded, and notes on what did not."""

    merged: DemoModel
    sources: list[DemoModel]
    metadata: dict[str, Any] | None
    card: str
    card_files: dict[str, Path]
    notes: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return "image-classification" if self.merged.kind == "classification" else "image-segmentation"

    def predict(self, image: PIL.Image.Image) -> tuple[dict[str, Any], dict[str, Prediction]]:
        """Every model's prediction, and the JSON that ``/predict`` returns."""
        answers = {m.name: m.predict(image) for m in [self.merged, *self.sources]}
        merged = answers[self.merged.name]
        payload = {
            "task": self.task,
            "merged": merged.top,
            "sources": {m.name: answers[m.name].top for m in self.sources},
            "gate": merged.gate,
        }
        return payload, answers


def load_demo(model: str, sources: list[str] | None = None) -> DemoModels:
    """Load the merged model and its sources: ``sources``, or by default those its ``hfmerge.yaml`` names.

    A source that fails to load becomes a note; the merged model failing is an error.
    """
    metadata = merge_metadata(model)
    gated = bool(metadata and metadata.get("method") in GATED_METHODS)
    merged = load_model(model, gated=gated)
    notes = []
    if metadata is None and sources is None:
        notes.append(f"{merged.name} was not made by hfmerge (it has no hfmerge.yaml), so it is shown alone.")
    loaded = []
    for ref in recipe_sources(metadata) if sources is None else sources:
        try:
            loaded.append(load_model(ref))
        except ModelLoadError as exc:
            notes.append(f"Source not shown: {exc}.")
    seen = {merged.name}
    for source in loaded:  # names key the JSON answer, so two models never share one
        base, n = source.name, 2
        while source.name in seen:
            source.name, n = f"{base} ({n})", n + 1
        seen.add(source.name)
    card, card_files = read_card(model)
    return DemoModels(merged=merged, sources=loaded, metadata=metadata, card=card, card_files=card_files,
                      notes=notes)


def read_card(ref: str) -> tuple[str, dict[str, Path]]:
    """The model card's evaluation section (Markdown, images removed) and its plot files by path."""
    try:
        path = fetch_file(ref, "README.md")
        text = path.read_text(encoding="utf-8") if path else ""
    except (OSError, ValueError, HfHubHTTPError):
        return "", {}
    body = text.split("---", 2)[2] if text.startswith("---") and text.count("---") >= 2 else text
    match = re.search(r"^## [^\n]*Evaluation[^\n]*\n(.*?)(?=^## |\Z)", body, flags=re.M | re.S)
    if not match:
        return "", {}
    section = match.group(0)
    plots: dict[str, Path] = {}
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)", section):
        relative = target.removeprefix("./")
        if "://" in target or relative.startswith("/") or ".." in Path(relative).parts:
            continue  # only files inside the model's own repo or folder
        try:
            local = fetch_file(ref, relative)
        except (OSError, ValueError, HfHubHTTPError):
            local = None
        if local is not None:
            plots[target] = local
    return re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", section).strip(), plots


# --------------------------------------------------------------------------- input


def open_image(path: str | os.PathLike[str]) -> tuple[PIL.Image.Image, list[str]]:
    """Open an upload as RGB, refusing what is not an image or too large, scaling down what is big.

    Raises:
        UserError: a message for the user, shown in place of a result.
    """
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UserError(
                    f"{name} is {width}×{height} pixels; images up to {MAX_PIXELS / 1e6:g} megapixels are "
                    "accepted: scale it down and try again"
                )
            notes = []
            if max(width, height) > MAX_SIDE:
                image.draft("RGB", (MAX_SIDE, MAX_SIDE))
                image.thumbnail((MAX_SIDE, MAX_SIDE))
                notes.append(f"The image was scaled down from {width}×{height} to {image.width}×{image.height}.")
            image = image.convert("RGB")
    except UserError:
        raise
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise UserError(f"{name} is not an image this demo can read, or is too large: upload a PNG, JPEG or WebP") \
            from None
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"{name} could not be decoded (a damaged or unsupported file): upload a PNG, JPEG or WebP") \
            from None
    return image, notes


def image_input(**kwargs: Any) -> gr.Image:
    """``gr.Image`` whose upload check gives the user a message instead of a server error.

    Gradio opens every upload with PIL before the event runs; a file that is
    not an image would fail there. (Wrapping the instance, not subclassing:
    Gradio writes a ``.pyi`` stub beside the file of every component subclass.)
    """
    image = gr.Image(**kwargs)
    preprocess = image.preprocess

    def preprocess_or_explain(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, ValueError, SyntaxError):
            shown = getattr(payload, "orig_name", None) or "the upload"
            raise UserError(f"{shown} is not an image this demo can read: upload a PNG, JPEG or WebP") from None

    image.preprocess = preprocess_or_explain  # type: ignore[method-assign]
    return image


# --------------------------------------------------------------------------- interface


def label_colours(models: list[DemoModel]) -> dict[str, str]:
    """One colour per label name, the same in every overlay, so models compare at a glance."""
    colours = {}
    for model in models:
        for label in model.labels.values():
            hue = int(hashlib.md5(label.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
            colours[label] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
    return colours


def build_demo(demo_models: DemoModels, *, examples: list[Path] | None = None) -> gr.Blocks:
    """The Blocks interface: one image in; merged and source predictions side by side; JSON at ``/predict``."""
    models = [demo_models.merged, *demo_models.sources]
    metadata = demo_models.metadata or {}
    segmentation = demo_models.merged.kind == "segmentation"
    colours = label_colours(models) if segmentation else None
    if examples is None:
        examples = sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    def predict_json(path: str | None) -> dict[str, Any]:
        """Predictions of the merged model and each source for one image, as JSON."""
        if path is None:
            raise UserError("no image was given: upload an image file")
        image, notes = open_image(path)
        payload, _ = demo_models.predict(image)
        payload["notes"] = notes
        return payload

    def show(path: str | None) -> list[Any]:
        if path is None:
            return [None] * len(outputs) + ([None] if gate_box else []) + [None, ""]
        image, notes = open_image(path)
        payload, answers = demo_models.predict(image)
        payload["notes"] = notes
        values: list[Any] = []
        for model in models:
            answer = answers[model.name]
            if segmentation:
                values.append(answer.overlay)
            values.append({t["label"]: t["score"] for t in answer.top})
        if gate_box:
            values.append(payload["gate"])
        return values + [payload, "\n".join(f"- {n}" for n in notes)]

    method = metadata.get("method")
    with gr.Blocks(title=f"{demo_models.merged.name} — hfmerge demo") as demo:
        gr.Markdown(f"# {demo_models.merged.name}")
        if method:
            gr.Markdown(
                f"Merged with hfmerge by **{method}** from "
                f"{len(recipe_sources(metadata))} models. Drop an image to compare the merged model with its "
                "sources."
            )
        else:
            gr.Markdown("Drop an image to see what the model predicts.")
        if demo_models.notes:
            gr.Markdown("\n".join(f"- {n}" for n in demo_models.notes), elem_id="load-notes")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                image = image_input(type="filepath", sources=["upload", "webcam", "clipboard"], label="Image",
                                    elem_id="input-image")
                if examples:
                    gr.Examples(examples=[[str(p)] for p in examples], inputs=image, cache_examples=False)
                notes_box = gr.Markdown(elem_id="image-notes")
                gate_box = (gr.Label(num_top_classes=len(metadata.get("sources") or []) or None,
                                     label="Gate: probability of each task", elem_id="gate")
                            if method in GATED_METHODS else None)
            with gr.Column(scale=3):
                with gr.Row(equal_height=False):
                    outputs = []
                    for i, model in enumerate(models):
                        title = f"Merged: {model.name}" if i == 0 else f"Source: {model.name}"
                        elem_id = "merged" if i == 0 else f"source-{i}"
                        with gr.Column(min_width=220):
                            if segmentation:
                                outputs.append(gr.AnnotatedImage(label=title, color_map=colours,
                                                                 elem_id=f"{elem_id}-overlay"))
                            outputs.append(gr.Label(
                                num_top_classes=TOP_K, elem_id=elem_id,
                                label="Share of pixels" if segmentation else title,
                            ))
        with gr.Accordion("JSON: what the /predict endpoint returns", open=False):
            as_json = gr.JSON(elem_id="prediction-json")
        if demo_models.card:
            gr.Markdown(demo_models.card, elem_id="evaluation")
            with gr.Row():
                for name, path in demo_models.card_files.items():
                    gr.Image(str(path), label=Path(name).stem, height=320, interactive=False)
        gate_outputs = [gate_box] if gate_box else []
        image.change(show, inputs=image, outputs=[*outputs, *gate_outputs, as_json, notes_box],
                     api_visibility="private")
        api_button = gr.Button(visible=False)
        api_button.click(predict_json, inputs=image, outputs=as_json, api_name="predict")
    return demo


# --------------------------------------------------------------------------- command line


def _settings() -> dict[str, Any]:
    if CONFIG_FILE.is_file():
        return json.loads(CONFIG_FILE.read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    settings = _settings()
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("HFMERGE_MODEL") or settings.get("model"),
                        help="merged model: org/name[@revision] or a folder (default: space_config.json)")
    parser.add_argument("--sources", nargs="+", default=settings.get("sources"), metavar="SOURCE",
                        help="models to show beside it (default: the sources in its hfmerge.yaml)")
    parser.add_argument("--no-sources", action="store_true", help="show the merged model alone")
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: Gradio's, 7860)")
    parser.add_argument("--concurrency", type=int, default=2, help="predictions run at once (default 2)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.exit(2, "app.py: error: say which model to show: --model org/name or --model ./folder\n")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        demo_models = load_demo(args.model, sources=[] if args.no_sources else args.sources)
    except ModelLoadError as exc:
        parser.exit(2, f"app.py: error: {exc}\n")
    demo = build_demo(demo_models)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
