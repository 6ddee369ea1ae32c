"""Tiny models of every supported family, built from configs with random weights.

Widths of 8–32 and one or two layers per stage keep each model under a few
hundred kilobytes, so tests build and merge them in milliseconds. BatchNorm
(ResNet, MobileNetV2, UperNet's ConvNeXt), integer buffers and renamed
parameters (ViT, Segformer, Swin) are all represented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = (
    "vit", "resnet", "mobilenet_v2", "mobilenet_v2-seg", "segformer", "segformer-cls",
    "upernet-convnext", "upernet-swin", "mask2former",
)
CLASSIC_FAMILIES = ("mlp", "vgg")
"""hfmerge's own MLP and VGG-style classifiers (:mod:`hfmerge.modeling.classic`), OTFusion's classic settings."""
IMAGE_SIZE = {"mlp": 8, "vgg": 16, "vit": 16, "resnet": 32, "mobilenet_v2": 32, "mobilenet_v2-seg": 32, "segformer": 32,
              "segformer-cls": 32, "upernet-convnext": 32, "upernet-swin": 32, "mask2former": 64}


def _swin(**extra: Any) -> Any:
    from transformers import SwinConfig

    return SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"], **extra)


def tiny_config(family: str, num_labels: int = 3, labels: list[str] | None = None) -> Any:
    """A config of ``family`` (one of :data:`FAMILIES`) small enough for a unit test."""
    import transformers as tf

    labels = labels or [f"class_{i}" for i in range(num_labels)]
    label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    if family == "mlp":
        from hfmerge.modeling.classic import HfMergeMLPConfig

        cfg = HfMergeMLPConfig(image_size=IMAGE_SIZE["mlp"], hidden_sizes=[16, 12], **label_kwargs)
        arch = "MLPForImageClassification"
    elif family == "vgg":
        from hfmerge.modeling.classic import HfMergeVGGConfig

        cfg = HfMergeVGGConfig(image_size=IMAGE_SIZE["vgg"], layers=[8, "M", 12, 12, "M"], batch_norm=True,
                               **label_kwargs)
        arch = "VGGForImageClassification"
    elif family == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=4, **label_kwargs)
        arch = "ViTForImageClassification"
    elif family == "resnet":
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                              **label_kwargs)
        arch = "ResNetForImageClassification"
    elif family in ("mobilenet_v2", "mobilenet_v2-seg"):
        cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.25, **label_kwargs)
        arch = "MobileNetV2ForImageClassification" if family == "mobilenet_v2" else "MobileNetV2ForSemanticSegmentation"
    elif family in ("segformer", "segformer-cls"):
        cfg = tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                 num_attention_heads=[1, 2], decoder_hidden_size=16, patch_sizes=[7, 3],
                                 strides=[4, 2], mlp_ratios=[2, 2], **label_kwargs)
        arch = "SegformerForSemanticSegmentation" if family == "segformer" else "SegformerForImageClassification"
    elif family == "upernet-convnext":
        backbone = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = tf.UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_channels=8, **label_kwargs)
        arch = "UperNetForSemanticSegmentation"
    elif family == "upernet-swin":
        cfg = tf.UperNetConfig(backbone_config=_swin(), hidden_size=16, auxiliary_channels=8, **label_kwargs)
        arch = "UperNetForSemanticSegmentation"
    elif family == "mask2former":
        cfg = tf.Mask2FormerConfig(backbone_config=_swin(), feature_size=32, mask_feature_size=32, hidden_dim=32,
                                   encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1,
                                   decoder_layers=2, num_attention_heads=2, num_queries=4, common_stride=4,
                                   **label_kwargs)
        arch = "Mask2FormerForUniversalSegmentation"
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    cfg.architectures = [arch]
    return cfg


def tiny_model(family: str, num_labels: int = 3, *, seed: int = 0, labels: list[str] | None = None) -> torch.nn.Module:
    """A randomly initialised tiny model; BatchNorm statistics are randomised too so merges can see them."""
    import transformers

    cfg = tiny_config(family, num_labels, labels)
    torch.manual_seed(seed)
    if family in CLASSIC_FAMILIES:
        from hfmerge.modeling import classic  # hfmerge's own classes

        model = getattr(classic, cfg.architectures[0])(cfg).eval()
    else:
        model = getattr(transformers, cfg.architectures[0])(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(seed + 7)
    return model


def randomise_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Draw every BatchNorm's scale, shift and running statistics at random (in place), so that a
    merge or a reordering that mishandles them shows; the model is returned in eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model.eval()


def image_processor(family: str, size: int | None = None) -> Any:
    """An image processor matching :func:`tiny_config`'s input size (or ``size``)."""
    import transformers

    size = size or IMAGE_SIZE[family]
    if family == "mask2former":
        return transformers.Mask2FormerImageProcessorPil(size={"height": size, "width": size}, ignore_index=255)
    return transformers.ViTImageProcessorPil(size={"height": size, "width": size})


def save_tiny(folder: str | Path, family: str, num_labels: int = 3, *, seed: int = 0,
              labels: list[str] | None = None, model: torch.nn.Module | None = None) -> Path:
    """Save a tiny model with its image processor, as ``save_pretrained`` would for a Hub repo."""
    folder = Path(folder)
    model = model if model is not None else tiny_model(family, num_labels, seed=seed, labels=labels)
    model.save_pretrained(folder)
    if family in CLASSIC_FAMILIES:  # its modeling file beside it, as auto_map says (trust_remote_code)
        from hfmerge.adapters import family_for_model_type

        for name, text in family_for_model_type(model.config.model_type).file_texts().items():
            (folder / name).write_text(text)
    size = getattr(model.config, "image_size", None) if family in CLASSIC_FAMILIES else None
    image_processor(family, size).save_pretrained(folder)  # hfmerge's MLP reads images of its config's size
    return folder


def spread_weights(model: torch.nn.Module, *, gain: float = 1.5, seed: int = 0) -> torch.nn.Module:
    """Re-draw weights at unit scale and zero the biases, in place.

    Transformers' default initialisation (std 0.02) leaves a tiny segmentation
    model's map one class everywhere; at this scale the classes vary across the
    image, so tests can tell segmentation maps apart.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * gain / fan_in**0.5)
            elif name.endswith("bias"):
                parameter.zero_()
    return model
