"""CLIP image encoders (openai/clip-vit-*): the task towers that model-merging research publishes.

The standard 8-, 14- and 20-task benchmarks fine-tune CLIP's image encoder on each task and publish it as a
``CLIPVisionModel`` beside the pre-trained ``CLIPModel`` (Ilharco et al., *Editing Models with Task Arithmetic*,
ICLR 2023, §2 and appendix B). A tower has no classifier: it is scored by zero-shot classification with the
pre-trained text tower (:mod:`hfmerge.eval.zero_shot`), which no merge changes.

The three classes name the image encoder's tensors differently in memory: ``CLIPVisionModel`` without a
prefix (``encoder.layers.0.self_attn.q_proj.weight``; transformers 5 strips the ``vision_model.`` its 4.x
files keep), ``CLIPVisionModelWithProjection`` and ``CLIPModel`` under ``vision_model.``, the last two with the
``visual_projection`` into the joint space. ``backbone_prefix`` pairs them, so a ``CLIPModel`` is the base of
``CLIPVisionModel`` towers. A ``CLIPModel`` source's text tower is never merged (``not_merged``): the output
takes the base's, or the anchor's when there is no base.
"""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, OutputFormat, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden

_LAYER = re.compile(r"(?:vision_model\.)?encoder\.layers\.\d+")
TEXT_TOWER = (r"text_model\..+", r"text_projection\..+", r"logit_scale")
"""In-memory names of a ``CLIPModel``'s text side: its encoder, its projection and the logit scale."""


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """The image encoder's neuron groups, two per layer, as ViT's (:mod:`hfmerge.adapters.vit`).

    MLP: ``fc1``'s rows and bias are the hidden neurons, ``fc2`` reads them
    (input columns); observed at ``fc1``'s output, before QuickGELU.
    Attention: a head is ``head_dim`` consecutive rows of q, k and v and as
    many input columns of ``out_proj``; heads move as wholes, observed at the
    q, k and v outputs. The residual stream, which the pre- and post-LayerNorms,
    the class embedding and the projection read, stays in place.
    """
    config = layout.config.vision_config if hasattr(layout.config, "vision_config") else layout.config
    head_dim = config.hidden_size // config.num_attention_heads
    builder = GroupBuilder(layout)
    for layer in (name for name in layout.module_classes if _LAYER.fullmatch(name)):
        attention_heads(builder, f"{layer}.self_attn", head_dim, output="out_proj")
        mlp_hidden(builder, f"{layer}.mlp")
    return builder.build()


_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 16, "patch_size": 4}
_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "max_position_embeddings": 40, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
_PROJECTION_DIM = 8


def _tiny(architecture: str) -> Any:
    """A CLIP image encoder of width 16, two layers of two heads, on 16 px images in 4 px patches, as
    ``architecture``; a ``CLIPModel`` adds a one-layer text tower over :func:`tiny_tokenizer`'s characters."""

    def config(**labels: Any) -> tuple[Any, str]:
        from transformers import CLIPConfig, CLIPVisionConfig

        if architecture == "CLIPModel":
            text = {**_TEXT, "vocab_size": len(tiny_tokenizer())}
            return CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=_PROJECTION_DIM,
                              **labels), architecture
        return CLIPVisionConfig(**_VISION, projection_dim=_PROJECTION_DIM, **labels), architecture

    return config


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer over single characters: every byte-level character, alone and ending a word, and no
    merges, so any prompt tokenizes with no unknown token (the pre-trained vocabulary cannot be downloaded)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(f"{c}</w>" for c in characters)]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[])


def _processor(text: bool) -> Any:
    def processor(size: int) -> Any:
        from transformers import CLIPImageProcessorPil, CLIPProcessor

        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return CLIPProcessor(image_processor=images, tokenizer=tiny_tokenizer()) if text else images

    return processor


_USAGE = """from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, {{ architecture }}, pipeline

# An image encoder with no labels of its own: it classifies zero-shot beside the text tower of the CLIPModel it was
# fine-tuned from. Put it in that CLIPModel, then give the pipeline any class names.
clip = CLIPModel.from_pretrained("{{ base_ref }}")
tower = {{ architecture }}.from_pretrained("{{ model_ref }}")
%s
classify = pipeline("zero-shot-image-classification", model=clip,
                    tokenizer=AutoTokenizer.from_pretrained("{{ base_ref }}"),
                    image_processor=AutoImageProcessor.from_pretrained("{{ model_ref }}"))
predictions = classify("image.jpg", candidate_labels=["cat", "dog", "bird"], hypothesis_template="{{ prompt }}")
# Scored on a labeled dataset, as the papers score merged towers:
#   hfmerge evaluate {{ model_ref }} --data DATASET --base {{ base_ref }}"""
"""The card's usage of a merged tower (``%s``: how the tower goes into the ``CLIPModel``)."""


CLIP = register_family(
    FamilyAdapter(
        name="clip",
        model_types=("clip", "clip_vision_model"),
        architectures={
            "CLIPVisionModel": "image-feature-extraction",
            "CLIPVisionModelWithProjection": "image-feature-extraction",
            "CLIPModel": "zero-shot-image-classification",
        },
        default_architecture="CLIPVisionModel",
        backbone_prefix="vision_model",
        not_merged=TEXT_TOWER,
        not_merged_name="text tower",
        image_encoder={"CLIPModel": "get_image_features"},
        blocks=((r"(vision_model\.)?encoder\.layers\.\d+\.self_attn", "attention"),
                (r"(vision_model\.)?encoder\.layers\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>(vision_model\.)?encoder\.layers\.\d+\.self_attn)\.(q_proj|k_proj|v_proj)"),),
        neurons=_neurons,
        output_formats={"clip": OutputFormat("CLIPModel", "vision_model")},
        zero_shot="CLIPModel",
        usage={"CLIPVisionModel": _USAGE % 'clip.vision_model = getattr(tower, "vision_model", tower)  '
                                           "# transformers 4 wraps the encoder, 5 does not",
               "CLIPVisionModelWithProjection": _USAGE % "clip.vision_model, clip.visual_projection = "
                                                         "tower.vision_model, tower.visual_projection"},
        tiny={"clip": TinyVariant(_tiny("CLIPVisionModel"), image_size=16, processor=_processor(False)),
              "clip-projection": TinyVariant(_tiny("CLIPVisionModelWithProjection"), image_size=16,
                                             processor=_processor(False)),
              "clip-model": TinyVariant(_tiny("CLIPModel"), image_size=16, processor=_processor(True))},
    )
)
