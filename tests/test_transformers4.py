"""Checkpoints as they are on the Hub: saved by transformers 4.x, merged under transformers 5.

The fixtures in ``tests/fixtures/transformers4/`` were written by transformers
4.57 (``make_fixtures.py`` there). Their files differ from what transformers 5
would write: Swin and the UperNet-Swin and Mask2Former backbones keep Swin's
``relative_position_index`` buffers (transformers 5 computes them and skips
them on load); the two backbones lack ``swin.layernorm`` (transformers 5
initialises it). Every static method must merge them, and the output must load
with plain transformers reporting nothing that loading the sources does not.
Expected values come from the sources loaded with plain transformers.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

import hfmerge
from hfmerge.methods import get_method
from hfmerge.testing.tiny import FAMILIES, tiny_adapter, tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "transformers4"
STALE_BUFFER = "relative_position_index"
# The families whose 4.x files hold tensors transformers 5 does not load: one STALE_BUFFER per Swin block.
WITH_STALE_BUFFERS = ("upernet-swin", "mask2former", "swin")
# The families whose 4.x files lack tensors transformers 5 initialises: the Swin backbone's final LayerNorm.
WITHOUT_BACKBONE_NORM = ("upernet-swin", "mask2former")




def refusal(method: str, family: str) -> str | None:
    """What ``method`` says, in one line, when it refuses ``family``'s 4.x models: fusion, a model without a
    classifier head (a CLIP tower), as its adapter declares the heads."""
    if method == "fusion" and not tiny_adapter(family).heads.get(tiny_config(family).architectures[0]):
        return "has no classifier head to concatenate; fusion needs task models"
    return None


def fixture(family: str, seed: int) -> Path:
    return FIXTURES / f"{family}-{seed}"


def stale_buffers(family: str) -> int:
    """How many STALE_BUFFER tensors ``family``'s 4.x files hold: one per Swin block of its config."""
    if family not in WITH_STALE_BUFFERS:
        return 0
    config = json.loads((fixture(family, 1) / "config.json").read_text())
    return sum(config.get("backbone_config", config)["depths"])


def method_arguments(name: str, family: str) -> dict[str, Any]:
    """What ``hfmerge.merge`` needs besides the two sources to run method ``name``.

    A method that needs a base gets the first source as its base: fine-tunes of
    one base are what task vectors are made of, and the base is a 4.x file too.
    """
    method = get_method(name)
    if method.data_needs().required:
        pytest.skip(f"{name} needs data; these fixtures are weights only")
    adapter = tiny_adapter(family)
    if name == "otfusion":  # aligns neurons of the families that declare them; weight-based needs no data
        if adapter.neurons is None:
            pytest.skip(f"otfusion cannot align {family}'s neurons (tests/test_otfusion.py checks the refusal)")
        return {"cost": "weights"}
    if name == "clafusion":  # balances depth where a family declares it; widths and weights need no data
        if adapter.depth is None or adapter.neurons is None:
            pytest.skip(f"clafusion cannot balance {family}'s depth (tests/test_clafusion.py checks the refusal)")
        return {"cost": "weights", "representation": "neurons"}
    return {"base": str(fixture(family, 1))} if method.needs_base else {}


