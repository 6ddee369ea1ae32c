"""Try a merged vision model beside the models it was made from.

A Gradio app that runs as a Hugging Face Space (``hfmerge space`` writes this
file next to ``inference.py`` and ``source_ref.py``, which load the models and
need no Gradio, ``space_config.json``, ``requirements.txt``, ``README.md`` and
``examples/``) or locally on any merged folder or repo id::

    python app.py --model ./merged
    python app.py --model me/vit-merged --sources org/a org/b

One image goes to every model; the merged model's top-5 labels (or, for a
segmentation model, a colour overlay with a legend) sit beside each source's.
Static merges load with plain transformers, so the Space needs nothing of
hfmerge; a gated merge loads with its own class, from the ``modeling_hfmerge_gated.py`` written
beside this app, and an EMR merge with ``modeling_hfmerge_emr.py``: each of its tasks' models
shows its own prediction. Remote code is never run.

The ``/predict`` endpoint returns JSON::

    {"task": ..., "merged": [{"label", "score"}, ...], "tasks": {name: [...]} | null, "sources": {name: [...]},
     "gate": {...} | null, "notes": [...]}

(an EMR merge answers per task: ``"tasks"`` has each task's model's answer, and ``"merged"`` is null or,
where the merge has a gate, the answer of the task the gate picks, with ``"gate"``).

For segmentation a label's score is the share of pixels given that label.
"""

from __future__ import annotations

import argparse
import colorsys
import ctypes
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image
import transformers

if __package__:  # hfmerge.spaces, installed with hfmerge
    from . import inference
else:  # a Space, or `python app.py`: the files lie side by side
    import inference

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "space_config.json"
CSS = """
#evaluation table { display: block; overflow-x: auto; }
#evaluation th, #evaluation td { word-break: normal; overflow-wrap: normal; hyphens: none; }
"""
"""The card's tables break between words, never inside one ("mea n"), and scroll sideways where they are wide."""
EXAMPLES_DIR = HERE / "examples"

MAX_UPLOAD = "20mb"           # refused by the server before the app sees it
MAX_PIXELS = 50_000_000       # refused after reading the image header, before decoding
MAX_SIDE = 2048               # larger images are scaled down before inference
UPLOAD_CACHE = (600, 600)     # every 10 minutes, uploads older than 10 minutes are deleted from Gradio's cache
MALLOC_ARENAS = 2             # glibc's malloc arenas for the whole process (its default: 8 per core)
MALLOC_MMAP_THRESHOLD = 1 << 20  # blocks this large are mapped on their own, and given back when freed


