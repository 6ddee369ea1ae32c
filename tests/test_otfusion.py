"""OTFusion (Singh & Jaggi 2020): neurons aligned by optimal transport through BatchNorm and residual streams.

The properties that must hold: a model fused with a copy of itself whose neurons
were permuted (every neuron group: channels with their BatchNorm, residual
streams of ResNet stages, ViT heads and MLP neurons, MobileNetV2 expansions)
recovers the permutation exactly and reproduces the original model; models
trained from different seeds fuse better than they average; widths that differ
fuse into the target's widths; bad input is one line and writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from test_every_method import random_images

import hfmerge
from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source
from hfmerge.testing.permute import permute_groups
from hfmerge.testing.tiny import IMAGE_SIZE, randomise_batch_norms, save_tiny

FAMILIES = ["mlp", "vgg", "resnet", "resnet-bottleneck", "vit", "mobilenet_v2"]


def _layout(folder):
    return inspect_source(resolve_source(str(folder)))


def _model(folder):
    return hfmerge.load(str(folder)).eval()


def _bottleneck_resnet(seed):
    """A tiny bottleneck ResNet: stage 0 with an identity shortcut, stage 1 with a shortcut convolution."""
    import transformers

    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                                       layer_type="bottleneck", num_labels=3)
    config.architectures = ["ResNetForImageClassification"]
    torch.manual_seed(seed)
    return randomise_batch_norms(transformers.ResNetForImageClassification(config))


def _save(folder, family, seed=0, model=None):
    if family == "resnet-bottleneck":
        return save_tiny(folder, "resnet", 3, model=model if model is not None else _bottleneck_resnet(seed))
    return save_tiny(folder, family, 3, seed=seed, model=model)


def _permuted_pair(tmp_path, family, seed=3):
    """A tiny model and a copy of it with every neuron group permuted (the same function)."""
    original = _save(tmp_path / f"{family}-original", family, seed)
    layout = _layout(original)
    model = _model(original)
    state, permutations = permute_groups(model.state_dict(), layout.neuron_groups, seed=seed + 1)
    model.load_state_dict(state)
    permuted = _save(tmp_path / f"{family}-permuted", family, model=model)
    return original, permuted, permutations


def _logits(model, family, seed=0):
    size = IMAGE_SIZE.get(family, 32)
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(pixel_values=pixels).logits


@pytest.mark.parametrize("cost", ["activations", "weights"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_permuted_copy_aligns_back_exactly(family, cost, tmp_path):
    original, permuted, permutations = _permuted_pair(tmp_path, family)
    assert permutations and any(not torch.equal(p, torch.arange(len(p))) for p in permutations.values())
    data = random_images(tmp_path / "images", count=8, size=IMAGE_SIZE.get(family, 32))
    extra = {"data": [str(data)], "samples": 8} if cost == "activations" else {}
    # the permuted copy is the source aligned onto the original (the anchor, first)
    result = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost=cost, progress=False, **extra)
    fused = _model(result.save(tmp_path / "out"))
    reference = _model(original)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(_logits(fused, family), _logits(reference, family), atol=1e-5, rtol=1e-5)
    rows = result.details["transport_costs"]
    assert len(rows) == len(permutations)
    for row in rows:  # after alignment every matched pair is the same neuron: zero cost
        before, after = row["costs"][0]
        assert after < 1e-4, row
    moved = [row for row in rows if not torch.equal(permutations[row["group"]],
                                                    torch.arange(len(permutations[row["group"]])))]
    assert any(row["costs"][0][0] > 1e-3 for row in moved)


def test_the_permuted_copy_as_the_target_gives_the_permuted_copy(tmp_path):
    original, permuted, _ = _permuted_pair(tmp_path, "resnet")
    result = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost="weights", anchor=str(permuted),
                           progress=False)
    fused = _model(result.save(tmp_path / "out"))
    for name, value in _model(permuted).state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)


def test_fuse_weight_is_the_targets_share(tmp_path):
    """With fuse_weight=1 the result is the target; with 0 it is the aligned source (= the target's function)."""
    a = save_tiny(tmp_path / "a", "mlp", 3, seed=1)
    b = save_tiny(tmp_path / "b", "mlp", 3, seed=2)
    whole = hfmerge.merge([str(a), str(b)], method="otfusion", cost="weights", fuse_weight=1.0, progress=False)
    fused = _model(whole.save(tmp_path / "whole"))
    for name, value in _model(a).state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=0, rtol=0, msg=name)
    half = hfmerge.merge([str(a), str(b)], method="otfusion", cost="weights", progress=False)
    assert half.details["weights"] == [0.5, 0.5]


