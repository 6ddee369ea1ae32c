"""ConvNeXt (facebook/convnext-*) image classifiers and feature extractors."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup

_STAGE = re.compile(r"(?P<prefix>(?:.+\.)?)encoder\.stages\.\d+")
_BLOCK = re.compile(r"(?:.+\.)?encoder\.stages\.\d+\.layers\.\d+")


def _norm(module: str) -> tuple[tuple[str, int], ...]:
    return (f"{module}.weight", 0), (f"{module}.bias", 0)


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """ConvNeXt's neuron groups: each block's hidden channels, and each stage's residual stream (optional).

    A block (Liu et al. 2022, Fig. 4) is a depthwise 7x7 convolution, a LayerNorm
    over channels, then an inverted bottleneck of two pointwise convolutions
    (``pwconv1`` widens C to 4C, GELU, ``pwconv2`` narrows back), a layer scale
    (one factor per output channel of ``pwconv2``) and the residual addition.
    The 4C hidden channels are read by nothing else: ``pwconv1``'s rows and
    bias and ``pwconv2``'s input columns are one group, observed at
    ``pwconv1``'s output (channels last, before GELU). The layer scale indexes
    the block's output channels, not these, so they permute freely.

    Every block of a stage adds into one stream of C channels, which the
    stage's blocks read (depthwise kernels and biases, LayerNorms, ``pwconv1``'s
    input columns) and write (``pwconv2``'s rows, bias and layer scale). The
    stream starts at the stage's downsampling convolution (stage 0: the patch
    embedding and its LayerNorm), and the next stage's downsampling LayerNorm
    and convolution read it, as do the final LayerNorm and the classifier after
    the last stage. LayerNorm normalises over channels in any order, so
    permuting all of a stream together keeps the function; the group is
    optional (aligned only when asked, like ViT's residual stream). It is
    observed where it is written: the downsampling convolution's output (the
    embeddings' for stage 0) and each block's output, after its addition. A
    headless ``ConvNextModel`` outputs the last stage's stream: it has no
    group for it.
    """
    modules = layout.module_classes
    stages = [name for name in modules if _STAGE.fullmatch(name)]
    prefix = _STAGE.fullmatch(stages[0])["prefix"] if stages else ""
    builder = GroupBuilder(layout)
    stream = f"{prefix}embeddings"
    builder.produced_by(stream, f"{stream}.patch_embeddings.weight", f"{stream}.patch_embeddings.bias")
    builder.channels(stream, *_norm(f"{stream}.layernorm"), optional=True)
    builder.observed_at(stream, stream)
    for stage in stages:
        residual, downsampling = f"{stage} (residual)", f"{stage}.downsampling_layer"
        builder.channels(residual, name=residual, optional=True)
        if f"{downsampling}.1" in modules:
            builder.channels(stream, *_norm(f"{downsampling}.0"), (f"{downsampling}.1.weight", 1))
            builder.produced_by(residual, f"{downsampling}.1.weight", f"{downsampling}.1.bias")
            builder.observed_at(residual, f"{downsampling}.1")
        else:  # the stage keeps width and resolution (stage 0): its stream is the one before it
            builder.same(stream, residual)
        for block in (name for name in modules if _BLOCK.fullmatch(name) and name.startswith(f"{stage}.")):
            hidden = f"{block} (hidden)"
            builder.produced_by(hidden, f"{block}.pwconv1.weight", f"{block}.pwconv1.bias")
            builder.channels(hidden, (f"{block}.pwconv2.weight", 1), name=hidden)
            builder.observed_at(hidden, f"{block}.pwconv1", dim=-1)
            builder.channels(residual, (f"{block}.dwconv.weight", 0), (f"{block}.dwconv.bias", 0),
                             *_norm(f"{block}.layernorm"), (f"{block}.pwconv1.weight", 1),
                             (f"{block}.layer_scale_parameter", 0))
            builder.produced_by(residual, f"{block}.pwconv2.weight", f"{block}.pwconv2.bias")
            builder.observed_at(residual, block)
        stream = residual
    final = f"{prefix}layernorm"
    builder.channels(stream, *_norm(final), ("classifier.weight", 1))
    groups = builder.build()
    if "classifier.weight" in layout.tensors:
        return groups
    return [g for g in groups if (f"{final}.weight", 0) not in g.members]


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A ConvNeXt of two stages (two blocks, then one), widths 8 and 16, on 32 px images; layer scale 1, so
    that the blocks' branches weigh in the outputs (the default, 1e-6, makes a fresh model its stem alone)."""
    from transformers import ConvNextConfig

    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], layer_scale_init_value=1.0, **labels)
    return config, "ConvNextForImageClassification"


CONVNEXT = register_family(
    FamilyAdapter(
        name="convnext",
        model_types=("convnext",),
        architectures={"ConvNextForImageClassification": "image-classification",
                       "ConvNextModel": "image-feature-extraction"},
        heads={"ConvNextForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="ConvNextForImageClassification",
        backbone_prefix="convnext",
        neurons=_neurons,
        gating_refusal="it has no attention, and gating merges a ViT's attention and MLP blocks",
        tiny={"convnext": TinyVariant(_tiny, image_size=32)},
    )
)