class UserError(gr.Error):
    """A message for the person using the demo, shown in place of a result; no traceback in the log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, title="Cannot use this input", print_exception=False)


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


def label_colours(models: list[inference.DemoModel]) -> dict[str, str]:
    """One colour per label name, the same in every overlay, so models compare at a glance."""
    colours = {}
    for model in models:
        for label in model.labels.values():
            hue = int(hashlib.md5(label.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
            colours[label] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
    return colours


def build_demo(demo_models: inference.DemoModels, *, examples: list[Path] | None = None,
               labels: list[str] | None = None) -> gr.Blocks:
    """The Blocks interface: one image in; merged and source predictions side by side; JSON at ``/predict``.

    ``labels`` are a zero-shot model's first labels (``space_config.json``'s: its evaluation data's class names),
    else :data:`inference.DEFAULT_LABELS`.
    """
    merged_models = demo_models.merged_models  # an EMR merge: one model per task
    models = [*merged_models, *demo_models.sources]
    metadata = demo_models.metadata or {}
    segmentation = demo_models.merged.kind == "segmentation"
    colours = label_colours(models) if segmentation else None
    if examples is None:
        examples = sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in inference.IMAGE_SUFFIXES)

    zero_shot = demo_models.merged.kind == "zero-shot"

    default_labels = list(labels or inference.DEFAULT_LABELS)

    def typed_labels(text: str | None) -> tuple[list[str], list[str]]:
        """The labels typed, each once, and notes: none typed gives the Space's first labels, and says so."""
        typed = list(dict.fromkeys(label.strip() for label in (text or "").split(",") if label.strip()))
        if typed or not zero_shot:
            return typed, []
        return default_labels, [f"no labels were typed: chose among {', '.join(default_labels)}"]

    def predict_json(path: str | None, labels: str | None = None) -> dict[str, Any]:
        """Predictions of the merged model and each source for one image (a zero-shot model: among the
        comma-separated ``labels``), as JSON."""
        if path is None:
            raise UserError("no image was given: upload an image file")
        image, notes = open_image(path)
        chosen, label_notes = typed_labels(labels)
        payload, _ = demo_models.predict(image, chosen or None)
        payload["notes"] += notes + label_notes
        return payload

    def show(path: str | None, labels: str | None = None) -> list[Any]:
        if path is None:
            return [None] * len(outputs) + ([None] if gate_box else []) + [None, ""]
        image, notes = open_image(path)
        chosen, label_notes = typed_labels(labels)
        payload, answers = demo_models.predict(image, chosen or None)
        notes += label_notes
        payload["notes"] += notes
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
    # Gradio keeps every upload in its cache folder for as long as the server runs unless told otherwise
    with gr.Blocks(title=f"{demo_models.merged.name} — hfmerge demo", delete_cache=UPLOAD_CACHE) as demo:
        gr.Markdown(f"# {demo_models.merged.name}")
        if method:
            gr.Markdown(
                f"Merged with hfmerge by **{method}** from "
                f"{len(inference.recipe_sources(metadata))} models. Drop an image to compare the merged model with its "
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
                labels_box = (gr.Textbox(value=", ".join(default_labels), label="Labels (comma-separated)",
                                         elem_id="labels") if zero_shot else None)
                notes_box = gr.Markdown(elem_id="image-notes")
                gate_box = (gr.Label(num_top_classes=len(metadata.get("sources") or []) or None,
                                     label="Gate: probability of each task", elem_id="gate")
                            if demo_models.gated else None)
            with gr.Column(scale=3):
                with gr.Row(equal_height=False):
                    outputs = []
                    offset = 1 if demo_models.gated and demo_models.tasks else 0  # an EMR gate's choice comes first
                    for i, model in enumerate(models):
                        merged = i < len(merged_models)
                        title = f"{'Merged' if merged else 'Source'}: {model.name}"
                        if not merged:
                            elem_id = f"source-{i - len(merged_models) + 1}"
                        else:
                            elem_id = "merged" if not demo_models.tasks or i < offset else f"merged-task-{i - offset}"
                        with gr.Column(min_width=220):
                            if segmentation:
                                outputs.append(gr.AnnotatedImage(label=title, color_map=colours,
                                                                 elem_id=f"{elem_id}-overlay"))
                            outputs.append(gr.Label(
                                num_top_classes=inference.TOP_K, elem_id=elem_id,
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
        inputs = [image, labels_box] if labels_box else [image]
        image.change(show, inputs=inputs, outputs=[*outputs, *gate_outputs, as_json, notes_box],
                     api_visibility="private")
        if labels_box:
            labels_box.submit(show, inputs=inputs, outputs=[*outputs, *gate_outputs, as_json, notes_box],
                              api_visibility="private")
        api_button = gr.Button(visible=False)
        api_button.click(predict_json, inputs=inputs, outputs=as_json, api_name="predict")
    return demo


# --------------------------------------------------------------------------- command line


def bound_allocator() -> bool:
    """Make glibc give freed image buffers back to the system; whether it could (glibc only).

    Gradio runs each prediction on a thread of its pool, and glibc gives threads
    malloc arenas of their own (up to 8 per core) whose freed memory stays with
    the process; its mmap threshold also rises to 32 MB as large blocks are freed,
    after which a decoded image (a 2048-px side is 12 MB) is carved from an arena
    too. So the Space's RSS climbed by hundreds of MB over its first requests
    before every arena had held the largest images. Two arenas and a fixed 1 MiB
    threshold bound that (``benchmarks/space_memory.py``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: its own allocator, left as it is
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # glibc's <malloc.h>
    return bool(mallopt(m_arena_max, MALLOC_ARENAS)) and bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD))


def _settings() -> dict[str, Any]:
    """``space_config.json``, a folder in it (``../merged``) read from the Space's own folder.

    ``hfmerge space FOLDER --output`` names a local model by its path from the Space, never by a path of
    the machine it was written on, so the app finds it from wherever it is started.
    """
    if not CONFIG_FILE.is_file():
        return {}
    settings = json.loads(CONFIG_FILE.read_text())

    def located(ref: str) -> str:
        return str((HERE / ref).resolve()) if ref.startswith(".") else ref

    if settings.get("model"):
        settings["model"] = located(settings["model"])
    if settings.get("sources"):
        settings["sources"] = [located(ref) for ref in settings["sources"]]
    return settings


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
    bound_allocator()  # before Gradio starts its threads
    if not args.model:
        parser.exit(2, "app.py: error: say which model to show: --model org/name or --model ./folder\n")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        demo_models = inference.load_demo(args.model, sources=[] if args.no_sources else args.sources)
    except inference.ModelLoadError as exc:
        parser.exit(2, f"app.py: error: {exc}\n")
    demo = build_demo(demo_models, labels=settings.get("labels"))
    demo.queue(default_concurrency_limit=args.concurrency, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
