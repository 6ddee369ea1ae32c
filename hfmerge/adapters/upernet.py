"""UperNet semantic segmentation with a ConvNeXt or Swin backbone (openmmlab/upernet-*).

UperNet has no ``AutoModel`` entry; the class is
``UperNetForSemanticSegmentation`` (``AutoModelForSemanticSegmentation``).
Both the decode head and the auxiliary head end in a per-class 1x1 convolution.
The auxiliary head runs in ``forward`` but only feeds the auxiliary training
loss, so it is not a layer: the real output layer is ``decode_head.classifier``.
"""

from __future__ import annotations

from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.swin import tiny_swin


def _tiny_convnext(**labels: Any) -> tuple[Any, str]:
    """UperNet on a ConvNeXt of four stages, one block each, widths 8 to 32."""
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_channels=8, **labels)
    return config, "UperNetForSemanticSegmentation"


def _tiny_swin(**labels: Any) -> tuple[Any, str]:
    """UperNet on a tiny Swin (:func:`~hfmerge.adapters.swin.tiny_swin`)."""
    from transformers import UperNetConfig

    config = UperNetConfig(backbone_config=tiny_swin(), hidden_size=16, auxiliary_channels=8, **labels)
    return config, "UperNetForSemanticSegmentation"


UPERNET = register_family(
    FamilyAdapter(
        name="upernet",
        model_types=("upernet",),
        architectures={"UperNetForSemanticSegmentation": "image-segmentation"},
        heads={
            "UperNetForSemanticSegmentation": (
                HeadSpec(r"decode_head\.classifier\.(weight|bias)"),
                HeadSpec(r"auxiliary_head\.classifier\.(weight|bias)"),
            )
        },
        default_architecture="UperNetForSemanticSegmentation",
        backbone_prefix="backbone",
        not_layers=(r"auxiliary_head(\..*)?",),
        # A Swin backbone's blocks; a ConvNeXt backbone has no attention and no MLP module.
        blocks=((r"backbone\.swin\.encoder\.layers\.\d+\.blocks\.\d+\.attention", "attention"),
                (r"backbone\.swin\.encoder\.layers\.\d+\.blocks\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>backbone\.swin\..+\.attention)\.(q_proj|k_proj|v_proj)"),),
        tiny={"upernet-convnext": TinyVariant(_tiny_convnext, image_size=32),
              "upernet-swin": TinyVariant(_tiny_swin, image_size=32)},
    )
)
