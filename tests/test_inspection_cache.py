"""The inspection's facts cached on disk (:mod:`hfmerge.adapters.class_facts`).

A merge inspects each source by building its model class on the meta device; the facts it reads there
are kept in ``$HF_HOME/hfmerge/inspection``, so that the next merge of such sources neither builds the
model nor imports transformers' modeling code (``tests/test_imports.py`` checks the imports). What is
read back must be what the model class says, for every family, and a damaged or unwritable cache must
cost time, never a merge.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from huggingface_hub import constants

import hfmerge
from hfmerge.adapters import FamilyAdapter, inspect_source, layout
from hfmerge.hub.resolve import resolve_source
from hfmerge.publish.manifest import MANIFEST_FILE
from hfmerge.testing.tiny import FAMILIES

FIXTURES = Path(__file__).parent / "fixtures" / "transformers4"
STALE = ("upernet-swin", "mask2former")
"""4.x checkpoints with tensors transformers 5 skips on load and lacks ones it initialises: ignored and absent
keys, which come from the cache too."""


@pytest.fixture
def cache_folder(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, and nothing this process remembers: every inspection starts from the disk cache."""
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(layout, "_MODEL_CLASS_FACTS", {})
    return tmp_path / "home" / "hfmerge" / "inspection"


@pytest.fixture
def meta_builds(monkeypatch) -> list[str]:
    """The architectures built on the meta device, as they are built."""
    built: list[str] = []
    original = FamilyAdapter.build_meta_model

    def counting(self, architecture, config):
        built.append(architecture)
        return original(self, architecture, config)

    monkeypatch.setattr(FamilyAdapter, "build_meta_model", counting)
    return built


def _forget(monkeypatch) -> None:
    """A new process, as far as the inspection knows: only the disk cache remains."""
    monkeypatch.setattr(layout, "_MODEL_CLASS_FACTS", {})


def _source(name: str, make_source) -> Path:
    return FIXTURES / f"{name}-1" if name in STALE else make_source(name, seed=1)


@pytest.mark.parametrize("name", [*FAMILIES, *(f"{name} (4.x)" for name in STALE)])
def test_an_inspection_from_the_cache_is_the_one_from_the_model_class(name, make_source, cache_folder, meta_builds,
                                                                      monkeypatch):
    source = resolve_source(str(_source(name.removesuffix(" (4.x)"), make_source)))
    cold = inspect_source(source)
    _forget(monkeypatch)
    warm = inspect_source(source)
    assert len(meta_builds) == 1, "the second inspection reads the cache and builds no model"
    assert len(list(cache_folder.glob("*.json"))) == 1
    assert list(warm.tensors.items()) == list(cold.tensors.items())  # names, keys, shapes, heads, in order
    assert warm.ignored == cold.ignored and warm.absent == cold.absent
    if name.endswith("(4.x)"):
        assert cold.ignored and cold.absent
    assert warm.parameter_names == cold.parameter_names
    assert list(warm.module_classes.items()) == list(cold.module_classes.items())  # imported by path, in order
    assert warm.module_kinds == cold.module_kinds and warm.linear_groups == cold.linear_groups


@pytest.mark.parametrize("name", ["vit", "upernet-swin"])
def test_a_merge_from_cached_facts_writes_the_same_files(name, make_source, cache_folder, meta_builds, monkeypatch,
                                                         tmp_path):
    sources = [str(_source(name, make_source)), str(make_source(name, seed=2) if name not in STALE
                                                    else FIXTURES / f"{name}-2")]
    written = {}
    for run in ("cold", "warm"):
        _forget(monkeypatch)
        folder = hfmerge.merge(sources, method="average", progress=False).save(tmp_path / run)
        # the list of hfmerge's files holds their modification times; every file it lists is compared
        written[run] = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != MANIFEST_FILE}
    assert len(meta_builds) == 1  # the sources share one architecture, config and keys
    assert "model.safetensors" in written["cold"] and written["warm"] == written["cold"]


def _damaged(text: str, damage: str) -> str:
    if damage == "half":
        return text[: len(text) // 2]
    if damage == "garbage":
        return "\x00\x01 not json"
    record = json.loads(text)
    if damage == "edited shape":  # valid JSON, its digest no longer matches
        record["facts"]["shapes"][0][1] = [1]
    elif damage == "foreign class":  # a class path outside torch, transformers and hfmerge, digest recomputed
        from hfmerge.adapters.class_facts import _digest

        record["facts"]["modules"][0][1] = "os:system"
        record["digest"] = _digest(record["facts"])
    return json.dumps(record)


@pytest.mark.parametrize("damage", ["half", "garbage", "edited shape", "foreign class"])
def test_a_damaged_cache_file_is_ignored_and_written_again(damage, make_source, cache_folder, meta_builds,
                                                           monkeypatch, caplog):
    source = resolve_source(str(make_source("vit", seed=1)))
    expected = inspect_source(source)
    (path,) = cache_folder.glob("*.json")
    path.write_text(_damaged(path.read_text(), damage))
    _forget(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="hfmerge.adapters.class_facts"):
        rebuilt = inspect_source(source)
    assert len(meta_builds) == 2, "the damaged file is not used"
    assert "inspection cache file" in caplog.text and "rebuilt" in caplog.text
    assert list(rebuilt.tensors.items()) == list(expected.tensors.items())
    _forget(monkeypatch)
    assert list(inspect_source(source).tensors.items()) == list(expected.tensors.items())
    assert len(meta_builds) == 2, "the file was written again, whole"


def test_a_cache_that_cannot_be_written_costs_time_not_the_merge(make_source, tmp_path, meta_builds, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(constants, "HF_HOME", str(blocker / "home"))  # a folder below a file: never created
    sources = [str(make_source("vit", seed=1)), str(make_source("vit", seed=2))]
    for run in ("first", "second"):
        _forget(monkeypatch)
        hfmerge.merge(sources, method="average", progress=False).save(tmp_path / run)
    assert len(meta_builds) == 2
    assert blocker.read_text() == ""


def test_a_plug_in_family_is_inspected_from_its_classes_every_time(tmp_path, cache_folder, meta_builds, monkeypatch):
    """hfmerge cannot fingerprint a plug-in's code, so its inspection is never cached on disk."""
    import transformers

    from hfmerge.adapters import base

    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    transformers.ConvNextForImageClassification(config).save_pretrained(tmp_path / "convnext")
    adapter = FamilyAdapter(name="convnext", model_types=("convnext",),
                            architectures={"ConvNextForImageClassification": "image-classification"})
    monkeypatch.setitem(base._FAMILIES, "convnext", adapter)
    source = resolve_source(str(tmp_path / "convnext"))
    first = inspect_source(source)
    _forget(monkeypatch)
    assert list(inspect_source(source).tensors) == list(first.tensors)
    assert len(meta_builds) == 2 and not cache_folder.exists()
