"""DeiT, BEiT and DINOv2: the ViT-like families (issue 21), beyond what the tests over every family check.

Their neuron groups must keep the function: a copy permuted group by group (the
residual stream included) computes the same outputs, for the configurations the
published checkpoints use and the ones that change which tensors index what
(BEiT's relative position bias, shared or per layer, whose columns move with the
heads; CLS or mean pooling; DeiT's distillation head). OTFusion aligns such a copy
back to the original exactly (a task-vector merge against the headless backbone:
tests/test_task_vectors.py, over the registry). Every method merges identical
sources to themselves, or refuses the family in one line. DINOv2's SwiGLU MLP
(ViT-g) is checked on the model in memory: every method refuses its checkpoints,
whose gate and up projections transformers splits from one stored tensor on load.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli
from permuted_models import assert_permuted_copy_keeps_outputs, built_models, outputs, permuted_copy, randomised
from test_every_method import METHODS, load_plain, merge_arguments, random_images

import hfmerge
from hfmerge.adapters import inspect_source
from hfmerge.adapters.neurons import NeuronGroup
from hfmerge.hub.resolve import resolve_source
from hfmerge.testing.permute import permute_groups
from hfmerge.testing.tiny import save_tiny, tiny_config

FAMILIES = ("deit", "beit", "dinov2")


def _config(family: str, architecture: str | None = None, **changes):
    config = tiny_config(family)
    for key, value in changes.items():
        setattr(config, key, value)
    if architecture is not None:
        config.architectures = [architecture]
    return config


# case -> config. The tiny models as declared, DeiT's distillation head, the headless backbones, and the settings
# that change which tensors index the heads, the stream and the MLP.
CASES = {
    "deit": lambda: _config("deit"),
    "deit-teacher": lambda: _config("deit", "DeiTForImageClassificationWithTeacher"),
    "deit-headless": lambda: _config("deit", "DeiTModel"),
    "beit": lambda: _config("beit"),  # a relative position bias per layer, layer scale, mean pooling
    "beit-absolute-cls": lambda: _config("beit", use_relative_position_bias=False, use_mean_pooling=False,
                                         use_absolute_position_embeddings=True),
    "beit-shared-bias": lambda: _config("beit", use_relative_position_bias=False,
                                        use_shared_relative_position_bias=True),
    "beit-both-biases": lambda: _config("beit", use_shared_relative_position_bias=True),  # a table per layer too
    "beit-no-layer-scale": lambda: _config("beit", layer_scale_init_value=0.0),
    "beit-headless": lambda: _config("beit", "BeitModel"),
    "dinov2": lambda: _config("dinov2"),
    "dinov2-headless": lambda: _config("dinov2", "Dinov2Model"),
}
SIZE = 16
built = built_models(lambda case: CASES[case]())


@pytest.mark.parametrize("case", CASES)
def test_a_copy_permuted_in_every_group_computes_the_same_outputs(built, case):
    model, layout = built(case)
    groups = layout.all_neuron_groups
    state, _ = assert_permuted_copy_keeps_outputs(model, groups, SIZE)
    original = model.state_dict()
    for group in groups:
        assert group.size > 1, group.name
        for tensor, dim in group.members:  # every member moved, so a member in the wrong group would show
            assert state[tensor].shape[dim] == group.size * group.unit_of(tensor, dim), (group.name, tensor)
            assert not torch.equal(state[tensor], original[tensor]), (group.name, tensor)
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members))
    heads = {t.name for t in layout.head_tensors}
    assert not any(t in heads and d == 0 for t, d in members)  # the labels keep their order


@pytest.mark.parametrize("case", CASES)
def test_groups_hold_every_hidden_neuron_and_the_stream_only_where_a_classifier_reads_it(built, case):
    model, layout = built(case)
    groups = layout.all_neuron_groups
    members = {m for g in groups for m in g.members}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hidden = [n for n in linears if n.endswith((".fc1", ".gate_proj", ".up_proj"))]
    assert hidden and all((f"{n}.weight", 0) in members for n in hidden)
    queries = [n for n in linears if n.endswith(".q_proj")]
    assert all((f"{n}.weight", 0) in members for n in queries)  # heads are a group, bias table or not
    stream = [g for g in groups if g.optional]
    classifier_reads_the_stream = not case.endswith("headless") and not case.startswith("dinov2")
    assert len(stream) == int(classifier_reads_the_stream)
    if stream:
        stream_tensors = {t for t, _ in stream[0].members}
        assert {n for n in model.state_dict() if n.endswith(("lambda_1", "lambda_2", "distillation_token"))} \
            <= stream_tensors


@pytest.mark.parametrize("case", ["beit", "beit-shared-bias", "beit-both-biases"])
def test_beit_heads_move_their_relative_position_bias_columns(built, case):
    """A relative position bias table has one column per head (one entry per unit, whatever head_dim), in its
    layer's head group; a table shared by every layer joins every layer's heads in one group. Moved without its
    columns, a head reads another head's bias: the outputs change, so the table is in the group for a reason."""
    model, layout = built(case)
    tables = [n for n in model.state_dict() if n.endswith("relative_position_bias_table")]
    heads = [g for g in layout.all_neuron_groups if any(t.endswith("q_proj.weight") and d == 0 for t, d in g.members)]
    shared = model.config.use_shared_relative_position_bias
    assert len(heads) == (1 if shared else model.config.num_hidden_layers)
    assert len(tables) == model.config.use_relative_position_bias * model.config.num_hidden_layers + shared
    for table in tables:
        group = next(g for g in heads if (table, 1) in g.members)
        assert group.size == model.config.num_attention_heads and (table, 1) in group.per_unit
        assert group.unit_of(table, 1) == 1 and group.unit == model.config.hidden_size // group.size
    if shared:
        queries = {t for t, d in heads[0].members if t.endswith("q_proj.weight")}
        assert len(queries) == model.config.num_hidden_layers
    without_tables = [NeuronGroup(g.name, tuple(m for m in g.members if m not in g.per_unit), g.size, g.unit)
                      for g in heads]
    copy, _, _ = permuted_copy(model, without_tables)
    before, after = outputs(model, SIZE)[0], outputs(copy, SIZE)[0]
    assert not torch.allclose(before, after, atol=1e-3)


