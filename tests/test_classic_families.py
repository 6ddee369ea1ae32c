"""hfmerge's own MLP and VGG-style classifiers: families like the others, outside transformers.

They save with their modeling file (so plain transformers loads them with
``trust_remote_code``, and hfmerge without), inspect, trace, merge by folder
and by repo id, and their neuron groups are exactly their hidden units.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import run_cli

import hfmerge
from hfmerge.adapters import inspect_source, supported_families
from hfmerge.hub.resolve import resolve_source
from hfmerge.modeling.classic import MODELING_FILE
from hfmerge.testing.permute import permute_groups
from hfmerge.testing.tiny import CLASSIC_FAMILIES, IMAGE_SIZE, save_tiny


def _pixels(family, n=3, seed=0):
    size = IMAGE_SIZE[family]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_the_adapters_name_the_classic_module_s_types_and_file():
    """The adapters read the names from ``hfmerge.modeling`` (declaring them imports no model class); the
    self-contained modeling file defines its own: both must agree."""
    from hfmerge import modeling
    from hfmerge.modeling import classic

    assert (modeling.MLP_TYPE, modeling.VGG_TYPE, modeling.MODELING_FILE) == (
        classic.MLP_TYPE, classic.VGG_TYPE, classic.MODELING_FILE)
    assert classic.HfMergeMLPConfig.model_type == modeling.MLP_TYPE
    assert classic.HfMergeVGGConfig.model_type == modeling.VGG_TYPE


@pytest.mark.parametrize("family", CLASSIC_FAMILIES)
def test_saved_models_load_with_hfmerge_and_with_plain_transformers_remote_code(family, tmp_path):
    folder = save_tiny(tmp_path / family, family, 3, seed=2)
    assert (folder / MODELING_FILE).is_file()
    model = hfmerge.load(str(folder)).eval()
    with torch.no_grad():
        expected = model(pixel_values=_pixels(family)).logits
    torch.save(_pixels(family), tmp_path / "pixels.pt")
    code = (
        "import sys, torch, transformers\n"
        "assert 'hfmerge' not in sys.modules\n"
        "m = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert 'hfmerge' not in sys.modules, 'the modeling file must be self-contained'\n"
        "with torch.no_grad(): print(m(pixel_values=torch.load(sys.argv[2])).logits.tolist())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "pixels.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(eval(done.stdout)), expected)


@pytest.mark.parametrize("family", CLASSIC_FAMILIES)
def test_permuting_every_neuron_group_keeps_the_function(family, tmp_path):
    folder = save_tiny(tmp_path / family, family, 3, seed=4)
    layout = inspect_source(resolve_source(str(folder)))
    model = hfmerge.load(str(folder)).eval()
    state, permutations = permute_groups(model.state_dict(), layout.neuron_groups, seed=1)
    permuted = hfmerge.load(str(folder)).eval()
    permuted.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(permuted(pixel_values=_pixels(family)).logits,
                                   model(pixel_values=_pixels(family)).logits, atol=1e-5, rtol=1e-5)
    # every hidden unit is in exactly one group: each non-head linear/conv output dimension, once
    members = [m for g in layout.neuron_groups for m in g.members]
    assert len(members) == len(set(members))
    hidden = {f"{module}.weight" for module, cls in layout.module_classes.items()
              if cls in (torch.nn.Linear, torch.nn.Conv2d) and module != "classifier"}
    assert {t for t, d in members if d == 0 and t.endswith(".weight")} >= hidden
    assert all(t != "classifier.weight" or d == 1 for t, d in members)  # never the labels
    assert len(permutations) == (2 if family == "mlp" else 3)


@pytest.mark.parametrize("family", CLASSIC_FAMILIES)
def test_identical_sources_average_to_themselves_by_folder_and_by_repo_id(family, publish, tmp_path, capsys):
    folder = save_tiny(tmp_path / family, family, 3, seed=5)
    publish(f"org/classic-{family}", folder)
    for sources in ([folder, folder], [f"org/classic-{family}", f"org/classic-{family}"]):
        out = tmp_path / f"out-{len(str(sources[0]))}"
        code, _, err = run_cli(["merge", *sources, "--method", "average", "--output", out, "-q"], capsys)
        assert code == 0, err
        assert (out / MODELING_FILE).read_text() == (folder / MODELING_FILE).read_text()
        card = (out / "README.md").read_text()  # the card tells how it loads: hfmerge, or remote code
        assert "defined by hfmerge" in card and "trust_remote_code=True" in card and "hfmerge.load(" in card
        merged, original = hfmerge.load(str(out)), hfmerge.load(str(folder))
        for name, value in original.state_dict().items():
            assert torch.equal(merged.state_dict()[name], value), name


def test_the_families_are_listed_and_inspected(tmp_path, capsys):
    assert {"mlp", "vgg"} <= set(supported_families())
    folder = save_tiny(tmp_path / "vgg", "vgg", 3)
    code, out, err = run_cli(["inspect", folder], capsys)
    assert code == 0, err
    assert "VGGForImageClassification" in out


def test_the_layer_order_is_the_forward_order(tmp_path):
    folder = save_tiny(tmp_path / "vgg", "vgg", 3)
    layout = inspect_source(resolve_source(str(folder)))
    model = hfmerge.load(str(folder)).eval()
    seen = []
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: seen.append(name))
             for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    with torch.no_grad():
        model(pixel_values=_pixels("vgg", 1))
    for hook in hooks:
        hook.remove()
    assert layout.layers == seen
