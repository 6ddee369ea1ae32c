"""A ViT merged by a gating network: one model that serves N tasks without a task id.

Ye et al., "Merging Vision Transformers from Different Tasks and Domains" (§3.2):
a small gating network G (a MobileNetV2) reads the image and predicts which of
the N source tasks it comes from,

    P(x) = softmax(G(x))                                   (Eq. 1)

the gated layers of the merged ViT are the per-sample weighted average of the
sources' layers,

    W_M^l = Σ_i p_i W_i^l                                  (Eq. 2)

and the classifier is the one of the most probable task,

    C_M = C_i,  i = argmax_i p_i                           (Eq. 3).

Layers that are not gated hold one (statically merged) tensor. Parameter names
are the ViT checkpoint keys (``vit.encoder.layer.0.attention.attention.query.weight``
...), so a source tensor maps to this model by key, under transformers 4.x and 5.x;
a gated tensor has a leading dimension of N sources.

This file is SELF-CONTAINED (torch, transformers and the standard library only):
hfmerge copies it into a merged repo as ``modeling_hfmerge_gated.py`` so that
``AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)``
loads the model without hfmerge installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ImageClassifierOutput

MODEL_TYPE = "hfmerge-gated-vit"
MODELING_FILE = "modeling_hfmerge_gated.py"
ROUTINGS = ("soft", "top1")

# Given a checkpoint key of a tensor or module: N (the number of sources) where it is gated, None where static.
SourcesOf = Callable[[str], "int | None"]

# ViTConfig's defaults (google/vit-base-patch16-224) for the fields this model reads.
_VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True,
}


class GatedMergedConfig(PretrainedConfig):
    """Configuration of :class:`GatedMergedForImageClassification`.

    Args:
        vit: the sources' ``ViTConfig.to_dict()`` (hidden_size, num_hidden_layers, num_attention_heads,
            intermediate_size, hidden_act, layer_norm_eps, image_size, patch_size, num_channels, qkv_bias).
        gate: the gate's ``MobileNetV2Config.to_dict()``, with ``num_labels == num_sources``.
        num_sources: N, the number of merged models (tasks).
        gate_labels: a name per source/task, in source order (what the gate's probabilities are shown as).
        gated: the ViT checkpoint keys (without the leading N) stored once per source.
        source_labels: per source, the union label id of each of its classifier's outputs.
        routing: ``"soft"`` (Eq. 2 per sample) or ``"top1"`` (each sample runs its argmax source's weights).
        vit_image_mean, vit_image_std: the ViT image processor's normalisation (undone for the gate).
        gate_image_mean, gate_image_std, gate_image_size: the gate's input normalisation and size.
        kwargs: ``id2label``/``label2id`` = the union label space, and the rest of ``PretrainedConfig``.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vit: dict[str, Any] | None = None,
        gate: dict[str, Any] | None = None,
        num_sources: int = 2,
        gate_labels: list[str] | None = None,
        gated: list[str] | None = None,
        source_labels: list[list[int]] | None = None,
        routing: str = "soft",
        vit_image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        vit_image_std: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_std: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_size: int | list[int] = 224,
        **kwargs: Any,
    ) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        if num_sources < 1:
            raise ValueError(f"num_sources must be at least 1, not {num_sources}")
        gate_labels = list(gate_labels) if gate_labels is not None else [f"task {i}" for i in range(num_sources)]
        if len(gate_labels) != num_sources:
            raise ValueError(f"gate_labels has {len(gate_labels)} names for {num_sources} sources")
        if source_labels is not None and len(source_labels) != num_sources:
            raise ValueError(f"source_labels has {len(source_labels)} entries for {num_sources} sources")
        self.vit = dict(vit or {})
        self.gate = dict(gate) if gate is not None else MobileNetV2Config(num_labels=num_sources).to_dict()
        self.num_sources = num_sources
        self.gate_labels = gate_labels
        self.gated = list(gated or [])
        self.source_labels = [list(map(int, ids)) for ids in source_labels] if source_labels is not None else None
        self.routing = routing
        self.vit_image_mean = list(vit_image_mean)
        self.vit_image_std = list(vit_image_std)
        self.gate_image_mean = list(gate_image_mean)
        self.gate_image_std = list(gate_image_std)
        self.gate_image_size = gate_image_size if isinstance(gate_image_size, int) else list(gate_image_size)
        super().__init__(**kwargs)

    def vit_value(self, name: str) -> Any:
        """A ViT hyper-parameter: the sources' value, else ViTConfig's default."""
        return self.vit.get(name, _VIT_DEFAULTS[name])


@dataclass
class GatedImageClassifierOutput(ImageClassifierOutput):
    """ViT classification outputs, plus the gate's task probabilities (Eq. 1) and the chosen task (Eq. 3)."""

    gate_probs: torch.FloatTensor | None = None
    task: torch.LongTensor | None = None


@dataclass
class Route:
    """Which sources' weights a forward pass uses.

    ``probs`` (batch, N): soft routing, sample b uses Σ_i probs[b, i] W_i (Eq. 2);
    ``source``: every sample uses source ``source``'s weights (a top1 group).
    """

    probs: Tensor | None = None
    source: int | None = None

    @property
    def per_sample(self) -> bool:
        return self.probs is not None

    def select(self, tensor: Tensor, gated: bool) -> Tensor:
        """The tensor this route uses: a static tensor as is; a gated one (N, ...) mixed per sample (batch, ...)
        once for the whole batch (one einsum, Eq. 2), or source ``source``'s slice."""
        if not gated:
            return tensor
        if self.probs is None:
            return tensor[self.source]
        return torch.einsum("bn,n...->b...", self.probs.to(tensor.dtype), tensor)


def _parameter(shape: Sequence[int], num_sources: int | None, fill: str) -> nn.Parameter:
    """A parameter of ``shape``, with a leading source dimension when gated (``num_sources`` given)."""
    full = (num_sources, *shape) if num_sources is not None else tuple(shape)
    if fill == "zeros":
        return nn.Parameter(torch.zeros(full))
    if fill == "ones":
        return nn.Parameter(torch.ones(full))
    return nn.Parameter(torch.randn(full) * 0.02)


class GatedLinear(nn.Module):
    """A linear layer, static or gated (weight and bias stacked over N sources).

    Soft routing materialises each sample's weight Σ_i p_bi W_i once (Eq. 2) and
    applies all of them in one batched matmul.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, num_sources: int | None) -> None:
        super().__init__()
        self.gated = num_sources is not None
        self.weight = _parameter((out_features, in_features), num_sources, "normal")
        self.bias = _parameter((out_features,), num_sources, "zeros") if bias else None

    def forward(self, x: Tensor, route: Route) -> Tensor:
        weight = route.select(self.weight, self.gated)
        bias = route.select(self.bias, self.gated) if self.bias is not None else None
        if not (self.gated and route.per_sample):
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class GatedLayerNorm(nn.Module):
    """LayerNorm over the last dimension, static or gated (Eq. 2 on its affine weight and bias).

    Per sample: normalise without affine, then apply each sample's own affine.
    """

    def __init__(self, size: int, *, eps: float, num_sources: int | None) -> None:
        super().__init__()
        self.gated = num_sources is not None
        self.eps = eps
        self.weight = _parameter((size,), num_sources, "ones")
        self.bias = _parameter((size,), num_sources, "zeros")

    def forward(self, x: Tensor, route: Route) -> Tensor:
        weight, bias = route.select(self.weight, self.gated), route.select(self.bias, self.gated)
        size = (x.shape[-1],)
        if not (self.gated and route.per_sample):
            return F.layer_norm(x, size, weight, bias, self.eps)
        return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, size, eps=self.eps), weight.unsqueeze(1))


class GatedPatchProjection(nn.Module):
    """ViT's patch embedding (a convolution with kernel = stride = patch size), static or gated.

    Per sample: the image is unfolded into patches once, and each sample's
    mixed kernel (Eq. 2) is applied in one batched matmul.
    """

    def __init__(self, channels: int, hidden: int, patch: tuple[int, int], *, num_sources: int | None) -> None:
        super().__init__()
        self.gated = num_sources is not None
        self.patch = patch
        self.weight = _parameter((hidden, channels, *patch), num_sources, "normal")
        self.bias = _parameter((hidden,), num_sources, "zeros")

    def forward(self, pixel_values: Tensor, route: Route) -> Tensor:
        """(batch, channels, height, width) -> (batch, patches, hidden)."""
        weight, bias = route.select(self.weight, self.gated), route.select(self.bias, self.gated)
        if not (self.gated and route.per_sample):
            return F.conv2d(pixel_values, weight, bias, stride=self.patch).flatten(2).transpose(1, 2)
        columns = F.unfold(pixel_values, kernel_size=self.patch, stride=self.patch)  # (b, c·ph·pw, patches)
        kernels = weight.flatten(2)  # (b, hidden, c·ph·pw), the same channel-major order as unfold
        return torch.baddbmm(bias.unsqueeze(2), kernels, columns).transpose(1, 2)


class _PatchEmbeddings(nn.Module):
    def __init__(self, projection: GatedPatchProjection) -> None:
        super().__init__()
        self.projection = projection


class GatedEmbeddings(nn.Module):
    """CLS token, position embeddings and patch embedding, each static or gated (Table 2: gated by default)."""

    def __init__(self, config: GatedMergedConfig, sources_of: SourcesOf) -> None:
        super().__init__()
        hidden = config.vit_value("hidden_size")
        self.image_size = _pair(config.vit_value("image_size"))
        patch = _pair(config.vit_value("patch_size"))
        patches = (self.image_size[0] // patch[0]) * (self.image_size[1] // patch[1])
        self.gated_cls = sources_of("vit.embeddings.cls_token") is not None
        self.gated_position = sources_of("vit.embeddings.position_embeddings") is not None
        self.cls_token = _parameter((1, 1, hidden), sources_of("vit.embeddings.cls_token"), "normal")
        self.position_embeddings = _parameter((1, patches + 1, hidden),
                                              sources_of("vit.embeddings.position_embeddings"), "normal")
        self.patch_embeddings = _PatchEmbeddings(GatedPatchProjection(
            config.vit_value("num_channels"), hidden, patch,
            num_sources=sources_of("vit.embeddings.patch_embeddings.projection")))

    def forward(self, pixel_values: Tensor, route: Route) -> Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != self.image_size:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size[0]}*{self.image_size[1]}).")
        patches = self.patch_embeddings.projection(pixel_values, route)
        batch = patches.shape[0]
        cls = route.select(self.cls_token, self.gated_cls).reshape(-1, 1, patches.shape[-1])
        position = route.select(self.position_embeddings, self.gated_position)
        position = position.reshape(-1, *position.shape[-2:])
        return torch.cat((cls.expand(batch, -1, -1), patches), dim=1) + position


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, *, bias: bool, sources_of: SourcesOf, prefix: str) -> None:
        super().__init__()
        self.query = GatedLinear(hidden, hidden, bias=bias, num_sources=sources_of(f"{prefix}.query"))
        self.key = GatedLinear(hidden, hidden, bias=bias, num_sources=sources_of(f"{prefix}.key"))
        self.value = GatedLinear(hidden, hidden, bias=bias, num_sources=sources_of(f"{prefix}.value"))


class _Dense(nn.Module):
    def __init__(self, dense: GatedLinear) -> None:
        super().__init__()
        self.dense = dense


class _Attention(nn.Module):
    def __init__(self, self_attention: _SelfAttention, output: GatedLinear) -> None:
        super().__init__()
        self.attention = self_attention
        self.output = _Dense(output)


class GatedEncoderLayer(nn.Module):
    """One pre-LN ViT layer: x + Attn(LN(x)), then x + MLP(LN(x)); any of its modules static or gated."""

    def __init__(self, config: GatedMergedConfig, index: int, sources_of: SourcesOf) -> None:
        super().__init__()
        hidden = config.vit_value("hidden_size")
        inner = config.vit_value("intermediate_size")
        eps = config.vit_value("layer_norm_eps")
        self.heads = config.vit_value("num_attention_heads")
        prefix = f"vit.encoder.layer.{index}"
        self.layernorm_before = GatedLayerNorm(hidden, eps=eps, num_sources=sources_of(f"{prefix}.layernorm_before"))
        self.attention = _Attention(
            _SelfAttention(hidden, bias=config.vit_value("qkv_bias"), sources_of=sources_of,
                           prefix=f"{prefix}.attention.attention"),
            GatedLinear(hidden, hidden, bias=True, num_sources=sources_of(f"{prefix}.attention.output.dense")))
        self.layernorm_after = GatedLayerNorm(hidden, eps=eps, num_sources=sources_of(f"{prefix}.layernorm_after"))
        self.intermediate = _Dense(GatedLinear(hidden, inner, bias=True,
                                               num_sources=sources_of(f"{prefix}.intermediate.dense")))
        self.output = _Dense(GatedLinear(inner, hidden, bias=True, num_sources=sources_of(f"{prefix}.output.dense")))
        self.activation = ACT2FN[config.vit_value("hidden_act")]

    def forward(self, hidden_states: Tensor, route: Route) -> Tensor:
        batch, tokens, width = hidden_states.shape
        x = self.layernorm_before(hidden_states, route)
        qkv = self.attention.attention
        q, k, v = (
            projection(x, route).view(batch, tokens, self.heads, -1).transpose(1, 2)
            for projection in (qkv.query, qkv.key, qkv.value)
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        hidden_states = hidden_states + self.attention.output.dense(attended, route)
        x = self.activation(self.intermediate.dense(self.layernorm_after(hidden_states, route), route))
        return hidden_states + self.output.dense(x, route)


class _Encoder(nn.Module):
    def __init__(self, layers: list[GatedEncoderLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class GatedViT(nn.Module):
    """Embeddings, encoder and final LayerNorm of the merged ViT (parameter names = ViT checkpoint keys)."""

    def __init__(self, config: GatedMergedConfig, sources_of: SourcesOf) -> None:
        super().__init__()
        self.embeddings = GatedEmbeddings(config, sources_of)
        self.encoder = _Encoder([GatedEncoderLayer(config, i, sources_of)
                                 for i in range(config.vit_value("num_hidden_layers"))])
        self.layernorm = GatedLayerNorm(config.vit_value("hidden_size"), eps=config.vit_value("layer_norm_eps"),
                                        num_sources=sources_of("vit.layernorm"))

    def forward(self, pixel_values: Tensor, route: Route, *, keep_hidden: bool) -> tuple[Tensor, list[Tensor]]:
        """The final-LayerNorm'd sequence, and (with ``keep_hidden``) the embeddings and each layer's output."""
        hidden_states = self.embeddings(pixel_values, route)
        kept = [hidden_states] if keep_hidden else []
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, route)
            if keep_hidden:
                kept.append(hidden_states)
        return self.layernorm(hidden_states, route), kept


class _FoldedConv:
    """One MobileNetV2 convolution layer for inference: eval-mode BatchNorm folded into the convolution,

        W' = W · γ / √(σ² + ε),   b' = β + (b − μ) · γ / √(σ² + ε),

    the kernel in channels_last, and transformers' TF "SAME" padding given to the
    convolution itself where it is symmetric (every stride-1 layer), so that only
    the stride-2 layers copy their input into a padded one (``apply_tf_padding``
    pads every layer, 1×1 included). The fold is computed in float64 on the CPU
    (once), so the folded kernel is the exact one rounded once to the gate's dtype.
    """

    def __init__(self, layer: nn.Module, tf_padding: bool) -> None:
        conv, norm = layer.convolution, layer.normalization

        def exact(tensor: Tensor) -> Tensor:
            return tensor.to("cpu", torch.float64)

        weight = exact(conv.weight)
        bias = exact(conv.bias) if conv.bias is not None else weight.new_zeros(conv.out_channels)
        if norm is not None:
            scale = exact(norm.weight) / torch.sqrt(exact(norm.running_var) + norm.eps)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = exact(norm.bias) + (bias - exact(norm.running_mean)) * scale
        self.weight = weight.to(conv.weight).contiguous(memory_format=torch.channels_last)
        self.bias = bias.to(conv.weight)
        self.stride, self.kernel, self.dilation, self.groups = conv.stride, conv.kernel_size, conv.dilation, conv.groups
        self.padding = None if tf_padding else conv.padding
        self.relu6 = isinstance(layer.activation, nn.ReLU6)
        self.activation = layer.activation

    def __call__(self, x: Tensor) -> Tensor:
        if self.padding is not None:
            x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            (top, bottom), (left, right) = (_same_padding(size, stride, kernel, dilation) for size, stride, kernel, dilation
                                            in zip(x.shape[-2:], self.stride, self.kernel, self.dilation))
            if top == bottom and left == right:
                x = F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
            else:
                x = F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                             self.dilation, self.groups)
        if self.relu6:
            return F.relu6(x, inplace=True)
        return self.activation(x) if self.activation is not None else x


def _same_padding(size: int, stride: int, kernel: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one side, as transformers' ``apply_tf_padding`` computes it."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return (total // 2 * dilation, (total - total // 2) * dilation)


def _tensor_state(module: nn.Module) -> tuple[Any, ...]:
    """What a fold of ``module`` depends on: each parameter's and buffer's storage, version counter and dtype."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in (*module.parameters(), *module.buffers()))


class FoldedGate:
    """The gate's MobileNetV2 for inference (eval mode, no gradient), about twice as fast on a CPU.

    The same function as ``MobileNetV2ForImageClassification`` in eval mode, up to
    float rounding: BatchNorm folded into each convolution (:class:`_FoldedConv`),
    activations in channels_last memory format. Built from the gate's tensors as
    they are now; :meth:`matches` says whether they have changed since (an
    optimiser step, ``load_state_dict``, ``.to``), so a caller rebuilds it.
    """

    def __init__(self, gate: MobileNetV2ForImageClassification) -> None:
        self.state = _tensor_state(gate)
        model, tf_padding = gate.mobilenet_v2, bool(gate.config.tf_padding)
        stem = model.conv_stem
        self.stem = [_FoldedConv(layer, tf_padding)
                     for layer in (stem.first_conv, stem.expand_1x1, stem.conv_3x3, stem.reduce_1x1)
                     if layer is not None]
        self.blocks = [([_FoldedConv(layer, tf_padding) for layer in (block.expand_1x1, block.conv_3x3,
                                                                     block.reduce_1x1)], block.use_residual)
                       for block in model.layer]
        self.head = _FoldedConv(model.conv_1x1, tf_padding)
        self.classifier = gate.classifier

    def matches(self, gate: nn.Module) -> bool:
        return self.state == _tensor_state(gate)

    def logits(self, images: Tensor) -> Tensor:
        """G(x) (batch, N) for the gate's normalised ``images``; the eval-mode dropout before the classifier is
        the identity."""
        x = images.contiguous(memory_format=torch.channels_last)
        for layer in self.stem:
            x = layer(x)
        for layers, residual in self.blocks:
            y = x
            for layer in layers:
                y = layer(y)
            x = x + y if residual else y
        pooled = F.adaptive_avg_pool2d(self.head(x), 1).flatten(1)
        return self.classifier(pooled)


class GatedMergedForImageClassification(PreTrainedModel):
    """The gated merge of N ViT classifiers (§3.2): gate (Eq. 1), gated layers (Eq. 2), classifier choice (Eq. 3).

    Parameters: the ViT checkpoint keys, a gated one of shape (N, *source shape);
    ``classifiers.{i}`` (source i's head, its own label count); ``gate.*`` (a
    MobileNetV2ForImageClassification with N outputs). Logits span the union
    label space (``config.id2label``); entries outside the chosen task's labels
    are -inf, so ``pipeline`` returns a label of the chosen task.
    """

    config_class = GatedMergedConfig
    main_input_name = "pixel_values"

    def __init__(self, config: GatedMergedConfig) -> None:
        super().__init__(config)
        gated = set(config.gated)
        tensors = _vit_tensor_keys(config)
        unknown = sorted(gated - set(tensors))
        if unknown:
            raise ValueError(f"config.gated names tensors this ViT does not have: {', '.join(unknown)}")
        for key in tensors:
            if key.endswith(".bias") and (key in gated) != (key[: -len("bias")] + "weight" in gated):
                raise ValueError(f"{key[: -len('.bias')]}: its weight and bias must be gated together")
        if config.source_labels is None:
            raise ValueError("config.source_labels is missing: each source's classifier outputs -> union label ids")
        union = len(config.id2label)
        for i, ids in enumerate(config.source_labels):
            if not ids or min(ids) < 0 or max(ids) >= union:
                raise ValueError(f"source_labels[{i}] must be union label ids in 0..{union - 1}")

        def sources_of(key: str) -> int | None:
            """N for a gated tensor or module (its weight gated), None for a static one."""
            return config.num_sources if key in gated or f"{key}.weight" in gated else None

        self.vit = GatedViT(config, sources_of)
        hidden = config.vit_value("hidden_size")
        self.classifiers = nn.ModuleList(nn.Linear(hidden, len(ids)) for ids in config.source_labels)
        gate_config = MobileNetV2Config(**config.gate)
        if gate_config.num_labels != config.num_sources:
            raise ValueError(f"the gate has {gate_config.num_labels} outputs for {config.num_sources} sources")
        self.gate = MobileNetV2ForImageClassification(gate_config)
        self._constants: dict[tuple[str, torch.device], Tensor] = {}
        self._folded_gate: FoldedGate | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: every module initialises itself on construction, and ``from_pretrained`` loads all tensors."""

    def _constant(self, name: str, device: torch.device) -> Tensor:
        """A small tensor made from the config, cached per device: ``label_ids_<i>`` (source i's union ids) or a
        normalisation (``vit_image_mean``...) shaped (1, 3, 1, 1).

        Not a buffer: ``from_pretrained`` builds the model on the meta device and
        would leave non-persistent buffers empty.
        """
        key = (name, device)
        if key not in self._constants:
            source = name.removeprefix("label_ids_")
            if source != name:
                value = torch.tensor(self.config.source_labels[int(source)], dtype=torch.long)
            else:
                value = torch.tensor(getattr(self.config, name), dtype=torch.float32).view(1, -1, 1, 1)
            self._constants[key] = value.to(device)
        return self._constants[key]

    def gate_logits(self, pixel_values: Tensor) -> Tensor:
        """G(x) (batch, N) from the ViT processor's ``pixel_values``.

        The gate's input is made here, so one processor (the ViT's) serves both:
        undo the ViT normalisation, resize (bilinear) to the gate's size, and
        normalise as the gate's processor does. At inference (the gate in eval mode,
        no gradient) the gate runs as a :class:`FoldedGate`, rebuilt when its
        tensors change; in training, or with gradients on, the gate module itself runs.
        """
        dtype = self.gate.classifier.weight.dtype
        device = pixel_values.device
        images = pixel_values.float() * self._constant("vit_image_std", device) + self._constant("vit_image_mean", device)
        size = _pair(self.config.gate_image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
        images = (images - self._constant("gate_image_mean", device)) / self._constant("gate_image_std", device)
        images = images.to(dtype)
        if self.gate.training or torch.is_grad_enabled():
            return self.gate(pixel_values=images).logits
        return self._inference_gate().logits(images)

    def _inference_gate(self) -> FoldedGate:
        """The gate folded for inference, cached until the gate's tensors change."""
        if self._folded_gate is None or not self._folded_gate.matches(self.gate):
            with torch.inference_mode(False), torch.no_grad():
                self._folded_gate = FoldedGate(self.gate)
        return self._folded_gate

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        *,
        gate_probs: Tensor | None = None,
        routing: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> GatedImageClassifierOutput | tuple[Any, ...]:
        """Classify ``pixel_values`` (the ViT processor's) over the union labels.

        Args:
            labels: union label ids; the loss is the cross-entropy over the union logits.
            gate_probs: (batch, N) task probabilities to use instead of the gate's (tests: one-hot, uniform).
            routing: ``"soft"`` or ``"top1"``; default ``config.routing``.
            kwargs: ignored (``pipeline`` and ``Trainer`` pass options ViT models take).
        """
        routing = routing or self.config.routing
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        keep_hidden = bool(output_hidden_states if output_hidden_states is not None
                           else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        pixel_values = pixel_values.to(self.vit.embeddings.cls_token.dtype)
        if gate_probs is None:
            gate_probs = self.gate_logits(pixel_values).float().softmax(dim=-1)  # Eq. 1
        gate_probs = gate_probs.to(pixel_values.device)
        task = gate_probs.argmax(dim=-1)  # Eq. 3
        if routing == "soft":
            sequence, hidden = self.vit(pixel_values, Route(probs=gate_probs), keep_hidden=keep_hidden)
        else:
            sequence, hidden = self._top1(pixel_values, task, keep_hidden)
        logits = self._classify(sequence[:, 0], task)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        output = GatedImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=tuple(hidden) if keep_hidden else None,
            gate_probs=gate_probs, task=task,
        )
        return output if return_dict else output.to_tuple()

    def _top1(self, pixel_values: Tensor, task: Tensor, keep_hidden: bool) -> tuple[Tensor, list[Tensor]]:
        """Top-1 routing: each group of samples of one argmax source runs with that source's gated weights."""
        sequence: Tensor | None = None
        hidden: list[Tensor] = []
        for source in task.unique().tolist():
            index = (task == source).nonzero().squeeze(1)
            part, part_hidden = self.vit(pixel_values[index], Route(source=source), keep_hidden=keep_hidden)
            if sequence is None:
                sequence = part.new_empty((pixel_values.shape[0], *part.shape[1:]))
                hidden = [h.new_empty((pixel_values.shape[0], *h.shape[1:])) for h in part_hidden]
            sequence[index] = part
            for full, piece in zip(hidden, part_hidden):
                full[index] = piece
        if sequence is None:
            raise ValueError("pixel_values holds no image")
        return sequence, hidden

    def _classify(self, cls: Tensor, task: Tensor) -> Tensor:
        """Sample b's logits: classifiers[task_b](cls_b) at its labels' union ids, -inf elsewhere (Eq. 3)."""
        logits = cls.new_full((cls.shape[0], len(self.config.id2label)), -math.inf)
        for source in task.unique().tolist():
            index = (task == source).nonzero().squeeze(1)
            columns = self._constant(f"label_ids_{source}", logits.device)
            logits[index.unsqueeze(1), columns.unsqueeze(0)] = self.classifiers[source](cls[index]).to(logits.dtype)
        return logits


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _vit_tensor_keys(config: GatedMergedConfig) -> list[str]:
    """The checkpoint key of every ViT tensor this config describes (classifier excluded)."""
    def module(name: str, bias: bool = True) -> list[str]:
        return [f"{name}.weight", f"{name}.bias"] if bias else [f"{name}.weight"]

    keys = ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
            *module("vit.embeddings.patch_embeddings.projection")]
    qkv_bias = bool(config.vit_value("qkv_bias"))
    for layer in range(config.vit_value("num_hidden_layers")):
        prefix = f"vit.encoder.layer.{layer}"
        keys += [*module(f"{prefix}.layernorm_before"),
                 *(k for name in ("query", "key", "value") for k in module(f"{prefix}.attention.attention.{name}",
                                                                           qkv_bias)),
                 *module(f"{prefix}.attention.output.dense"), *module(f"{prefix}.layernorm_after"),
                 *module(f"{prefix}.intermediate.dense"), *module(f"{prefix}.output.dense")]
    return keys + module("vit.layernorm")
