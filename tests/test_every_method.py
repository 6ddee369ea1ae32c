"""Properties every registered method must have, whatever its maths.

Parametrized over ``available_methods()`` and over every registered family's
tiny image classifier, so a method or family added later is held to them
without touching this file: identical sources merge to themselves, the output
loads with plain transformers, a method that cannot merge a family says why in
one line (what the family's adapter declares), and bad parameters are refused
in one line before anything is read or written.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.methods import get_method
from hfmerge.testing.tiny import FAMILIES, IMAGE_SIZE, is_image_classifier, tiny_adapter, tiny_config

METHODS = hfmerge.available_methods()
CLASSIFIERS = [family for family in FAMILIES if is_image_classifier(family)]  # every family's tiny image classifier


def variants(*builtins: str) -> set[str]:
    """The methods that are one of ``builtins`` or subclass one under a name of their own (a plug-in's variant)."""
    kinds = tuple(type(get_method(name)) for name in builtins)
    return {method for method in METHODS if isinstance(get_method(method), kinds)}


# What a method says when it refuses a family's models (EMR: with its gate, which the refusal test below turns on).
REFUSED = {("regmean", "resnet"): "none outside its classifier head",  # ResNet's only nn.Linear is its head
           ("clafusion", "vit"): "clafusion balances the depth of",  # a ViT has no depth declaration
           ("gating", "resnet"): "gating merges ViT image classifiers",
           ("adamerging", "segformer"): "adamerging minimises the entropy of class predictions",
           ("fisher", "segformer"): "fisher needs the model's class probabilities",
           ("otfusion", "segformer"): "whose neurons hfmerge cannot align",
           ("emr", "segformer"): "the gate sends each image to one task's classifier"}
# Methods whose output is a model of their own, not the sources' architecture: their own tests hold them to the
# same property (tests/test_gating.py: identical sources give the source's logits through the gated model;
# tests/test_emr.py: identical sources, base = source, give each task's model equal to the source).
OWN_OUTPUT = variants("gating", "emr")
DATA_BY_DEFAULT = variants("otfusion", "clafusion")  # optional data that its default parameters use (cost=activations)


def refusal(method: str, family: str) -> str | None:
    """What ``method`` (or the built-in method it subclasses) says when it refuses ``family``'s models."""
    return next((why for (name, refused), why in REFUSED.items() if refused == family and method in variants(name)),
                None)


def merge_arguments(method: str, source: str, folder=None, sources: int = 2) -> dict:
    """What a method needs besides its sources: a base for task vectors, data (a folder of random images) for data
    methods, given once per source to the methods that need a dataset per source, and few steps to the methods
    that train for ``steps`` (identical sources merge to themselves however long they train)."""
    arguments: dict = {"base": source} if get_method(method).needs_base else {}
    if any(spec.name == "steps" and spec.type is int for spec in get_method(method).parameters):
        arguments["steps"] = 5
    needs = get_method(method).data_needs()
    if needs.required or method in DATA_BY_DEFAULT:
        images = str(random_images(folder / "images"))
        arguments.update(data=[images] * (sources if needs.per_source else 1), samples=6)
    return arguments


def random_images(folder, count: int = 6, size: int = 20):
    """A flat folder of random RGB PNGs: unlabeled data, as a user's image folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image-{i}.png")
    return folder


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def expected_refusal(method: str, family: str, source) -> tuple[str, ...] | None:
    """What ``method`` must say when it refuses ``family``'s tiny classifier, from what the family's adapter declares
    (its gating source and why not, its depth and neuron declarations) and what the model holds (RegMean's linear
    layers outside the head); ``None`` where it must merge it."""
    from hfmerge.adapters import inspect_source
    from hfmerge.hub.resolve import resolve_source

    adapter = tiny_adapter(family)
    if method in variants("gating") and tiny_config(family).architectures[0] != adapter.gating_source:
        return ("gating merges ViT image classifiers", *([adapter.gating_refusal] if adapter.gating_refusal else []))
    if method in variants("clafusion") and (adapter.depth is None or adapter.neurons is None):
        return ("clafusion balances the depth of",)
    if method in variants("otfusion") and adapter.neurons is None:
        return ("whose neurons hfmerge cannot align",)
    if method in variants("regmean"):
        layout = inspect_source(resolve_source(str(source)))
        heads = {info.module for info in layout.head_tensors}
        if not any(module not in heads for group in layout.linear_groups for module in group):
            return ("none outside its classifier head",)
    return None


@pytest.mark.parametrize("family", CLASSIFIERS)
@pytest.mark.parametrize("method", METHODS)
def test_identical_sources_merge_to_themselves_and_load_with_transformers(method, family, make_source, tmp_path,
                                                                          capsys):
    """Every method on every registered family's tiny image classifier: identical sources give themselves back,
    and the output loads with plain transformers and computes the source's logits; or a one-line refusal that says
    why, with nothing written."""
    source = make_source(family, 3, seed=5)
    arguments = merge_arguments(method, str(source), tmp_path)
    refused = expected_refusal(method, family, source)
    if refused:
        args = ["merge", source, source, "-m", method, "-o", tmp_path / "out"]
        args += [f"--base={source}"] if get_method(method).needs_base else []
        args += [f"--data={data}" for data in arguments.get("data", [])]
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, *refused, family)
        assert not (tmp_path / "out").exists()
        return
    if method in OWN_OUTPUT:
        pytest.skip(f"{method} writes a model of its own; its own tests (tests/test_gating.py, tests/test_emr.py, "
                    "tests/test_every_family.py) check it merges identical sources to themselves")
    result = hfmerge.merge([str(source), str(source)], method=method, progress=False, **arguments)
    merged, original = load_plain(result.save(tmp_path / "out")), load_plain(source)
    expected = original.state_dict()
    labels = len(original.config.id2label)
    copies = len(merged.config.id2label) // labels  # 2 when the heads were concatenated (fusion), else 1
    assert copies * labels == len(merged.config.id2label)
    head = {info.name for info in result.planned.anchor.head_tensors}
    solved = get_method(method).data_needs().required  # RegMean solves a linear system: float32 rounding, not bits
    for name, value in merged.state_dict().items():
        want = torch.cat([expected[name]] * copies) if name in head else expected[name]
        if solved and value.is_floating_point():
            torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-5, msg=name)
        else:
            assert torch.equal(value, want), name
    pixels = torch.rand(1, 3, IMAGE_SIZE[family], IMAGE_SIZE[family])
    with torch.no_grad():
        logits, reference = merged(pixel_values=pixels).logits, original(pixel_values=pixels).logits
    torch.testing.assert_close(logits, torch.cat([reference] * copies, dim=-1))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == original.config.model_type


@pytest.mark.parametrize("method", METHODS)
def test_bad_parameters_are_refused_in_one_line_and_nothing_is_written(method, make_source, tmp_path, capsys):
    source = str(make_source("vit", seed=1))
    extra = [f"--base={source}"] if get_method(method).needs_base else []
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", source, source, "-m", method, "-o", out, "--param", "no_such_parameter=1", *extra],
                           capsys)
    assert_one_line_error(code, err, "no_such_parameter")
    for spec in get_method(method).parameters:
        bad = "not-a-number" if spec.type in (int, float) else "no-such-choice"
        if spec.type is str and not spec.choices:
            continue
        code, _, err = run_cli(["merge", source, source, "-m", method, "-o", out, "--param", f"{spec.name}={bad}",
                                *extra], capsys)
        assert_one_line_error(code, err, spec.name)
    assert not out.exists()


UNREACHABLE = "nobody/unreachable-{}"  # a Hub repo id that HF_HUB_OFFLINE and the test's empty cache make unreachable


def unreachable_auxiliaries(method: str) -> dict[str, str]:
    """The method's auxiliary models (a gate...) as parameters: its default ones when it has any (gating's gate on the
    Hub), else each parameter that names one set to an unreachable repo (EMR's optional gate)."""
    spec = get_method(method)
    if spec.auxiliary_models(spec.validate_parameters({})):
        return {}
    named = {p.name: UNREACHABLE.format(p.name) for p in spec.parameters if p.type is str and not p.choices}
    return {name: ref for name, ref in named.items()
            if ref in spec.auxiliary_models(spec.validate_parameters({name: ref})).values()}


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize(("method", "family"),
                         sorted({(method, family) for (name, family) in REFUSED for method in variants(name)}))
def test_a_refused_family_is_said_before_the_base_and_auxiliary_models_are_resolved(
        method, family, dry_run, make_source, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the base and the auxiliary models cannot be had
    spec = get_method(method)
    source = str(make_source(family, seed=1))
    parameters = unreachable_auxiliaries(method)
    auxiliaries = spec.auxiliary_models(spec.validate_parameters(parameters))
    args = ["merge", source, source, "-m", method, "-o", tmp_path / "out", *(["--dry-run"] if dry_run else [])]
    args += [f"--param={name}={value}" for name, value in parameters.items()]
    if spec.needs_base:
        args.append(f"--base={UNREACHABLE.format('base')}")
    if spec.data_needs(spec.validate_parameters(parameters)).any:
        args += [f"--data={random_images(tmp_path / f'images-{i}')}" for i in range(2)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, refusal(method, family))
    for unreachable in [UNREACHABLE.format("base"), *auxiliaries.values()]:
        assert unreachable not in err
    assert not (tmp_path / "out").exists()
