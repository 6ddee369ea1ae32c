"""The gated merge of ViTs as a model (hfmerge.methods.gating.model): its forward is transformers' ViT, Eq. 1-3 hold,
batching changes nothing, and it loads with hfmerge (no remote code) and with remote code (no hfmerge)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hfmerge
from hfmerge.errors import IncompatibleModelsError, SourceError
from hfmerge.methods.gating.model import (
    MODELING_FILE,
    GatedMergedForImageClassification,
    assemble_gated,
    is_gated_folder,
    save_gated,
)
from hfmerge.testing.tiny import spread_weights

LABELS = (["cat", "dog", "bird"], ["zero", "one", "two", "three"])


def _vit(seed: int, labels: list[str], *, hidden_act: str = "gelu") -> transformers.ViTForImageClassification:
    """A tiny ViT whose weights are drawn at a scale where every layer changes the logits visibly."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, hidden_act=hidden_act,
                                    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm_weight = "layernorm" in name and name.endswith(".weight")
            parameter.copy_(torch.randn_like(parameter) * (0.2 if "layernorm" in name else 0.3) + float(is_norm_weight))
    return model


def _gate(num_labels: int, *, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny MobileNetV2 classifier (its head is replaced by assemble_gated), its features not all ~0."""
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=num_labels)
    torch.manual_seed(seed)
    return spread_weights(transformers.MobileNetV2ForImageClassification(config), seed=seed).eval()


def _checkpoint(model: torch.nn.Module, folder) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint keys, as transformers itself writes them."""
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def _one_hot(index: int, batch: int, n: int = 2) -> torch.Tensor:
    probs = torch.zeros(batch, n)
    probs[:, index] = 1.0
    return probs


def _vit_keys(model: GatedMergedForImageClassification) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith("vit.")]


@pytest.fixture(scope="module")
def sources():
    return [_vit(1, LABELS[0]), _vit(2, LABELS[1])]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(5)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="module")
def all_keys(sources):
    return _vit_keys(assemble_gated(sources, None, []))


def _columns(model: GatedMergedForImageClassification, k: int) -> list[int]:
    return model.config.source_labels[k]


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_an_all_static_model_of_one_source_is_that_source(tmp_path, images, hidden_act):
    # Every ViT tensor static and equal to source 0's, its classifier chosen: transformers' ViT forward exactly.
    first, second = _vit(1, LABELS[0], hidden_act=hidden_act), _vit(2, LABELS[1], hidden_act=hidden_act)
    static = {k: v for k, v in _checkpoint(first, tmp_path).items() if k.startswith("vit.")}
    model = assemble_gated([first, second], None, [], static=static)
    out = model(images, gate_probs=_one_hot(0, len(images)))
    expected = first(images).logits
    torch.testing.assert_close(out.logits[:, _columns(model, 0)], expected, atol=1e-5, rtol=0)
    assert torch.isinf(out.logits[:, _columns(model, 1)]).all()
    assert out.task.tolist() == [0] * len(images)


def test_a_one_hot_gate_gives_that_source_exactly(sources, images, all_keys):
    model = assemble_gated(sources, None, all_keys)
    for k, source in enumerate(sources):
        for routing in ("soft", "top1"):
            out = model(images, gate_probs=_one_hot(k, len(images)), routing=routing)
            torch.testing.assert_close(out.logits[:, _columns(model, k)], source(images).logits, atol=1e-4, rtol=0)
            others = [i for i in range(len(model.config.id2label)) if i not in _columns(model, k)]
            assert torch.isneginf(out.logits[:, others]).all()
            assert out.task.tolist() == [k] * len(images)


def test_uniform_probabilities_give_the_average_of_the_gated_layers(tmp_path, sources, images, all_keys):
    tensors = [_checkpoint(s, tmp_path / str(i)) for i, s in enumerate(sources)]
    average = {k: (tensors[0][k] + tensors[1][k]) / 2 for k in all_keys}  # Eq. 2 with p = (1/2, 1/2), by hand
    gated = assemble_gated(sources, None, all_keys)
    averaged = assemble_gated(sources, None, [], static=average)
    uniform = torch.full((len(images), 2), 0.5)
    out, expected = gated(images, gate_probs=uniform), averaged(images, gate_probs=uniform)
    torch.testing.assert_close(out.logits[:, _columns(gated, 0)], expected.logits[:, _columns(gated, 0)],
                               atol=1e-5, rtol=0)
    # ...and it is not merely source 0 (the average differs from each source).
    assert not torch.allclose(out.logits[:, _columns(gated, 0)], sources[0](images).logits, atol=1e-2)


