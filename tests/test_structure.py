"""Structure in the adapters: module kinds, and linear layers grouped by the input they read.

The groups are declared as data in each adapter; here a tiny model of every
family runs one batch with a forward hook on every ``nn.Linear`` and the
declared groups must be exactly the classes of linears that received
identical inputs (every call): no group joins two different inputs, and no
two linears that read one input are left in different groups.
"""

from __future__ import annotations

import pytest
import torch

from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source
from hfmerge.testing.tiny import FAMILIES, IMAGE_SIZE, save_tiny, tiny_model

_BUILT: dict[str, tuple[torch.nn.Module, object]] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny model of a family and its inspected layout, built once per family for this module."""

    def build(family: str):
        if family not in _BUILT:
            model = tiny_model(family)
            folder = save_tiny(tmp_path_factory.mktemp(family), family, model=model)
            _BUILT[family] = (model, inspect_source(resolve_source(str(folder))))
        return _BUILT[family]

    yield build
    _BUILT.clear()


def _inputs_seen(model: torch.nn.Module, size: int, encoder: str = "") -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            forward = getattr(model, encoder) if encoder else model  # a CLIPModel: its images' path
            forward(pixel_values=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_groups_are_exactly_the_linears_that_read_one_input(built, family):
    model, layout = built(family)
    seen = _inputs_seen(model.eval(), IMAGE_SIZE[family], layout.family.image_encoder.get(layout.architecture, ""))
    seen = {name: inputs for name, inputs in seen.items() if f"{name}.weight" not in layout.carried}
    grouped = [name for group in layout.linear_groups for name in group]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == set(seen)  # every linear whose input a hook sees, and only those
    group_of = {name: i for i, group in enumerate(layout.linear_groups) for name in group}
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert _same(seen[a], seen[b]) == (group_of[a] == group_of[b]), (a, b)


def test_every_family_with_linears_has_a_shared_input_group(built):
    """The hook test above is not vacuous: the transformer families do share inputs."""
    for family in ("vit", "segformer", "upernet-swin", "mask2former"):
        _, layout = built(family)
        assert any(len(group) == 3 for group in layout.linear_groups), family


def test_vit_module_kinds_and_qkv_group(built):
    _, layout = built("vit")
    kinds = layout.module_kinds
    assert kinds["vit.layers.0.attention"] == "attention"
    assert kinds["vit.layers.1.mlp"] == "mlp"
    assert kinds["vit.layers.0.attention.q_proj"] == "linear"
    assert kinds["vit.layers.0.mlp.fc1"] == "linear"
    assert kinds["classifier"] == "linear"
    assert kinds["vit.layers.0.layernorm_before"] == "norm"
    assert kinds["vit.embeddings"] == "embedding"
    assert kinds["vit.embeddings.patch_embeddings.projection"] == "conv"
    assert "vit.layers.0" not in kinds and "vit.layers.0.mlp.activation_fn" not in kinds
    assert ("vit.layers.1.attention.q_proj", "vit.layers.1.attention.k_proj", "vit.layers.1.attention.v_proj") \
        in layout.linear_groups
    assert ("vit.layers.1.attention.o_proj",) in layout.linear_groups


@pytest.mark.parametrize("family,expected", [
    ("resnet", {"conv", "norm", "linear"}),
    ("upernet-convnext", {"conv", "norm", "linear"}),
    ("segformer", {"conv", "norm", "linear", "attention", "mlp"}),
    ("mask2former", {"conv", "norm", "linear", "attention", "mlp", "embedding"}),
])
def test_module_kinds_of_other_families(built, family, expected):
    _, layout = built(family)
    assert set(layout.module_kinds.values()) == expected
    assert all(layout.module_classes[name].__name__ != "ModuleList" for name in layout.module_kinds)
