"""The order in which a model runs its modules, measured by a traced forward pass.

Registration order (``state_dict()``) is not the order a model runs: UperNet
registers its output classifier first in its head, ViT registers
``layernorm_before`` after the attention projections, ResNet registers a
block's shortcut before the main branch that runs first. Layer-wise merging
numbers layers j = 1..Np by depth (Alcover-Couso et al., §3.3, Eq. 1), so the
depth order is measured: forward pre-hooks on every module record its first
call while the model runs one image.

The pass runs on the meta device (no memory, no arithmetic). A family whose
forward cannot run there (Mask2Former) gives a shrunk copy of its config with
the same module names, and a tiny instance of it runs on the CPU instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardOrder:
    """Tensor-owning modules of a model in the order its forward pass reaches them.

    Attributes:
        modules: every module that owns a tensor of the ``state_dict``, by first
            call; a module whose parameters are used without calling it
            (Mask2Former's ``level_embed`` embedding, ``MultiheadAttention``'s
            ``out_proj``) takes its nearest called ancestor's position, right
            after the ancestor's own tensors. Modules in ``not_run`` come last.
        not_run: modules that own only buffers and never run in inference: loss
            weights such as Mask2Former's ``criterion.empty_weight``. They are
            not model state the forward pass uses, so never layers.
    """

    modules: tuple[str, ...]
    not_run: tuple[str, ...] = ()


def record_first_calls(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any]) -> list[str]:
    """Run ``run(model)`` and return module names in the order of their first call."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[str, None] = {}

    def hook(module: torch.nn.Module, args: Any) -> None:
        calls.setdefault(names[module], None)

    handles = [module.register_forward_pre_hook(hook) for module in names]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls)


def order_modules(owners: Sequence[str], calls: Sequence[str], buffer_only: Iterable[str] = ()) -> ForwardOrder:
    """Order tensor owners by first call; a pure function of names.

    Args:
        owners: modules owning ``state_dict`` tensors, in registration order
            (the tie-break between modules reached at one call).
        calls: module names in the order of their first call.
        buffer_only: owners whose tensors are all buffers.
    """
    position = {name: i for i, name in enumerate(calls)}
    buffer_only = set(buffer_only)

    def called_ancestor(name: str) -> str | None:
        while name not in position:
            if not name:
                return None
            name = name.rpartition(".")[0]
        return name

    keyed, not_run = [], []
    for rank, owner in enumerate(owners):
        if owner in position:
            keyed.append(((position[owner], 0, rank), owner))
        elif owner in buffer_only:
            not_run.append(owner)
        else:
            ancestor = called_ancestor(owner)
            keyed.append(((position[ancestor] if ancestor is not None else len(calls), 1, rank), owner))
    ordered = [owner for _, owner in sorted(keyed)]
    return ForwardOrder(tuple(ordered + not_run), tuple(not_run))


def _input_size(config: Any) -> tuple[int, int]:
    config = getattr(config, "vision_config", None) or config  # a CLIPModel's images are its vision tower's
    backbone = getattr(config, "backbone_config", None)
    channels = getattr(config, "num_channels", None) or getattr(backbone, "num_channels", None) or 3
    size = getattr(config, "image_size", None) or 64  # ViT needs its own size; conv and Swin models take any
    return int(channels), int(size[0] if isinstance(size, (list, tuple)) else size)


def trace_model(model: torch.nn.Module, config: Any, device: str, image_encoder: str | None = None) -> ForwardOrder:
    """Run ``model`` on one image on ``device`` and order its tensor owners.

    ``image_encoder`` names the method that takes images alone where the forward needs more (a ``CLIPModel``'s
    ``get_image_features``); the owners it never reaches (the text tower) follow, in registration order.
    """
    channels, size = _input_size(config)
    pixels = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if image_encoder is None:
        calls = record_first_calls(model.eval(), lambda m: m(pixel_values=pixels))
    else:
        calls = record_first_calls(model.eval(), lambda m: getattr(m, image_encoder)(pixel_values=pixels))
    with_parameters = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    owners = list(dict.fromkeys(name.rpartition(".")[0] for name in model.state_dict()))
    return order_modules(owners, calls, [o for o in owners if o not in with_parameters])


class Traceable(Protocol):
    """What tracing reads of a family: a :class:`~hfmerge.adapters.base.FamilyAdapter` is one. Declared
    here, so that this module, which ``base`` imports, imports nothing of the package back."""

    @property
    def name(self) -> str: ...

    @property
    def trace_config(self) -> Callable[[Any], Any] | None: ...

    @property
    def explicit_order(self) -> Callable[[str, Any], ForwardOrder] | None: ...

    @property
    def image_encoder(self) -> dict[str, str]: ...

    def model_class(self, architecture: str) -> type[torch.nn.Module]: ...

    def build_meta_model(self, architecture: str, config: Any) -> torch.nn.Module: ...


_CACHE: dict[tuple[str, str, str], ForwardOrder] = {}


def forward_order(family: Traceable, architecture: str, config: Any) -> ForwardOrder:
    """The :class:`ForwardOrder` of ``architecture`` built from ``config``, cached per (architecture, config).

    Label maps are left out of the cache key: sources that differ only in their
    classes or folders share one trace.

    An adapter's ``explicit_order`` wins where it is given; otherwise the model
    runs on the meta device, or, for a family with ``trace_config``, as a tiny
    CPU instance of that shrunk config (same module names, small widths).
    """
    # Labels change shapes, never the order; the folder a config was read from changes nothing.
    described = {k: v for k, v in config.to_dict().items()
                 if k not in ("id2label", "label2id", "_name_or_path", "transformers_version")}
    key = (family.name, architecture, json.dumps(described, sort_keys=True, default=str))
    if key not in _CACHE:
        if family.explicit_order is not None:
            _CACHE[key] = family.explicit_order(architecture, config)
        else:
            _CACHE[key] = _trace(family, architecture, config)
    return _CACHE[key]


def _trace(family: Traceable, architecture: str, config: Any) -> ForwardOrder:
    rng = torch.random.get_rng_state()  # building a CPU instance draws weights; leave the caller's seed alone
    threads = torch.get_num_threads()
    model = None
    try:
        if family.trace_config is not None:
            small = family.trace_config(config)
            model = family.model_class(architecture)(small)
            torch.set_num_threads(1)  # a tiny model's small ops run fastest on one thread
            return trace_model(model, small, "cpu", family.image_encoder.get(architecture))
        model = family.build_meta_model(architecture, config)
        return trace_model(model, config, "meta", family.image_encoder.get(architecture))
    except Exception as exc:  # noqa: BLE001 - an untraceable variant still inspects, in registration order
        logger.warning(
            "%s: the forward pass could not be traced (%s: %s); layers follow registration order",
            architecture, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
        )
        model = model if model is not None else family.build_meta_model(architecture, config)
        return ForwardOrder(tuple(dict.fromkeys(name.rpartition(".")[0] for name in model.state_dict())))
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