def _partly_gated(all_keys: list[str]) -> list[str]:
    """Embeddings, every LayerNorm, layer 1's attention and layer 0's MLP: the paper's strategy 4 with m = 1."""
    layers = ("vit.encoder.layer.1.attention.", "vit.encoder.layer.0.intermediate.", "vit.encoder.layer.0.output.")
    return [k for k in all_keys if "embeddings" in k or "layernorm" in k or k.startswith(layers)]


@pytest.fixture(scope="module")
def decisive_model(sources, all_keys, images):
    """A partly gated model whose gate gives ``images`` clearly different probabilities, some each side of 1/2.

    The gate's head is set so that logit_0 - logit_1 = (f - mean f)·d for the gate's features f, with |d| chosen
    to spread the difference over about ±2.
    """
    model = assemble_gated(sources, _gate(5), _partly_gated(all_keys))
    seen = []
    hook = model.gate.classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model.gate_logits(images)
    hook.remove()
    features = seen[0].detach()
    torch.manual_seed(3)
    direction = torch.randn(features.shape[1])
    direction *= 2.0 / ((features - features.mean(0)) @ direction).std()
    offset = features.mean(0) @ direction
    with torch.no_grad():
        model.gate.classifier.weight.copy_(torch.stack([direction / 2, -direction / 2]))
        model.gate.classifier.bias.copy_(torch.stack([-offset / 2, offset / 2]))
    return model


@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_a_batch_equals_its_samples_one_by_one(decisive_model, images, routing):
    model = decisive_model
    out = model(images, routing=routing, output_hidden_states=True)
    assert set(out.task.tolist()) == {0, 1}  # both sources chosen in the batch: top1 forms two groups
    assert (out.gate_probs.max(1).values - out.gate_probs.min(1).values).std() > 0.05  # p differs per sample
    for b in range(len(images)):
        # The gate alone (transformers' MobileNetV2 after the in-model preprocessing)...
        alone = model(images[b:b + 1], routing=routing)
        torch.testing.assert_close(alone.gate_probs, out.gate_probs[b:b + 1], atol=1e-5, rtol=0)
        assert torch.equal(alone.task, out.task[b:b + 1])
        # ...and the merged ViT given that sample's probabilities: batching changes nothing.
        one = model(images[b:b + 1], routing=routing, output_hidden_states=True, gate_probs=out.gate_probs[b:b + 1])
        finite = torch.isfinite(one.logits)
        assert torch.equal(finite, torch.isfinite(out.logits[b:b + 1]))
        torch.testing.assert_close(one.logits[finite], out.logits[b:b + 1][finite], atol=1e-5, rtol=0)
        for mine, batched in zip(one.hidden_states, out.hidden_states, strict=True):
            torch.testing.assert_close(mine, batched[b:b + 1], atol=1e-5, rtol=0)


def test_top1_is_soft_routing_with_the_argmax_one_hot(decisive_model, images):
    model = decisive_model
    top1 = model(images, routing="top1")
    one_hot = torch.nn.functional.one_hot(top1.gate_probs.argmax(1), 2).float()
    soft = model(images, gate_probs=one_hot, routing="soft")
    assert torch.equal(top1.task, soft.task)
    finite = torch.isfinite(soft.logits)
    assert torch.equal(finite, torch.isfinite(top1.logits))
    torch.testing.assert_close(top1.logits[finite], soft.logits[finite], atol=1e-5, rtol=0)
    # The gate's own soft routing mixes the sources: it differs from top1 (else the comparison proves nothing).
    assert not torch.allclose(model(images).logits[finite], top1.logits[finite], atol=1e-3)


