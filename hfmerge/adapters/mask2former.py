"""Mask2Former universal (semantic, instance, panoptic) segmentation.

The class predictor has ``num_labels + 1`` outputs: the last is "no object",
which belongs to no label set, so fusion averages it rather than stacking it.
"""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family

MASK2FORMER = register_family(
    FamilyAdapter(
        name="mask2former",
        model_types=("mask2former",),
        architectures={"Mask2FormerForUniversalSegmentation": "image-segmentation"},
        heads={
            "Mask2FormerForUniversalSegmentation": (
                HeadSpec(r"class_predictor\.(weight|bias)", null_rows=1),
                # The loss's per-class weights (ones, then eos_coef for "no object") follow the label space too.
                HeadSpec(r"criterion\.empty_weight", null_rows=1),
            )
        },
        default_architecture="Mask2FormerForUniversalSegmentation",
        backbone_prefix="model.pixel_level_module.encoder",
    )
)
