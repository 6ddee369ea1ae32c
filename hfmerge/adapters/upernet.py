"""UperNet semantic segmentation with a ConvNeXt or Swin backbone (openmmlab/upernet-*).

UperNet has no ``AutoModel`` entry; the class is
``UperNetForSemanticSegmentation`` (``AutoModelForSemanticSegmentation``).
Both the decode head and the auxiliary head end in a per-class 1x1 convolution.
The auxiliary head runs in ``forward`` but only feeds the auxiliary training
loss, so it is not a layer: the real output layer is ``decode_head.classifier``.
"""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, register_family

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
    )
)