def test_the_gate_reads_the_vit_pixels_as_its_own_processor_would(sources, images):
    # The ViT processor normalised with ImageNet's mean/std; the gate expects 0.5/0.5 at 24 px. By hand:
    # undo the first, resize, apply the second.
    vit_processor = transformers.ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    gate_processor = transformers.MobileNetV2ImageProcessor(crop_size={"height": 24, "width": 24})
    model = assemble_gated(sources, _gate(5), [], vit_processor=vit_processor, gate_processor=gate_processor)
    pixels = images * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    pixels = torch.nn.functional.interpolate(pixels, size=(24, 24), mode="bilinear", align_corners=False)
    expected = model.gate(pixel_values=(pixels - 0.5) / 0.5).logits
    torch.testing.assert_close(model.gate_logits(images), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(images).gate_probs, expected.softmax(-1), atol=1e-6, rtol=0)  # Eq. 1


_REMOTE = textwrap.dedent("""
    import sys
    sys.modules["hfmerge"] = None  # `import hfmerge` fails: the remote code must not need it
    import torch
    from transformers import AutoModelForImageClassification
    folder, images, out = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("hfmerge"), type(model).__module__
    with torch.no_grad():
        result = model(torch.load(images))
    torch.save({"logits": result.logits, "gate_probs": result.gate_probs, "task": result.task,
                "module": type(model).__module__}, out)
""")


def test_hfmerge_load_and_remote_code_without_hfmerge_agree(tmp_path, decisive_model, images, publish):
    folder = tmp_path / "gated"
    save_gated(decisive_model, folder)
    assert is_gated_folder(folder) and (folder / MODELING_FILE).is_file()
    torch.save(images, tmp_path / "images.pt")
    done = subprocess.run([sys.executable, "-c", _REMOTE, str(folder), str(tmp_path / "images.pt"),
                           str(tmp_path / "remote.pt")], capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    assert MODELING_FILE.removesuffix(".py") in remote["module"]
    publish("org/vit-gated", folder)
    for ref in (str(folder), "org/vit-gated"):
        loaded = hfmerge.load(ref)
        assert type(loaded) is GatedMergedForImageClassification
        with torch.no_grad():
            local = loaded(images)
        assert torch.equal(local.logits, remote["logits"])
        assert torch.equal(local.gate_probs, remote["gate_probs"]) and torch.equal(local.task, remote["task"])
    with torch.no_grad():
        original = decisive_model(images)
        # With hfmerge imported, the Auto class knows the type itself: no remote code either.
        auto = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        assert type(auto) is GatedMergedForImageClassification
        assert torch.equal(auto(images).logits, remote["logits"])
    assert torch.equal(original.logits, remote["logits"])


def test_pipeline_returns_labels_of_the_task_the_gate_picks(tmp_path, sources, all_keys):
    from PIL import Image

    for k in (0, 1):
        model = assemble_gated(sources, _gate(5), _partly_gated(all_keys))
        with torch.no_grad():  # a gate that always names task k, whatever the image
            model.gate.classifier.weight.zero_()
            model.gate.classifier.bias.copy_(torch.tensor([20.0, -20.0] if k == 0 else [-20.0, 20.0]))
        folder = tmp_path / f"task{k}"
        save_gated(model, folder)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
        classify = transformers.pipeline("image-classification", model=str(folder), trust_remote_code=True)
        image = Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy())
        results = classify(image, top_k=len(model.config.id2label))
        assert results[0]["label"] in LABELS[k]
        assert {r["label"] for r in results if r["score"] > 0} <= set(LABELS[k])
        assert sum(r["score"] for r in results if r["label"] in LABELS[k]) == pytest.approx(1.0, abs=1e-6)


def test_sources_of_different_shapes_are_refused(sources):
    other = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(IncompatibleModelsError, match="num_hidden_layers=2.*3"):
        assemble_gated([sources[0], other], None, [])
    with pytest.raises(IncompatibleModelsError, match="not a ResNet|MobileNetV2 image classifier"):
        assemble_gated(sources, transformers.ResNetForImageClassification(transformers.ResNetConfig()), [])
    with pytest.raises(IncompatibleModelsError, match="weight and bias"):
        assemble_gated(sources, None, ["vit.layernorm.weight"])
    with pytest.raises(IncompatibleModelsError, match="vit.encoder.layer.7.output.dense.weight"):
        assemble_gated(sources, None, ["vit.encoder.layer.7.output.dense.weight"])