def test_three_sources_align_to_the_anchor_then_average(tmp_path):
    original = save_tiny(tmp_path / "o", "resnet", 3, seed=4)
    layout = _layout(original)
    copies = []
    for seed in (11, 12):
        model = _model(original)
        state, _ = permute_groups(model.state_dict(), layout.neuron_groups, seed=seed)
        model.load_state_dict(state)
        copies.append(str(save_tiny(tmp_path / f"p{seed}", "resnet", 3, model=model)))
    result = hfmerge.merge([str(original), *copies], method="otfusion", cost="weights", progress=False)
    fused = _model(result.save(tmp_path / "out"))
    torch.testing.assert_close(_logits(fused, "resnet"), _logits(_model(original), "resnet"), atol=1e-5, rtol=1e-5)


def test_widths_that_differ_fuse_into_the_targets_widths_and_load_with_transformers(tmp_path):
    import transformers

    from hfmerge.testing.tiny import tiny_config

    narrow = tiny_config("resnet")
    wide = tiny_config("resnet")
    wide.embedding_size, wide.hidden_sizes = 12, [12, 24]
    torch.manual_seed(0)
    wide_model = transformers.ResNetForImageClassification(wide).eval()
    target = save_tiny(tmp_path / "narrow", "resnet", 3, seed=1)
    other = save_tiny(tmp_path / "wide", "resnet", 3, model=wide_model)
    data = random_images(tmp_path / "images", count=8, size=IMAGE_SIZE["resnet"])
    result = hfmerge.merge([str(target), str(other)], method="otfusion", data=[str(data)], samples=8, progress=False)
    out = result.save(tmp_path / "out")
    assert result.details["widths_differ"]
    code = ("import sys, transformers; m = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1]);"
            "print(m.config.hidden_sizes, sum(p.numel() for p in m.parameters()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, check=True)
    assert shown.stdout.split("]")[0] + "]" == str(narrow.hidden_sizes)
    narrow_model = _model(target)
    assert int(shown.stdout.split()[-1]) == sum(p.numel() for p in narrow_model.parameters())
    costs = result.details["transport_costs"]
    assert any(row["costs"][0][0] is None for row in costs)  # no "before" where the widths differ
    card = (out / "README.md").read_text()
    assert "the same 8 images" in card  # the images actually read, not the samples parameter (200)
    assert "so neuron k has no counterpart" in card and "Vanilla averaging is not compared" in card


@pytest.mark.parametrize("family", ["resnet", "vgg", "mlp", "vit"])
def test_the_issue_command_by_repo_id_against_the_hub(family, publish, hub_api, digit_hub, tmp_path, capsys):
    original = save_tiny(tmp_path / "o", family, 10, seed=2, labels=[str(d) for d in range(10)])
    model = _model(original)
    state, _ = permute_groups(model.state_dict(), _layout(original).neuron_groups, seed=9)
    model.load_state_dict(state)
    permuted = save_tiny(tmp_path / "p", family, 10, model=model)
    publish(f"org/{family}-seed1", original)
    publish(f"org/{family}-seed2", permuted)
    dataset = digit_hub["datasets"]["digits"]
    out = tmp_path / "fused"
    code, _, err = run_cli(["merge", f"org/{family}-seed1", f"org/{family}-seed2", "--method", "otfusion",
                            "--data", f"{dataset}:train", "--param", "samples=16", "--output", out, "-q"], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "optimal transport" in card and "Transport cost per neuron group" in card
    pinned = (out / "hfmerge.yaml").read_text()
    assert "otfusion" in pinned and dataset in pinned
    torch.testing.assert_close(_logits(_model(out), family), _logits(_model(original), family), atol=1e-5, rtol=1e-5)


def test_digit_resnets_from_different_seeds_fuse_better_than_they_average(digit_resnets, tmp_path, capsys):
    """Two ResNets trained from different seeds (0.98+ each): averaged, they are at chance; aligned first, far above.

    By repo id and dataset id against the test Hub, as the issue's command; the 200 images are the paper's t.
    """
    from hfmerge.testing.digit_models import accuracy

    seed0, seed1 = digit_resnets["models"]["seed0"], digit_resnets["models"]["seed1"]
    out = tmp_path / "fused"
    code, _, err = run_cli(["merge", seed0, seed1, "--method", "otfusion", "--data", f"{digit_resnets['dataset']}:train",
                            "--param", "samples=200", "--output", out, "-q"], capsys)
    assert code == 0, err
    averaged = hfmerge.merge([seed0, seed1], method="average", progress=False).save(tmp_path / "averaged")
    sources = [accuracy(_model(digit_resnets["folders"][name]), "digits") for name in ("seed0", "seed1")]
    fused_accuracy = accuracy(_model(out), "digits")
    average_accuracy = accuracy(_model(averaged), "digits")
    assert min(sources) > 0.95 and average_accuracy < 0.3, (sources, average_accuracy)
    assert fused_accuracy > average_accuracy + 0.15, (fused_accuracy, average_accuracy)


def test_fine_tuning_the_fused_model_recovers_the_sources_accuracy(digit_resnets, tmp_path):
    from hfmerge.testing.digit_models import accuracy

    folders = digit_resnets["folders"]
    data = [f"{digit_resnets['dataset']}:train"]
    result = hfmerge.merge([str(folders["seed0"]), str(folders["seed1"])], method="otfusion", data=data,
                           samples=64, finetune_epochs=2, learning_rate=1e-3, progress=False)
    out = result.save(tmp_path / "out")
    assert result.details["finetuning"]["epochs_run"] == 2
    assert "fine-tuned on" in (out / "README.md").read_text()
    assert accuracy(_model(out), "digits") > 0.9


def test_widths_that_differ_fuse_digit_resnets_into_the_targets_widths(digit_resnets, tmp_path):
    from hfmerge.testing.digit_models import accuracy

    folders = digit_resnets["folders"]
    result = hfmerge.merge([str(folders["seed0"]), str(folders["wide"])], method="otfusion",
                           data=[f"{digit_resnets['dataset']}:train"], samples=200, progress=False)
    fused = _model(result.save(tmp_path / "out"))
    assert fused.config.hidden_sizes == _model(folders["seed0"]).config.hidden_sizes
    chance = 1 / len(fused.config.id2label)  # what unaligned averaging gives (the seeds test measures it)
    assert accuracy(fused, "digits") > chance + 0.1


@pytest.mark.parametrize("case", ["segformer", "depth", "no data", "sinkhorn"])
def test_bad_input_is_one_line_and_writes_nothing(case, make_source, tmp_path, capsys):
    import transformers

    from hfmerge.testing.tiny import tiny_config

    out = tmp_path / "out"
    if case == "segformer":
        a = b = make_source("segformer")
        args, fragments = ["--param", "cost=weights"], ("cannot align", "resnet", "vit")
    elif case == "depth":
        a = make_source("resnet")
        deeper = tiny_config("resnet")
        deeper.depths = [2, 1]
        b = save_tiny(tmp_path / "deeper", "resnet", model=transformers.ResNetForImageClassification(deeper))
        args, fragments = ["--param", "cost=weights"], ("depth", "--method clafusion")
    elif case == "no data":
        a = b = make_source("resnet")
        args, fragments = [], ("--data", "cost=weights")
    else:
        a = make_source("resnet", seed=1)
        b = make_source("resnet", seed=2)
        args, fragments = ["--param", "cost=weights", "--param", "solver=sinkhorn", "--param", "reg=1e-9"], \
            ("reg", "emd")
    code, _, err = run_cli(["merge", a, b, "--method", "otfusion", "--output", out, *args], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_dry_run_prints_the_plan_and_the_data_pass(make_source, tmp_path, capsys):
    a, b = make_source("resnet", seed=1), make_source("resnet", seed=2)
    data = random_images(tmp_path / "images", count=4, size=IMAGE_SIZE["resnet"])
    code, out, err = run_cli(["merge", a, b, "--method", "otfusion", "--data", data, "--dry-run"], capsys)
    assert code == 0, err
    assert "aligned by optimal transport" in out and "activations" in out


def test_two_processes_under_accelerate_launch_match_one(digit_resnets, tmp_path):
    """Activations gathered from two processes come back in data order: the same maps, the same tensors."""
    import subprocess

    from safetensors.torch import load_file
    from test_data_methods import _free_port

    folders = digit_resnets["folders"]
    data = f"{digit_resnets['dataset']}:train"
    sources = [str(folders["seed0"]), str(folders["seed1"])]
    one = hfmerge.merge(sources, method="otfusion", data=[data], samples=50, batch_size=8, progress=False)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "hfmerge", "merge", *sources, "--method", "otfusion", "--data", data, "--param", "samples=50",
         "--param", "batch_size=8", "-q", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two, single = load_file(out / "model.safetensors"), load_file(one.staging / "model.safetensors")
    assert two.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(two[key], single[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("cost", ["activations", "weights"])
def test_the_vit_residual_stream_aligns_when_asked(cost, tmp_path):
    """ViT's residual stream (embeddings, every LayerNorm, o_proj and fc2 rows...) permuted too: residual=true undoes it."""
    original = save_tiny(tmp_path / "o", "vit", 3, seed=6)
    layout = _layout(original)
    model = _model(original)
    state, permutations = permute_groups(model.state_dict(), layout.all_neuron_groups, seed=8)
    assert "vit (residual stream)" in permutations
    model.load_state_dict(state)
    permuted = save_tiny(tmp_path / "p", "vit", 3, model=model)
    data = random_images(tmp_path / "images", count=8, size=IMAGE_SIZE["vit"])
    extra = {"data": [str(data)], "samples": 8} if cost == "activations" else {}
    reference = _model(original)
    aligned = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost=cost, residual=True,
                            progress=False, **extra)
    fused = _model(aligned.save(tmp_path / "aligned"))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)
    left = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost=cost, progress=False, **extra)
    unaligned = _model(left.save(tmp_path / "left"))  # the stream left as it is: the merge is not the original
    key = "vit.embeddings.patch_embeddings.projection.weight"
    assert not torch.allclose(unaligned.state_dict()[key], reference.state_dict()[key])
