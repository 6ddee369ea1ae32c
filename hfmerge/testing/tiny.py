"""Tiny models of every supported family, built from configs with random weights.

Widths of 8–32 and one or two layers per stage keep each model under a few
hundred kilobytes, so tests build and merge them in milliseconds. BatchNorm
(ResNet, MobileNetV2, UperNet's ConvNeXt), integer buffers and renamed
parameters (ViT, Segformer, Swin) are all represented. Each family's adapter
declares its tiny configurations (``FamilyAdapter.tiny``, by the names tests use:
``"vit"``, ``"mobilenet_v2-seg"``, ``"upernet-swin"``...); this module looks them
up in the registry and builds, saves and feeds them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hfmerge.adapters.base import FamilyAdapter, TinyVariant

# Each adapter declares its tiny models (``FamilyAdapter.tiny``), named as tests name them. The tables
# FAMILIES, CLASSIC_FAMILIES and IMAGE_SIZE are read from the registry on first use (``__getattr__``),
# so that importing this module imports no transformers.


@cache
def _variants() -> dict[str, tuple[FamilyAdapter, TinyVariant]]:
    """Every tiny model the adapters declare, by name, with its adapter, in registration order."""
    from hfmerge.adapters import registered_families

    return {name: (adapter, variant) for adapter in registered_families() for name, variant in adapter.tiny.items()}


@cache
def _families() -> tuple[str, ...]:
    """:data:`FAMILIES`: the tiny models of transformers' own classes, in registration order."""
    return tuple(name for name, (adapter, _) in _variants().items() if adapter.classes is None)


@cache
def _classic_families() -> tuple[str, ...]:
    """:data:`CLASSIC_FAMILIES`: hfmerge's own MLP and VGG-style classifiers (:mod:`hfmerge.modeling.classic`),
    OTFusion's classic settings; the tiny models of the adapters whose classes are hfmerge's."""
    return tuple(name for name, (adapter, _) in _variants().items() if adapter.classes is not None)


@cache
def _image_sizes() -> dict[str, int]:
    """:data:`IMAGE_SIZE`: every tiny model's image size (height and width), by name."""
    return {name: variant.image_size for name, (_, variant) in _variants().items()}


_TABLES = {"FAMILIES": _families, "CLASSIC_FAMILIES": _classic_families, "IMAGE_SIZE": _image_sizes}


def __getattr__(name: str) -> Any:
    if name in _TABLES:
        return _TABLES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TABLES])


def tiny_config(family: str, num_labels: int = 3, labels: list[str] | None = None) -> Any:
    """A config of ``family`` (one of :data:`FAMILIES` or :data:`CLASSIC_FAMILIES`) small enough for a unit test."""
    labels = labels or [f"class_{i}" for i in range(num_labels)]
    label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    if family not in _variants():
        raise ValueError(f"unknown tiny family {family!r}; choose one of {_families()}")
    cfg, arch = _variants()[family][1].config(**label_kwargs)
    cfg.architectures = [arch]
    return cfg


def tiny_adapter(family: str) -> FamilyAdapter:
    """The adapter that declares the tiny model ``family``: what tests ask instead of naming families (its heads,
    the tensors no method merges, what its forward reads)."""
    if family not in _variants():
        raise ValueError(f"unknown tiny family {family!r}; choose one of {_families()}")
    return _variants()[family][0]


def is_image_classifier(family: str) -> bool:
    """Whether the tiny model ``family`` is an image classifier, as its adapter declares its architecture's task."""
    adapter = tiny_adapter(family)
    return adapter.architectures[tiny_config(family).architectures[0]] == "image-classification"


def tiny_model(family: str, num_labels: int = 3, *, seed: int = 0, labels: list[str] | None = None) -> torch.nn.Module:
    """A randomly initialised tiny model; BatchNorm statistics are randomised too so merges can see them."""
    cfg = tiny_config(family, num_labels, labels)
    torch.manual_seed(seed)
    model = _variants()[family][0].model_class(cfg.architectures[0])(cfg).eval()  # transformers' class, or hfmerge's
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

    variant = _variants()[family][1] if family in _variants() else None
    size = size or _image_sizes()[family]
    if variant is not None and variant.processor is not None:
        return variant.processor(size)
    return transformers.ViTImageProcessorPil(size={"height": size, "width": size})


def save_tiny(folder: str | Path, family: str, num_labels: int = 3, *, seed: int = 0,
              labels: list[str] | None = None, model: torch.nn.Module | None = None) -> Path:
    """Save a tiny model with its image processor, as ``save_pretrained`` would for a Hub repo."""
    folder = Path(folder)
    model = model if model is not None else tiny_model(family, num_labels, seed=seed, labels=labels)
    model.save_pretrained(folder)
    classic = family in _classic_families()
    if classic:  # its modeling file beside it, as auto_map says (trust_remote_code)
        from hfmerge.adapters import family_for_model_type

        for name, text in family_for_model_type(model.config.model_type).file_texts().items():
            (folder / name).write_text(text)
    size = getattr(model.config, "image_size", None) if classic else None
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
