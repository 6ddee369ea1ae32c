"""Classic image classifiers: a multi-layer perceptron and a VGG-style CNN, as transformers models.

The settings OTFusion and CLAFusion are studied in (Singh & Jaggi 2020; clafusion.txt
§4 and appendix B): MLPs of ReLU layers and VGG networks of 3x3 convolutions,
optional BatchNorm and max-pooling. They are written as ``PreTrainedModel`` s with
configs of their own, so that they are saved, loaded, merged and pushed like any
transformers model.

- ``MLPForImageClassification``: the image flattened, then ``layers.{i}``
  (``nn.Linear`` + ReLU, one per entry of ``hidden_sizes``), then ``classifier``.
- ``VGGForImageClassification``: ``features`` (a flat ``nn.Sequential`` as
  torchvision's VGG builds it from ``layers``: an int is a 3x3 convolution with
  that many channels, followed by ``BatchNorm2d`` when ``batch_norm``, and a ReLU;
  ``"M"`` is a 2x2 max-pooling), then a global average pooling and ``classifier``.

This file is SELF-CONTAINED (torch, transformers and the standard library only):
hfmerge writes it into a saved repo as ``modeling_hfmerge_classic.py``, and the
config's ``auto_map`` names it, so that
``AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)``
loads the model without hfmerge installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

MODELING_FILE = "modeling_hfmerge_classic.py"
MLP_TYPE = "hfmerge_mlp"
VGG_TYPE = "hfmerge_vgg"
_MODULE = MODELING_FILE.removesuffix(".py")


class HfMergeMLPConfig(PretrainedConfig):
    """A multi-layer perceptron over the flattened image: ``hidden_sizes`` are its ReLU layers' widths."""

    model_type = MLP_TYPE

    def __init__(self, image_size: int = 28, num_channels: int = 3, hidden_sizes: Sequence[int] = (400, 200, 100),
                 **kwargs: Any) -> None:
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        kwargs.setdefault("auto_map", {"AutoConfig": f"{_MODULE}.HfMergeMLPConfig",
                                       "AutoModelForImageClassification": f"{_MODULE}.MLPForImageClassification"})
        super().__init__(**kwargs)


class HfMergeVGGConfig(PretrainedConfig):
    """A VGG-style CNN: ``layers`` as torchvision's VGG configs (channels of 3x3 convolutions, ``"M"``: max-pool)."""

    model_type = VGG_TYPE

    def __init__(self, image_size: int = 32, num_channels: int = 3,
                 layers: Sequence[int | str] = (64, "M", 128, "M", 256, 256, "M"), batch_norm: bool = True,
                 **kwargs: Any) -> None:
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.layers = [entry if entry == "M" else int(entry) for entry in layers]
        self.batch_norm = bool(batch_norm)
        kwargs.setdefault("auto_map", {"AutoConfig": f"{_MODULE}.HfMergeVGGConfig",
                                       "AutoModelForImageClassification": f"{_MODULE}.VGGForImageClassification"})
        super().__init__(**kwargs)


class _Classifier(PreTrainedModel):
    """What both models share: pixel values in, logits (and a cross-entropy loss given labels) out."""

    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation (each module's ``reset_parameters``), as torchvision's classic models."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)):
            module.reset_parameters()

    def _output(self, logits: Tensor, labels: Tensor | None, return_dict: bool | None) -> Any:
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)


class MLPForImageClassification(_Classifier):
    """x → flatten → [Linear → ReLU] per hidden size (``layers.{i}``) → ``classifier``."""

    config_class = HfMergeMLPConfig

    def __init__(self, config: HfMergeMLPConfig) -> None:
        super().__init__(config)
        widths = [config.num_channels * config.image_size**2, *config.hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.classifier = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> Any:
        hidden = pixel_values.flatten(1)
        for layer in self.layers:
            hidden = F.relu(layer(hidden))
        return self._output(self.classifier(hidden), labels, return_dict)


class VGGForImageClassification(_Classifier):
    """x → ``features`` (3x3 convolutions, BatchNorm, ReLU, max-pooling) → global average → ``classifier``."""

    config_class = HfMergeVGGConfig

    def __init__(self, config: HfMergeVGGConfig) -> None:
        super().__init__(config)
        modules: list[nn.Module] = []
        channels = config.num_channels
        for entry in config.layers:
            if entry == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            modules.append(nn.Conv2d(channels, int(entry), kernel_size=3, padding=1))
            if config.batch_norm:
                modules.append(nn.BatchNorm2d(int(entry)))
            modules.append(nn.ReLU())
            channels = int(entry)
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> Any:
        hidden = self.pool(self.features(pixel_values)).flatten(1)
        return self._output(self.classifier(hidden), labels, return_dict)
