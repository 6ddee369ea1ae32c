"""What the neuron-group tests share: tiny models re-drawn at unit scale, copies permuted group by group.

A copy of a model whose state is permuted group by group (hfmerge/testing/permute.py) computes the
same outputs as the original only if every group holds every tensor dimension that indexes its
units. The models are re-drawn at unit scale (biases, norms, layer scales and BatchNorm statistics
included), so that a dimension left out of a group moves the outputs far beyond the tolerance.
Used by tests/test_neuron_groups.py, tests/test_convnext_swin.py and tests/test_vitlike_families.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import transformers

from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source
from hfmerge.testing.permute import permute_groups, unit_index


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every float tensor re-drawn at unit scale: weights N(0, 1/fan_in); norms, layer scales, biases and
    BatchNorm statistics spread, so that none is the constant a fresh model starts with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.5)
            elif tensor.dim() > 1:
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
            elif name.endswith(("weight", "layer_scale_parameter")):
                tensor.copy_(1.0 + 0.3 * noise)
            else:
                tensor.copy_(0.5 * noise)
    return model.eval()


def built_models(config_of: Callable[[str], Any]) -> Any:
    """A module-scoped fixture ``built``: ``built(case)`` is a randomised model of ``config_of(case)``'s
    first architecture and its inspected layout, built once per case for the module that assigns it."""

    @pytest.fixture(scope="module")
    def built(tmp_path_factory):
        cache: dict[str, tuple[torch.nn.Module, Any]] = {}

        def build(case: str):
            if case not in cache:
                config = config_of(case)
                torch.manual_seed(0)
                model = randomised(getattr(transformers, config.architectures[0])(config))
                folder = tmp_path_factory.mktemp(case)
                model.save_pretrained(folder)
                cache[case] = (model, inspect_source(resolve_source(str(folder))))
            return cache[case]

        yield build
        cache.clear()

    return built


def outputs(model: torch.nn.Module, size: int, modules: Iterable[str] = ()) -> tuple[torch.Tensor, dict]:
    """The model's main output (logits or last hidden state) on fixed random images, and the outputs of ``modules``."""
    seen: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    handles = [named[m.removesuffix("#input")].register_forward_hook(  # <module>#input: what the module receives
        lambda mod, args, out, m=m: seen.setdefault(m, (args[0] if m.endswith("#input") else out).clone()))
        for m in modules]
    try:
        with torch.no_grad():
            out = model(pixel_values=torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)))
    finally:
        for handle in handles:
            handle.remove()
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return main, seen


def permuted_copy(model: torch.nn.Module, groups, seed: int = 3):
    """A copy of ``model`` with every group in ``groups`` permuted: (copy, its state, the permutations by group)."""
    state, perms = permute_groups(model.state_dict(), groups, seed)
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state)
    return copy, state, perms


def assert_permuted_copy_keeps_outputs(model: torch.nn.Module, groups, size: int):
    """A copy permuted in every group computes the same outputs, and what each group says carries its units
    (its activations) does, and moves with them. Returns the copy's state and the permutations by group."""
    copy, state, perms = permuted_copy(model, groups)
    modules = list(dict.fromkeys(m for g in groups for m in g.activations))
    before, acts_before = outputs(model, size, modules)
    after, acts_after = outputs(copy, size, modules)
    assert before.abs().max() > 0.1  # outputs at a scale where a misplaced dimension shows
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for group in groups:
        assert group.activations, group.name
        index = unit_index(perms[group.name], group.unit)
        for module in group.activations:
            original, moved = acts_before[module], acts_after[module]
            assert original.shape[group.activation_dim] == group.size * group.unit, (group.name, module)
            torch.testing.assert_close(moved, original.index_select(group.activation_dim % original.dim(), index),
                                       atol=1e-5, rtol=1e-5)
    return state, perms


def assert_groups_move_only_their_tensors(model: torch.nn.Module, groups) -> None:
    """Each group's permutation is no identity and changes every member; a tensor in no group stays as it was."""
    original = model.state_dict()
    _, state, perms = permuted_copy(model, groups)
    for group in groups:
        assert group.size > 1 and not torch.equal(perms[group.name], torch.arange(group.size)), group.name
        for tensor, dim in group.members:
            assert not torch.equal(state[tensor], original[tensor]), (group.name, tensor, dim)
    grouped = {t for g in groups for t, _ in g.members}
    assert all(torch.equal(state[t], original[t]) for t in original if t not in grouped)


def assert_groups_spare_labels_and_pixels(layout, groups, state: dict[str, torch.Tensor], rgb_input: str) -> None:
    """Groups are disjoint and uniquely named, hold no head's output rows (the labels keep their order) and not
    the input channels of ``rgb_input`` (the tensor, by the end of its name, whose dim 1 reads the image)."""
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members))
    assert len({g.name for g in groups}) == len(groups)
    heads = {t.name for t in layout.head_tensors}
    assert not any(t in heads and d == 0 for t, d in members)
    rgb = next(name for name in state if name.endswith(rgb_input))
    assert (rgb, 1) not in members
