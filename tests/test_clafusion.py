"""CLAFusion end to end: networks of different depth fused into the deeper one's architecture.

Properties that must hold: a ResNet-18/34-shaped pair fuses by repo id from the
test Hub into a plain-transformers ResNet-34; a deeper model made from a shallower
one by adding identity layers, fused with it, gives that deeper model back (ResNet
and VGG by adding layers; an MLP by merging them back); at equal depth CLAFusion
is OTFusion; three sources fuse as §3.3 says; the card shows the alignment; bad
input is one line and writes nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli
from test_every_method import random_images

import hfmerge
from hfmerge.adapters import family_for_model_type
from hfmerge.methods.ot.balancing import deepen
from hfmerge.modeling.classic import (
    HfMergeMLPConfig,
    HfMergeVGGConfig,
    MLPForImageClassification,
    VGGForImageClassification,
)
from hfmerge.testing.tiny import randomise_batch_norms, save_tiny

DIGITS = [str(d) for d in range(10)]


def _resnet(depths, seed=0, *, layer_type="basic", labels=None, widths=(8, 8, 16, 16)):
    """A tiny ResNet with the depths given (ResNet-18: 2, 2, 2, 2; ResNet-34: 3, 4, 6, 3), BatchNorms randomised."""
    labels = labels or ["a", "b", "c"]
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=list(widths[:len(depths)]), depths=list(depths),
                                       layer_type=layer_type, id2label=dict(enumerate(labels)),
                                       label2id={label: i for i, label in enumerate(labels)})
    config.architectures = ["ResNetForImageClassification"]
    torch.manual_seed(seed)
    return randomise_batch_norms(transformers.ResNetForImageClassification(config))


def _logits(model, size):
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(pixels).logits


def _deepened(model, mappings, lengths):
    return deepen(model, family_for_model_type(model.config.model_type).depth, mappings, lengths).model


@pytest.fixture(scope="module")
def resnet_pair(hub_api, tmp_path_factory):
    """ResNet-18- and ResNet-34-shaped tiny models (digit labels) on the test Hub."""
    folder = tmp_path_factory.mktemp("clafusion")
    repos = {}
    for name, depths, seed in (("resnet34", (3, 4, 6, 3), 0), ("resnet18", (2, 2, 2, 2), 1)):
        saved = save_tiny(folder / name, "resnet", model=_resnet(depths, seed, labels=DIGITS))
        repo = f"org/{name}-digits"
        hub_api.create_repo(repo, exist_ok=True)
        hub_api.upload_folder(folder_path=str(saved), repo_id=repo)
        repos[name] = repo
    return repos


def test_the_issue_command_fuses_resnet18_and_34_by_repo_id_into_a_plain_resnet34(resnet_pair, digit_hub, tmp_path,
                                                                                  capsys):
    dataset = digit_hub["datasets"]["digits"]
    out = tmp_path / "fused"
    code, _, err = run_cli(["merge", resnet_pair["resnet34"], resnet_pair["resnet18"], "--method", "clafusion",
                            "--data", f"{dataset}:train", "--param", "samples=16", "--output", out, "-q"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ResNetForImageClassification"] and config["depths"] == [3, 4, 6, 3]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    model = transformers.AutoModelForImageClassification.from_pretrained(out)  # plain transformers
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.id2label[3] == "3"
    card = (out / "README.md").read_text()
    assert "cross-layer" in card.lower() and "(layer_alignment.svg)" in card and "(layer_costs.svg)" in card
    assert "| stage 3 | 6 / 2 | 1, 6 |" in card  # a(1) = 1, a(n) = m in every stage of two blocks
    svg = (out / "layer_alignment.svg").read_text()
    assert svg.count('class="match"') == 8 and 'data-deeper="6" data-shallower="2"' in svg
    assert (out / "layer_costs.svg").read_text().count('class="cell chosen"') == 8
    pinned = (out / "hfmerge.yaml").read_text()
    assert "clafusion" in pinned and dataset in pinned


def test_dry_run_prints_the_alignment(resnet_pair, digit_hub, capsys):
    dataset = digit_hub["datasets"]["digits"]
    code, out, err = run_cli(["merge", resnet_pair["resnet18"], resnet_pair["resnet34"], "--method", "clafusion",
                              "--data", f"{dataset}:train", "--dry-run"], capsys)
    assert code == 0, err
    assert f"target (the output's architecture): {resnet_pair['resnet34']}" in out  # the deeper, named second
    assert "stage 1: 3 / 2 layers, a = [1, 3]" in out and "stage 3: 6 / 2 layers, a = [1, 6]" in out


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_a_resnet_deepened_from_another_fuses_with_it_into_itself(layer_type, tmp_path):
    """Identical but for depth: B's blocks where the alignment puts them, zero blocks between → A comes back."""
    shallow = _resnet((2, 2), seed=3, layer_type=layer_type)
    deep = _deepened(shallow, [[0, 2], [0, 3]], [3, 4])
    a = save_tiny(tmp_path / "deep", "resnet", model=deep)
    b = save_tiny(tmp_path / "shallow", "resnet", model=shallow)
    data = random_images(tmp_path / "images", count=8, size=32)
    result = hfmerge.merge([str(b), str(a)], method="clafusion", data=[str(data)], samples=8, progress=False)
    fused = hfmerge.load(str(result.save(tmp_path / "out"))).eval()
    assert [s["mapping"] for s in result.details["alignment"][0]["segments"]] == [[1, 3], [1, 4]]
    torch.testing.assert_close(_logits(fused, 32), _logits(deep, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(fused, 32), _logits(shallow, 32), atol=1e-5, rtol=1e-5)


def test_a_vgg_deepened_from_another_fuses_with_it_into_itself(tmp_path):
    torch.manual_seed(4)
    shallow = randomise_batch_norms(VGGForImageClassification(
        HfMergeVGGConfig(image_size=16, layers=[8, 8, "M", 12, "M"], num_labels=3)))
    deep = _deepened(shallow, [[0, 2], [0]], [3, 2])
    assert deep.config.layers == [8, 8, 8, "M", 12, 12, "M"]
    a, b = save_tiny(tmp_path / "deep", "vgg", model=deep), save_tiny(tmp_path / "shallow", "vgg", model=shallow)
    data = random_images(tmp_path / "images", count=32, size=16)
    result = hfmerge.merge([str(a), str(b)], method="clafusion", data=[str(data)], samples=32, progress=False)
    fused = hfmerge.load(str(result.save(tmp_path / "out"))).eval()
    torch.testing.assert_close(_logits(fused, 16), _logits(deep, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("estimate", ["sign_of_sum", "majority_vote", "average_of_sign"])
def test_merging_the_added_layers_back_gives_the_shallow_mlp(estimate, tmp_path):
    """balance=merge: an identity layer's pre-activation is ≥ 0, so D = I and W' = W₂ W₁ folds it away exactly."""
    torch.manual_seed(5)
    shallow = MLPForImageClassification(HfMergeMLPConfig(image_size=8, hidden_sizes=[16, 12], num_labels=3)).eval()
    deep = _deepened(shallow, [[0, 2]], [3])
    a, b = save_tiny(tmp_path / "deep", "mlp", model=deep), save_tiny(tmp_path / "shallow", "mlp", model=shallow)
    data = random_images(tmp_path / "images", count=8, size=8)
    result = hfmerge.merge([str(a), str(b)], method="clafusion", data=[str(data)], samples=8, progress=False,
                           parameters={"balance": "merge", "relu_estimate": estimate})
    out = result.save(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["hidden_sizes"] == [16, 12]  # the shallower is the target
    fused = hfmerge.load(str(out)).eval()
    torch.testing.assert_close(_logits(fused, 8), _logits(shallow, 8), atol=1e-5, rtol=1e-5)


def test_an_mlp_deepened_by_adding_fuses_into_itself(tmp_path):
    torch.manual_seed(6)
    shallow = MLPForImageClassification(HfMergeMLPConfig(image_size=8, hidden_sizes=[16, 12, 10], num_labels=3)).eval()
    deep = _deepened(shallow, [[0, 1, 3]], [4])
    a, b = save_tiny(tmp_path / "deep", "mlp", model=deep), save_tiny(tmp_path / "shallow", "mlp", model=shallow)
    data = random_images(tmp_path / "images", count=12, size=8)
    result = hfmerge.merge([str(b), str(a)], method="clafusion", data=[str(data)], samples=12, progress=False)
    fused = hfmerge.load(str(result.save(tmp_path / "out"))).eval()
    assert result.details["alignment"][0]["segments"][0]["mapping"] == [1, 2, 4]  # by CKA
    torch.testing.assert_close(_logits(fused, 8), _logits(deep, 8), atol=1e-5, rtol=1e-5)


def test_at_equal_depth_clafusion_is_otfusion(tmp_path):
    a = save_tiny(tmp_path / "a", "resnet", model=_resnet((2, 1), seed=7))
    b = save_tiny(tmp_path / "b", "resnet", model=_resnet((2, 1), seed=8))
    data = random_images(tmp_path / "images", count=8, size=32)
    runs = {method: hfmerge.merge([str(a), str(b)], method=method, data=[str(data)], samples=8, progress=False)
            for method in ("clafusion", "otfusion")}
    models = {method: hfmerge.load(str(run.save(tmp_path / method))).eval() for method, run in runs.items()}
    clafusion, otfusion = (dict(models[m].state_dict()) for m in ("clafusion", "otfusion"))
    assert clafusion.keys() == otfusion.keys()
    for name, tensor in clafusion.items():
        torch.testing.assert_close(tensor, otfusion[name], atol=1e-6, rtol=1e-6, msg=name)


def test_three_sources_align_to_the_deepest(tmp_path):
    """§3.3: each source aligned and balanced against the deepest, then all fused."""
    folders = [save_tiny(tmp_path / f"s{i}", "resnet", model=_resnet(depths, seed=10 + i))
               for i, depths in enumerate([(1, 2), (3, 3), (2, 1)])]
    data = random_images(tmp_path / "images", count=8, size=32)
    result = hfmerge.merge([str(f) for f in folders], method="clafusion", data=[str(data)], samples=8,
                           progress=False)
    assert result.planned.context.anchor_index == 1
    alignment = result.details["alignment"]
    assert [a["source"] for a in alignment] == ["s0", "s2"]
    assert [s["mapping"] for s in alignment[0]["segments"]] == [[1], [1, 3]]
    assert [s["mapping"] for s in alignment[1]["segments"]] == [[1, 3], [1]]
    assert hfmerge.load(str(result.save(tmp_path / "out"))).config.depths == [3, 3]


def test_fine_tuning_with_distillation_from_the_deeper_source(resnet_pair, digit_hub, tmp_path, capsys):
    dataset = digit_hub["datasets"]["digits"]
    out = tmp_path / "distilled"
    code, _, err = run_cli(["merge", resnet_pair["resnet18"], resnet_pair["resnet34"], "--method", "clafusion",
                            "--data", f"{dataset}:train", "--param", "samples=64", "--param", "finetune_epochs=1",
                            "--param", "distill_weight=0.5", "--param", "distill_temperature=2",
                            "--output", out, "-q"], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "distilling from resnet34-digits" in card and "temperature 2.0, weight γ = 0.5" in card


@pytest.mark.parametrize("case", ["vit", "merge on a cnn", "no data", "block types", "deeper and shallower",
                                  "families"])
def test_bad_input_is_one_line_and_writes_nothing(case, make_source, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--param", "representation=neurons", "--param", "cost=weights"]
    if case == "vit":
        a = b = make_source("vit")
        fragments = ("clafusion balances the depth of mlp, resnet, vgg", "vit")
    elif case == "merge on a cnn":
        a, b = make_source("resnet"), make_source("resnet", seed=1)
        args += ["--param", "balance=merge"]
        fragments = ("balance=merge", "balance=add")
    elif case == "no data":
        a, b = make_source("resnet"), make_source("resnet", seed=1)
        args, fragments = [], ("--data", "representation=neurons")
    elif case == "block types":
        a = make_source("resnet", model=_resnet((2, 2), layer_type="bottleneck"))
        b = make_source("resnet", model=_resnet((1, 1)))
        fragments = ("layer_type", "bottleneck", "basic")
    elif case == "deeper and shallower":
        a, b = make_source("resnet", model=_resnet((3, 1))), make_source("resnet", model=_resnet((1, 2)))
        fragments = ("stage 2", "at least as deep")
    else:
        a, b = make_source("resnet"), make_source("vgg")
        fragments = ("different families", "resnet", "vgg")
    code, _, err = run_cli(["merge", str(a), str(b), "--method", "clafusion", *args, "--output", out], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_the_saved_recipe_reruns_from_the_output_folder(tmp_path, monkeypatch, capsys):
    """A local data folder given relatively is pinned as an absolute path, as local models are."""
    import yaml

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "deep", "resnet", model=_resnet((2, 2), seed=20))
    save_tiny(tmp_path / "shallow", "resnet", model=_resnet((1, 1), seed=21))
    random_images(tmp_path / "images", count=6, size=32)
    code, _, err = run_cli(["merge", "deep", "shallow", "--method", "clafusion", "--data", "images",
                            "--param", "samples=6", "--output", "out", "-q"], capsys)
    assert code == 0, err
    recipe = yaml.safe_load((tmp_path / "out" / "hfmerge.yaml").read_text())
    assert recipe["data"][0]["dataset"] == str(tmp_path / "images")
    monkeypatch.chdir(tmp_path / "out")
    code, _, err = run_cli(["run", "hfmerge.yaml", "--output", str(tmp_path / "again"), "-q"], capsys)
    assert code == 0, err
    first, second = (hfmerge.load(str(tmp_path / name)).state_dict() for name in ("out", "again"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_processor_that_does_not_fit_the_model_is_one_line(tmp_path, capsys):
    """An MLP reads images of its config's size: a processor of another size is named, not a traceback."""
    import transformers as tf

    torch.manual_seed(22)
    for name, hidden in (("a", [12, 10, 8]), ("b", [12, 8])):
        folder = save_tiny(tmp_path / name, "mlp", model=MLPForImageClassification(
            HfMergeMLPConfig(image_size=8, hidden_sizes=hidden, num_labels=3)).eval())
        tf.ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)  # 16 px for an 8 px MLP
    data = random_images(tmp_path / "images", count=4, size=16)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "clafusion",
                            "--data", str(data), "--param", "samples=4", "--output", out, "-q"], capsys)
    assert_one_line_error(code, err, "do not fit the model", "[3, 16, 16]", "preprocessor_config.json")
    assert not out.exists()