def load_plain(folder: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """The model loaded with plain transformers 5, and what its loading reported."""
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
    return model.eval(), {k: sorted(map(str, v)) for k, v in info.items()}


@cache
def source_state(family: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    model, info = load_plain(fixture(family, seed))
    return model.state_dict(), info


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def copy_fixture(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_fixtures_are_saved_by_transformers_4_and_hold_what_5_does_not_load():
    versions = json.loads((FIXTURES / "VERSIONS.json").read_text())
    assert versions["transformers"].startswith("4.57"), versions
    for family in FAMILIES:
        for seed in (1, 2):
            assert (fixture(family, seed) / "model.safetensors").is_file(), (family, seed)
    for family in WITH_STALE_BUFFERS:
        keys = file_tensors(fixture(family, 1))
        assert sum(k.endswith(STALE_BUFFER) for k in keys) == stale_buffers(family) > 0, family
    # Mask2Former's 4.x files lack the backbone's final LayerNorm: transformers 5 reports it and initialises it.
    assert "model.pixel_level_module.encoder.swin.layernorm.weight" in source_state("mask2former", 1)[1]["missing_keys"]


@pytest.mark.parametrize("method", hfmerge.available_methods())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_merges_4x_checkpoints_and_the_output_loads_like_its_sources(family, method, tmp_path):
    if method == "emr":
        pytest.skip("emr writes a repository of its own; test_emr_merges_4x_checkpoints_into_tasks_that_load_like_them")
    a, b = fixture(family, 1), fixture(family, 2)
    weights = [1, 3] if get_method(method).uses_weights else None
    if refusal(method, family):
        with pytest.raises(hfmerge.IncompatibleModelsError, match=refusal(method, family)) as refused:
            hfmerge.merge([str(a), str(b)], method=method, weights=weights, progress=False,
                          **method_arguments(method, family))
        assert "\n" not in str(refused.value)
        return
    result = hfmerge.merge([str(a), str(b)], method=method, weights=weights, progress=False,
                           **method_arguments(method, family))
    out = result.save(tmp_path / "out")

    merged, report = load_plain(out)
    (sa, anchor_report), (sb, _) = source_state(family, 1), source_state(family, 2)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        extra = set(report.get(kind, [])) - set(anchor_report.get(kind, []))
        assert not extra, f"{kind} beyond the source's: {sorted(extra)[:3]}"
    if family == "upernet-swin":  # transformers 5 silences both differences of this class
        assert not any(report.values()), report

    # The output is a file like the anchor's: the same keys (so transformers 4.x loads it as it loads
    # the anchor), and the buffers transformers 5 skips are the anchor's, unchanged.
    anchor_file, out_file = file_tensors(a), file_tensors(out)
    assert set(out_file) == set(anchor_file)
    stale = [k for k in anchor_file if k.endswith(STALE_BUFFER)]
    assert len(stale) == stale_buffers(family)
    for key in stale:
        assert torch.equal(out_file[key], anchor_file[key]), key
    if stale:
        assert f"carried from anchor (ignored by transformers on load): {len(stale)} tensors" in result.planned.describe()

    if method == "average":  # the weighted mean of what transformers loads from the 4.x files
        sm = merged.state_dict()
        assert set(sm) == set(sa)
        differ = 0
        carried = set(result.planned.anchor.carried)  # a CLIPModel's text tower: the anchor's, never merged
        for name, value in sm.items():
            if name in carried:
                assert torch.equal(value, sa[name]), name
            elif value.dtype.is_floating_point:
                torch.testing.assert_close(value, 0.25 * sa[name] + 0.75 * sb[name], rtol=0, atol=1e-6)
                differ += not torch.equal(sa[name], sb[name])
            else:  # num_batches_tracked comes from the first source
                assert torch.equal(value, sa[name]), name
        assert differ > 0  # the two seeds differ, so the check above can fail


@pytest.mark.parametrize("family", FAMILIES)
def test_emr_merges_4x_checkpoints_into_tasks_that_load_like_them(family, tmp_path):
    """EMR's repository holds one model per task: each loads (hfmerge.load(…, task=i)) with the tensors its source
    loads with, its own head among them, and only the tensors the 4.x source file lacks reported missing."""
    a, b = fixture(family, 1), fixture(family, 2)
    if family == "clip-model":  # its text tower is never merged, and EMR's repository has no place to carry it
        with pytest.raises(hfmerge.IncompatibleModelsError, match="EMR's per-task repository cannot carry"):
            hfmerge.merge([str(a), str(b)], method="emr", base=str(a), progress=False)
        return
    result = hfmerge.merge([str(a), str(b)], method="emr", base=str(a), progress=False)
    out = result.save(tmp_path / "out")
    for task, seed in ((0, 1), (1, 2)):
        model = hfmerge.load(str(out), task=task)
        state, (source, _) = model.state_dict(), source_state(family, seed)
        assert set(state) == set(source), task
        for name in (info.name for info in result.planned.anchor.head_tensors):
            assert torch.equal(state[name], source[name]), (task, name)
        assert not any(torch.isnan(v).any() for v in state.values() if v.is_floating_point()), task


@pytest.mark.parametrize("family", WITH_STALE_BUFFERS)
def test_plan_says_what_is_carried_and_what_stays_absent(family):
    sources = [str(fixture(family, 1)), str(fixture(family, 2))]
    planned = hfmerge.plan_merge(hfmerge.Recipe(sources=sources, method="average"))
    carried = [t for t in planned.plan.tensors if t.op.group.startswith("carried from anchor")]
    assert len(carried) == stale_buffers(family)
    assert all(t.key.endswith(STALE_BUFFER) and t.op.source == (0, t.key) for t in carried)
    text = planned.describe()
    if family in WITHOUT_BACKBONE_NORM:
        assert "left absent (transformers initialises them on load): 2 tensors" in text
        assert "swin.layernorm.weight" in text
    else:
        assert "left absent" not in text


def test_the_4x_clip_towers_fit_the_4x_clip_model_so_it_can_be_their_base():
    """``clip-model`` is a base for ``clip`` and ``clip-projection`` towers, as openai/clip-vit-base-patch32 is for
    the published task towers: every tensor a tower's file holds is in the CLIPModel's file, with its shape."""
    full = {key: tuple(value.shape) for key, value in file_tensors(fixture("clip-model", 1)).items()}
    for family in ("clip", "clip-projection"):
        tower = {key: tuple(value.shape) for key, value in file_tensors(fixture(family, 1)).items()}
        assert {key: full.get(key) for key in tower} == tower, family
        assert {key for key in full if key.startswith("vision_model.")} <= set(tower), family


def test_the_4x_clip_model_s_tokenizer_spells_a_prompt_in_characters_its_text_tower_knows():
    """The CLIPProcessor saved with ``clip-model``: byte-level BPE without merges, so every character is a token
    (a word's last one ending in ``</w>``); the ids fit the text tower's embedding and match its config."""
    folder = fixture("clip-model", 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text_config = transformers.CLIPConfig.from_pretrained(folder).text_config
    prompt = "a photo of a cat."
    ids = tokenizer(prompt)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    characters = [c for word in prompt.replace(".", " .").split() for c in [*word[:-1], word[-1] + "</w>"]]
    assert tokens == [tokenizer.bos_token, *characters, tokenizer.eos_token]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(tokenizer) == text_config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id)
    assert tokenizer.model_max_length == text_config.max_position_embeddings


def test_a_source_saved_by_transformers_5_merges_with_4x_ones(tmp_path):
    resaved = tmp_path / "vit-5"
    load_plain(fixture("vit", 2))[0].save_pretrained(resaved)
    out = hfmerge.merge([str(fixture("vit", 1)), str(resaved)], progress=False).save(tmp_path / "out")
    (sa, _), (sb, _) = source_state("vit", 1), source_state("vit", 2)
    for name, value in load_plain(out)[0].state_dict().items():
        torch.testing.assert_close(value, 0.5 * sa[name] + 0.5 * sb[name], rtol=0, atol=1e-6)


def test_only_the_anchor_carries_what_transformers_skips(tmp_path):
    """An anchor without the skipped buffers (as transformers 5 saves it) gives an output without them."""
    from safetensors.torch import save_file

    anchor = copy_fixture(fixture("upernet-swin", 1), tmp_path / "swin-without-buffers")
    tensors = {k: v for k, v in file_tensors(anchor).items() if not k.endswith(STALE_BUFFER)}
    save_file(tensors, str(anchor / "model.safetensors"), metadata={"format": "pt"})
    result = hfmerge.merge([str(anchor), str(fixture("upernet-swin", 2))], progress=False)
    assert "carried from anchor" not in result.planned.describe()
    out = result.save(tmp_path / "out")
    assert set(file_tensors(out)) == set(tensors)
    merged, report = load_plain(out)
    assert not any(report.values()), report
    (sa, _), (sb, _) = source_state("upernet-swin", 1), source_state("upernet-swin", 2)
    for name, value in merged.state_dict().items():
        expected = 0.5 * sa[name] + 0.5 * sb[name] if value.dtype.is_floating_point else sa[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_a_checkpoint_with_tensors_its_class_does_not_know_is_still_refused(tmp_path):
    from safetensors.torch import save_file

    folder = copy_fixture(fixture("vit", 1), tmp_path / "vit-extra")
    tensors = file_tensors(fixture("vit", 1))
    tensors["vit.encoder.layer.7.output.dense.weight"] = torch.zeros(8, 8)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hfmerge.SourceError, match="1 tensor\\(s\\) its config does not describe"):
        hfmerge.plan_merge(hfmerge.Recipe(sources=[str(folder), str(fixture("vit", 2))], method="average"))


def test_ignored_on_load_takes_non_persistent_buffers_and_each_sub_model_s_own_patterns():
    from hfmerge.adapters.layout import ignored_on_load

    class Backbone(torch.nn.Module):
        _keys_to_ignore_on_load_unexpected = [r"attention\.old_index"]

        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.zeros(3), persistent=False)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = Backbone(), torch.nn.Linear(2, 2)

    unexpected = {
        "backbone.table",  # a non-persistent buffer: never loaded from a checkpoint
        "backbone.attention.old_index",  # matched by the backbone's own pattern
        "head.attention.old_index",  # the same pattern, outside the sub-model that declares it
        "backbone.attention.extra",  # a tensor nothing explains
    }
    assert ignored_on_load(Model(), unexpected) == {"backbone.table", "backbone.attention.old_index"}
