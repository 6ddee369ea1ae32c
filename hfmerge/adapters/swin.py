"""Swin Transformer (microsoft/swin-*) image classifiers and feature extractors; also the tiny Swin backbone
that UperNet and Mask2Former build on (:func:`tiny_swin`)."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden

_BLOCK = re.compile(r"(?:.+\.)?encoder\.layers\.\d+\.blocks\.\d+")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """Swin's neuron groups, two per block: the MLP's hidden neurons and the attention heads.

    MLP: ``fc1``'s rows and bias make the hidden neurons and ``fc2`` reads them
    (input columns), observed at ``fc1``'s output, before GELU, as in ViT.
    Attention (within each window, shifted or not): a head is ``head_dim``
    consecutive rows of q, k and v and as many input columns of ``o_proj``, and
    it owns one column of the relative position bias table
    (``[(2 * window - 1)², heads]``), which is added to that head's attention
    logits: a permutation of heads moves the table's columns with them, one
    entry per head (``per_unit``). Heads are observed at the q, k and v outputs.
    A stage has its own number of heads, so its head groups are read from the
    block's q rows and table columns, not from the config.

    The residual stream has no group: each stage's patch merging concatenates
    the channels of four neighbouring patches before its LayerNorm and linear
    reduction, so a permutation of the stream acts on four interleaved copies
    of it there, which a group of consecutive units cannot express.
    """
    builder = GroupBuilder(layout)
    for block in (name for name in layout.module_classes if _BLOCK.fullmatch(name)):
        attention = f"{block}.attention"
        table = f"{attention}.relative_position_bias.relative_position_bias_table"
        heads = layout.tensors[table].shape[1]
        head_dim = layout.tensors[f"{attention}.q_proj.weight"].shape[0] // heads
        attention_heads(builder, attention, head_dim, bias_table=table)
        mlp_hidden(builder, f"{block}.mlp")
    return builder.build()


def tiny_swin(**extra: Any) -> Any:
    """A Swin backbone config of 32 px, width 8 and one block per stage, all four stages out (no transformers
    import until it is called): UperNet's and Mask2Former's tiny backbone."""
    from transformers import SwinConfig

    return SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"], **extra)


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A Swin classifier of width 8 on 32 px images: two stages of two blocks (the second one's windows
    shifted), two heads each, windows of 2 patches."""
    from transformers import SwinConfig

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=2,
                        **labels)
    return config, "SwinForImageClassification"


SWIN = register_family(
    FamilyAdapter(
        name="swin",
        model_types=("swin",),
        architectures={"SwinForImageClassification": "image-classification", "SwinModel": "image-feature-extraction"},
        heads={"SwinForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="SwinForImageClassification",
        backbone_prefix="swin",
        blocks=((r"(.+\.)?encoder\.layers\.\d+\.blocks\.\d+\.attention", "attention"),
                (r"(.+\.)?encoder\.layers\.\d+\.blocks\.\d+\.mlp", "mlp")),
        shared_inputs=(
            SharedInput(r"(?P<block>(.+\.)?encoder\.layers\.\d+\.blocks\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),
        ),
        neurons=_neurons,
        gating_refusal="its windowed attention and patch merging are not the gated ViT's global attention",
        tiny={"swin": TinyVariant(_tiny, image_size=32)},
    )
)