def _randomised_source(folder, case, seed):
    torch.manual_seed(seed)
    config = CASES[case]()
    model = randomised(getattr(transformers, config.architectures[0])(config), seed)
    return save_tiny(folder, case.split("-")[0], 3, model=model), model


@pytest.mark.parametrize("cost", ["weights", "activations"])
@pytest.mark.parametrize("case", [*FAMILIES, "beit-shared-bias"])  # BEiT's own: a relative position bias per layer
def test_otfusion_aligns_a_permuted_copy_back_exactly(case, cost, tmp_path):
    family = case.split("-")[0]
    original, model = _randomised_source(tmp_path / "original", case, seed=6)
    layout = inspect_source(resolve_source(str(original)))
    residual = any(g.optional for g in layout.all_neuron_groups)
    state, _ = permute_groups(model.state_dict(), layout.neuron_groups_with(residual), seed=8)
    model.load_state_dict(state)
    permuted = save_tiny(tmp_path / "permuted", family, 3, model=model)
    extra = {"data": [str(random_images(tmp_path / "images", count=8, size=SIZE))], "samples": 8} \
        if cost == "activations" else {}
    result = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost=cost, residual=residual,
                           progress=False, **extra)
    fused = load_plain(result.save(tmp_path / "fused")).state_dict()
    reference = load_plain(original).state_dict()
    moved = [name for name, value in load_plain(permuted).state_dict().items()
             if not torch.equal(value, reference[name])]
    assert len(moved) > 10
    for name, value in reference.items():
        torch.testing.assert_close(fused[name], value, atol=1e-5, rtol=0, msg=name)
    averaged = load_plain(hfmerge.merge([str(original), str(permuted)], method="average", progress=False)
                          .save(tmp_path / "averaged")).state_dict()
    assert any(not torch.allclose(averaged[name], reference[name], atol=1e-3) for name in moved)


def test_deit_with_its_distillation_head_fuses_both_heads(make_source, tmp_path):
    """Fusion of two DeiTs with teacher heads stacks each head's labels; the output is the mean of both heads'
    logits (transformers' DeiTForImageClassificationWithTeacher), so each source's logits come back side by side."""
    models = []
    for seed in (1, 2):
        config = _config("deit", "DeiTForImageClassificationWithTeacher")
        torch.manual_seed(seed)
        models.append(transformers.DeiTForImageClassificationWithTeacher(config).eval())
    models[1].load_state_dict({k: v for k, v in models[0].state_dict().items() if "classifier" not in k},
                              strict=False)  # one backbone, two heads: fusion keeps both functions
    a, b = (make_source("deit", model=m) for m in models)
    merged = load_plain(hfmerge.merge([str(a), str(b)], method="fusion", progress=False).save(tmp_path / "out"))
    assert type(merged).__name__ == "DeiTForImageClassificationWithTeacher"
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = merged(pixel_values=pixels).logits
        expected = torch.cat([m(pixel_values=pixels).logits for m in models], dim=-1)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# DINOv2 ViT-g (facebook/dinov2-giant) has a SwiGLU MLP: its checkpoint stores the gate and up projections as one
