"""The head policy (concat, average, anchor) on classifiers with different and with equal label sets,
and fusion's label names when sources share a short name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.testing.tiny import save_tiny

HEAD = ("classifier.weight", "classifier.bias")


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def assert_labels_invert(config):
    assert len(config.id2label) == len(config.label2id) == config.num_labels
    assert config.label2id == {label: i for i, label in config.id2label.items()}


@pytest.fixture
def different(make_source):
    return (make_source("vit", 3, seed=1, labels=["cat", "dog", "owl"]),
            make_source("vit", 2, seed=2, labels=["car", "dog"]))


@pytest.fixture
def equal(make_source):
    labels = ["cat", "dog", "owl"]
    return make_source("vit", 3, seed=1, labels=labels), make_source("vit", 3, seed=2, labels=labels)


def merged_and_sources(sources, tmp_path, **kwargs):
    result = hfmerge.merge([str(s) for s in sources], progress=False, **kwargs)
    merged = load_plain(result.save(tmp_path / "out"))
    return result, merged, [load_plain(s) for s in sources]


def assert_backbone_averaged(merged, models, weights=(0.5, 0.5)):
    states = [m.state_dict() for m in models]
    for name, value in merged.state_dict().items():
        if name not in HEAD:
            expected = sum(w * s[name] for w, s in zip(weights, states))
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)


def test_average_of_different_label_sets_concatenates_heads_by_default(different, tmp_path):
    result, merged, (a, b) = merged_and_sources(different, tmp_path, method="average", weights=[1, 3])
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    for name in HEAD:
        assert torch.equal(sm[name], torch.cat([sa[name], sb[name]])), name
    assert_backbone_averaged(merged, (a, b), (0.25, 0.75))
    pa, pb = different
    assert merged.config.id2label == {0: "cat", 1: f"{pa.name}/dog", 2: "owl", 3: "car", 4: f"{pb.name}/dog"}
    assert_labels_invert(merged.config)
    assert result.details["heads"] == "concat"


def test_heads_anchor_keeps_the_anchors_head_and_labels(different, tmp_path):
    _, merged, (a, b) = merged_and_sources(different, tmp_path, method="average", heads="anchor",
                                           anchor=str(different[1]))
    for name in HEAD:
        assert torch.equal(merged.state_dict()[name], b.state_dict()[name]), name
    assert_backbone_averaged(merged, (a, b))
    assert merged.config.id2label == {0: "car", 1: "dog"}
    assert_labels_invert(merged.config)


def test_heads_average_of_different_label_sets_is_one_line_suggesting_concat_or_anchor(different, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *different, "--method", "average", "--heads", "average", "--output", out, "-q"],
                           capsys)
    assert_one_line_error(code, err, "one label set", "--heads concat", "--heads anchor")
    assert not out.exists()
    code, _, err = run_cli(["merge", *different, "--method", "average", "--heads", "union", "--output", out], capsys)
    assert_one_line_error(code, err, "unknown head policy 'union'", "concat, average, anchor")


def test_equal_label_sets_average_heads_by_default(equal, tmp_path):
    result, merged, (a, b) = merged_and_sources(equal, tmp_path, method="average")
    for name in HEAD:
        expected = (a.state_dict()[name] + b.state_dict()[name]) / 2
        torch.testing.assert_close(merged.state_dict()[name], expected, rtol=0, atol=1e-6)
    assert merged.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    assert_labels_invert(merged.config)
    assert result.details["heads"] == "average"


def test_equal_label_sets_with_heads_concat_and_anchor(equal, tmp_path):
    _, merged, (a, b) = merged_and_sources(equal, tmp_path / "c", method="average", heads="concat")
    for name in HEAD:
        assert torch.equal(merged.state_dict()[name], torch.cat([a.state_dict()[name], b.state_dict()[name]]))
    pa, pb = equal
    assert list(merged.config.id2label.values()) == [f"{p.name}/{label}" for p in (pa, pb) for label in ("cat", "dog", "owl")]
    assert_labels_invert(merged.config)
    _, merged, (a, b) = merged_and_sources(equal, tmp_path / "a", method="average", heads="anchor")
    for name in HEAD:  # the anchor is the first source when none is named
        assert torch.equal(merged.state_dict()[name], a.state_dict()[name])
    assert_backbone_averaged(merged, (a, b))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_task_vector_methods_merge_different_label_sets(method, different, make_source, tmp_path):
    base = make_source("vit", 4, seed=0)  # a classifier with yet another label set: its head is no base for theirs
    _, merged, (a, b) = merged_and_sources(different, tmp_path, method=method, base=str(base))
    for name in HEAD:
        assert torch.equal(merged.state_dict()[name], torch.cat([a.state_dict()[name], b.state_dict()[name]]))
    assert merged.config.num_labels == 5
    assert_labels_invert(merged.config)


def test_fusion_refuses_heads_average_or_anchor(different):
    with pytest.raises(hfmerge.IncompatibleModelsError, match="fusion concatenates the heads by definition"):
        hfmerge.merge([str(s) for s in different], method="fusion", heads="anchor", progress=False)


def test_fusion_labels_of_sources_with_one_short_name_stay_unique(tmp_path):
    folders = []
    for run, seed in (("run1", 1), ("run2", 2)):
        folders.append(save_tiny(tmp_path / run / "checkpoint-500", "vit", seed=seed, labels=["cat", "dog", "owl"]))
    result = hfmerge.merge([str(f) for f in folders], method="fusion", progress=False)
    merged = load_plain(result.save(tmp_path / "out"))
    labels = list(merged.config.id2label.values())
    assert labels == [f"{run}/checkpoint-500/{label}" for run in ("run1", "run2") for label in ("cat", "dog", "owl")]
    assert_labels_invert(merged.config)
    assert merged.classifier.out_features == 6
    # the same folder twice: positions tell them apart
    twice = hfmerge.merge([str(folders[0]), str(folders[0])], method="fusion", progress=False)
    assert list(twice.config.id2label.values()) == [f"source{i}/{label}" for i in (1, 2) for label in ("cat", "dog", "owl")]
    assert_labels_invert(twice.config)


def test_fusion_labels_of_hub_repos_with_one_name_use_the_repo_id(publish, tmp_path):
    for org, seed in (("org", 1), ("demo", 2)):
        publish(f"{org}/same-name", family="vit", seed=seed, labels=["cat", "dog"])
    result = hfmerge.merge(["org/same-name", "demo/same-name"], method="fusion", progress=False)
    merged = load_plain(result.save(tmp_path / "out"))
    assert list(merged.config.id2label.values()) == [
        "org/same-name/cat", "org/same-name/dog", "demo/same-name/cat", "demo/same-name/dog"]
    assert_labels_invert(merged.config)


def test_dry_run_names_the_head_policy_and_the_anchor(different, tmp_path, capsys):
    code, out, _ = run_cli(["merge", *different, "--method", "average", "--dry-run"], capsys)
    assert code == 0
    assert "  heads: concat" in out and "output labels: 5" in out and "concatenated: 2 tensors" in out
    code, out, _ = run_cli(["merge", *different, "--method", "average", "--heads", "anchor", "--anchor",
                            different[1], "--dry-run"], capsys)
    assert code == 0
    assert "  heads: anchor" in out and "[anchor]" in out.splitlines()[2]


def test_layerwise_keeps_the_anchors_head_by_default_and_concatenates_with_heads_concat(different, tmp_path):
    result, merged, (a, b) = merged_and_sources(different, tmp_path / "anchor", method="layerwise")
    sa, sm = a.state_dict(), merged.state_dict()
    for name in HEAD:
        assert torch.equal(sm[name], sa[name]), name
    assert merged.config.id2label == a.config.id2label
    assert result.details["heads"] == "anchor"

    result, merged, (a, b) = merged_and_sources(different, tmp_path / "concat", method="layerwise", heads="concat")
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    for name in HEAD:
        assert torch.equal(sm[name], torch.cat([sa[name], sb[name]])), name
    labels = merged.config.id2label
    assert [labels[0], labels[2], labels[3]] == ["cat", "owl", "car"]
    assert labels[1].endswith("/dog") and labels[4].endswith("/dog") and labels[1] != labels[4]
    assert_labels_invert(merged.config)
    # the backbone is still layer-weighted: the last shared layer is the anchor's
    last = result.details["layer_weights"][-1]
    assert last["anchor"] == 1.0


def test_layerwise_with_heads_average_averages_shared_heads_outside_the_numbering(equal, tmp_path):
    result, merged, (a, b) = merged_and_sources(equal, tmp_path, method="layerwise", heads="average")
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    for name in HEAD:
        torch.testing.assert_close(sm[name], 0.5 * sa[name] + 0.5 * sb[name], rtol=0, atol=1e-6)
    numbered = [row["module"] for row in result.details["layer_weights"]]
    assert "classifier" not in numbered and result.details["layer_weights"][-1]["anchor"] == 1.0