def test_a_gated_folder_whose_tensors_do_not_match_its_config_is_refused(tmp_path, sources, all_keys):
    folder = tmp_path / "gated"
    save_gated(assemble_gated(sources, None, _partly_gated(all_keys)), folder)
    config = json.loads((folder / "config.json").read_text())
    config["gated"] = [k for k in config["gated"] if "layernorm" not in k]  # stored stacked, config says static
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"do not match its config.json \(vit.encoder.layer.0.layernorm_before.weight has "
                                          r"shape \[2, 32\] but the config implies \[32\]\)"):
        hfmerge.load(str(folder))


def _gate_with_batch_statistics(num_labels: int) -> transformers.PreTrainedModel:
    """The tiny gate with BatchNorm statistics and affines far from the identity, so a wrong fold shows."""
    gate = _gate(num_labels)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in gate.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.25)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return gate


def _batch_norm_calls(model: torch.nn.Module) -> list[str]:
    calls: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda module, inputs, output, name=name: calls.append(name))
    return calls


def _gate_logits_both_ways(model: GatedMergedForImageClassification, images: torch.Tensor, calls: list[str]):
    """(the gate module's logits, with gradients on; the inference logits), checking which path ran."""
    calls.clear()
    with torch.enable_grad():
        module = model.gate_logits(images).detach()
    assert calls, "with gradients on, the gate module did not run"
    calls.clear()
    with torch.inference_mode():
        folded = model.gate_logits(images)
    assert calls == []  # at inference BatchNorm is folded into the convolutions
    return module, folded


@pytest.mark.parametrize("gate_size", [24, 27])  # even: the stride-2 layers pad one side only; odd: both sides
def test_at_inference_the_gate_runs_folded_and_gives_the_gate_modules_logits(sources, images, all_keys, gate_size):
    gate_processor = transformers.MobileNetV2ImageProcessor(crop_size={"height": gate_size, "width": gate_size})
    model = assemble_gated(sources, _gate_with_batch_statistics(5), _partly_gated(all_keys),
                           gate_processor=gate_processor).eval()
    calls = _batch_norm_calls(model.gate)
    module, folded = _gate_logits_both_ways(model, images, calls)
    assert module.std() > 0.1  # logits that differ per sample and source, not ~0
    assert torch.equal(folded.argmax(-1), module.argmax(-1))
    # float32: this deep random gate (52 convolutions at unit-scale weights) is itself 3e-5 to 6e-5 off its float64
    # logits of up to 3; the folded gate, rounding differently, is held to 2e-4 of them.
    model.double()
    exact, exact_folded = _gate_logits_both_ways(model, images.double(), calls)
    torch.testing.assert_close(exact_folded, exact, atol=1e-10, rtol=0)  # the same function
    torch.testing.assert_close(module.double(), exact, atol=2e-4, rtol=0)
    torch.testing.assert_close(folded.double(), exact, atol=2e-4, rtol=0)
    model.float()
    with torch.enable_grad():
        reference = model(images, routing="top1")
    with torch.inference_mode():
        out = model(images, routing="top1")
    assert torch.equal(out.task, reference.task)
    torch.testing.assert_close(out.gate_probs, reference.gate_probs.detach(), atol=1e-4, rtol=0)
    finite = torch.isfinite(reference.logits)
    assert torch.equal(torch.isfinite(out.logits), finite)
    torch.testing.assert_close(out.logits[finite], reference.logits.detach()[finite], atol=1e-5, rtol=0)


def test_the_folded_gate_follows_the_gate_s_weights_and_training_runs_the_gate_module(sources, images):
    model = assemble_gated(sources, _gate_with_batch_statistics(5), []).eval()
    with torch.no_grad():
        before = model.gate_logits(images)
        norm = model.gate.mobilenet_v2.conv_1x1.normalization
        norm.running_var.mul_(4.0)  # an in-place change, as load_state_dict or an optimiser step makes
        after = model.gate_logits(images)
    with torch.enable_grad():
        expected = model.gate_logits(images).detach()
    assert (before - expected).abs().max() > 1e-2  # a stale fold would be this far off
    torch.testing.assert_close(after, expected, atol=2e-4, rtol=0)  # float32 rounding, as in the test above
    model.gate.train()
    calls = _batch_norm_calls(model.gate)
    model.gate_logits(images).sum().backward()
    assert calls and model.gate.classifier.weight.grad is not None