# tensor, mlp.weights_in, which transformers 5 splits in two when it loads it. hfmerge merges stored tensors, so it
# refuses such a model at inspection; the neuron groups are declared for the model in memory, and checked there.
def _swiglu_dinov2(seed: int = 0):
    torch.manual_seed(seed)
    return randomised(transformers.Dinov2ForImageClassification(_config("dinov2", use_swiglu_ffn=True)), seed)


def test_a_swiglu_dinov2_permuted_in_its_declared_groups_computes_the_same_outputs():
    """The declaration read from the model in memory (no checkpoint of it can be inspected): each layer's gate and
    up rows and down columns are one group of hidden neurons, and permuting every group keeps the outputs."""
    from types import SimpleNamespace

    from hfmerge.adapters.dinov2 import DINOV2

    model = _swiglu_dinov2()
    state = model.state_dict()
    view = SimpleNamespace(source=SimpleNamespace(name="swiglu"), config=model.config, tensors=state,
                           module_classes={name: type(module) for name, module in model.named_modules()},
                           forward=list(state), modules=list(dict.fromkeys(n.rsplit(".", 1)[0] for n in state)))
    groups = DINOV2.neurons(view)
    hidden = [g for g in groups if g.name.endswith("(hidden)")]
    assert len(hidden) == model.config.num_hidden_layers
    for layer, group in enumerate(hidden):
        mlp = f"dinov2.encoder.layer.{layer}.mlp"
        assert set(group.members) == {(f"{mlp}.{p}.{t}", 0) for p in ("gate_proj", "up_proj")
                                      for t in ("weight", "bias")} | {(f"{mlp}.down_proj.weight", 1)}
        assert group.size == state[f"{mlp}.down_proj.weight"].shape[1]
    assert_permuted_copy_keeps_outputs(model, groups, SIZE)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_a_swiglu_dinov2_in_one_line_before_writing(method, tmp_path, capsys):
    from safetensors import safe_open

    folder = save_tiny(tmp_path / "giant", "dinov2", 3, model=_swiglu_dinov2())
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:  # the split happens on load, not on disk
        assert "dinov2.encoder.layer.0.mlp.weights_in.weight" in stored.keys()
    arguments = merge_arguments(method, str(folder), tmp_path)
    args = ["merge", folder, folder, "-m", method, "-o", tmp_path / "out"]
    args += [f"--base={folder}"] if "base" in arguments else []
    args += [f"--data={d}" for d in arguments.get("data", [])]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "mlp.weights_in.", "mlp.gate_proj.", "mlp.up_proj.", "no method can merge",
                          "merge dinov2 models whose config has no such layer")
    assert not (tmp_path / "out").exists()


def test_inspecting_a_swiglu_dinov2_says_why_it_cannot_be_merged(tmp_path, capsys):
    folder = save_tiny(tmp_path / "giant", "dinov2", 3, model=_swiglu_dinov2())
    code, _, err = run_cli(["inspect", folder], capsys)
    assert_one_line_error(code, err, "converts the checkpoint tensor dinov2.encoder.layer.0.mlp.weights_in.")


def test_renaming_reports_the_tensor_a_converter_splits():
    """transformers' own mapping for the SwiGLU MLP: weights_in becomes gate_proj and up_proj; the plain MLP's
    keys are renamed only (fc1 stays fc1), so the same model class without SwiGLU raises nothing."""
    from hfmerge.io.renaming import ConvertedOnLoadError, checkpoint_to_memory_names

    model = _swiglu_dinov2()
    key = "dinov2.encoder.layer.1.mlp.weights_in.weight"
    with pytest.raises(ConvertedOnLoadError) as raised:
        checkpoint_to_memory_names(model, ["dinov2.embeddings.cls_token", key], model.state_dict())
    assert raised.value.key == key
    assert raised.value.targets == ("mlp.gate_proj.weight", "mlp.up_proj.weight")
    plain = transformers.Dinov2ForImageClassification(_config("dinov2"))
    stored = "dinov2.encoder.layer.1.attention.attention.query.weight"
    names = checkpoint_to_memory_names(plain, [stored, "dinov2.encoder.layer.1.mlp.fc1.weight"], plain.state_dict())
    assert names == {stored: "dinov2.encoder.layer.1.attention.q_proj.weight",
                     "dinov2.encoder.layer.1.mlp.fc1.weight": "dinov2.encoder.layer.1.mlp.fc1.weight"}
