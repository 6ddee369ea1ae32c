"""The real huggingface_hub client path against the local Hub: pull by repo id and revision, push, pull again."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForImageClassification, pipeline

import hfmerge
from hfmerge.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def vit_repos(publish):
    """Two ViTs on the local Hub; the second has a tagged first version and a newer main."""
    sha_a = publish("org/vit-a", family="vit", seed=1, readme="---\nlicense: apache-2.0\n---\n# a\n")
    sha_b1 = publish("org/vit-b", family="vit", seed=2, readme="---\nlicense: apache-2.0\n---\n# b\n")
    from huggingface_hub import HfApi

    HfApi().create_tag("org/vit-b", tag="v1", revision=sha_b1)
    sha_b2 = publish("org/vit-b", family="vit", seed=3, readme="---\nlicense: apache-2.0\n---\n# b\n")
    return {"a": sha_a, "b1": sha_b1, "b2": sha_b2}


def state(ref):
    return hfmerge.load(ref).state_dict()


def test_merge_by_repo_id_and_revision_pins_commits(vit_repos, tmp_path, local_hub):
    result = hfmerge.merge(["org/vit-a", "org/vit-b@v1"], method="average", progress=False)
    out = result.save(tmp_path / "merged")
    recipe = yaml.safe_load((out / "hfmerge.yaml").read_text())
    assert recipe["sources"][0] == {"model": "org/vit-a", "commit": vit_repos["a"]}
    assert recipe["sources"][1] == {"model": "org/vit-b", "revision": "v1", "commit": vit_repos["b1"]}
    sa, sb, sm = state("org/vit-a"), state(f"org/vit-b@{vit_repos['b1']}"), state(str(out))
    for name in sm:
        torch.testing.assert_close(sm[name], (sa[name] + sb[name]) / 2, rtol=0, atol=1e-6)
    # the tag resolved to the first version, not the newer main
    assert not torch.equal(sb["classifier.weight"], state("org/vit-b")["classifier.weight"])


def test_merge_by_commit_sha_and_push_result_then_download_it(vit_repos, tmp_path, local_hub):
    result = hfmerge.merge(["org/vit-a", f"org/vit-b@{vit_repos['b2']}"], method="layerwise", progress=False)
    before = result.save(tmp_path / "before-push")
    url = result.push_to_hub("tester/vit-merged")
    assert "path/to/merged-model" in (before / "README.md").read_text()  # the saved copy is not rewritten
    repo = local_hub.repo("tester/vit-merged")
    assert url.endswith(repo.branches["main"])
    assert {"model.safetensors", "config.json", "README.md", "hfmerge.yaml", "preprocessor_config.json"} <= set(
        repo.commits[repo.branches["main"]]
    )
    assert len(repo.history) == 2  # the creation commit, then exactly one upload commit
    card = repo.commits[repo.branches["main"]]["README.md"].decode()
    assert 'from_pretrained("tester/vit-merged")' in card
    saved = result.save(tmp_path / "local")
    assert 'from_pretrained("tester/vit-merged")' in (saved / "README.md").read_text()  # saved after the push
    downloaded = AutoModelForImageClassification.from_pretrained("tester/vit-merged")
    for name, value in downloaded.state_dict().items():
        assert torch.equal(value, state(str(saved))[name])
    classifier = pipeline("image-classification", model="tester/vit-merged")
    from PIL import Image

    predictions = classifier(Image.new("RGB", (16, 16), color=(120, 30, 200)))
    assert len(predictions) == 3 and abs(sum(p["score"] for p in predictions) - 1) < 1e-4


def test_card_metadata_and_license(vit_repos, tmp_path):
    result = hfmerge.merge(["org/vit-a", "org/vit-b"], method="layerwise", progress=False)
    data = result.card.data.to_dict()
    assert data["base_model"] == ["org/vit-a", "org/vit-b"]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert data["tags"] == ["hfmerge", "merge", "layerwise"]
    assert data["license"] == "apache-2.0"
    text = str(result.card)
    assert "https://arxiv.org/abs/2409.15813" in text
    assert vit_repos["a"] in text and vit_repos["b2"] in text
    assert f"hfmerge merge org/vit-a@{vit_repos['a']} org/vit-b@{vit_repos['b2']} --method layerwise" in text


def test_licenses_that_disagree_are_left_out_with_a_note(publish):
    publish("org/vit-mit", family="vit", seed=4, readme="---\nlicense: mit\n---\n")
    publish("org/vit-apache", family="vit", seed=5, readme="---\nlicense: apache-2.0\n---\n")
    result = hfmerge.merge(["org/vit-mit", "org/vit-apache"], progress=False)
    assert "license" not in result.card.data.to_dict()
    assert result.warnings and "licenses differ" in result.warnings[0]
    assert "licenses differ" in str(result.card)


def test_private_repo_needs_a_token(publish, monkeypatch):
    publish("org/vit-private", family="vit", seed=6, private=True)
    with pytest.raises(hfmerge.SourceError, match="private and no token"):
        hfmerge.merge(["org/vit-private", "org/vit-private"], token=False, progress=False)
    assert hfmerge.merge(["org/vit-private", "org/vit-private"], progress=False).files


def test_missing_repo_and_revision_are_clear_errors(vit_repos):
    with pytest.raises(hfmerge.SourceError, match="does not exist on the Hub"):
        hfmerge.merge(["org/nope", "org/vit-a"], progress=False)
    with pytest.raises(hfmerge.SourceError, match="revision 'v9' does not exist in org/vit-b"):
        hfmerge.merge(["org/vit-a", "org/vit-b@v9"], progress=False)


def test_pickle_only_source_is_refused_unless_allowed(publish, tmp_path):
    model = tiny_model("vit", seed=8)
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    publish("org/vit-pickle", folder)
    with pytest.raises(hfmerge.SourceError, match="--allow-pickle"):
        hfmerge.merge(["org/vit-pickle", "org/vit-a"], progress=False)
    result = hfmerge.merge(["org/vit-pickle", "org/vit-pickle"], allow_pickle=True, progress=False)
    merged = hfmerge.load(str(result.save(tmp_path / "out")))
    for name, value in merged.state_dict().items():
        assert torch.equal(value, model.state_dict()[name])


def test_inspect_lists_layers_in_depth_order_with_memory_names(vit_repos, capsys):
    from hfmerge.cli import main

    assert main(["inspect", "org/vit-a"]) == 0
    out = capsys.readouterr().out
    assert f"source: org/vit-a @ {vit_repos['a']}" in out
    assert "family: vit" in out and "task: image-classification" in out
    layers = [line.split()[1] for line in out.splitlines() if line.startswith("  ") and "tensors)" in line]
    assert layers[0] == "vit.embeddings"
    assert layers.index("vit.layers.0.attention.q_proj") < layers.index("vit.layers.1.attention.q_proj")
    assert layers[-1] == "classifier"
    assert "classifier.weight  [3, 32]" in out
    assert "license: apache-2.0" in out


def test_offline_mode_resolves_from_the_cache(vit_repos, tmp_path, monkeypatch):
    hfmerge.merge(["org/vit-a", "org/vit-b"], progress=False)  # fills the cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = hfmerge.merge(["org/vit-a", "org/vit-b"], progress=False)
    assert [s.commit_sha for s in result.planned.sources] == [vit_repos["a"], vit_repos["b2"]]
    out = json.loads((result.save(tmp_path / "o") / "config.json").read_text())
    assert out["architectures"] == ["ViTForImageClassification"]


def test_offline_a_missing_relative_folder_is_named_as_a_folder_and_as_a_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hfmerge.SourceError, match=r"models/nope is not a folder here, and as a Hub repo it is not "
                                                  r"in the local cache \(HF_HUB_OFFLINE is set\)"):
        hfmerge.plan_merge(hfmerge.Recipe(sources=["models/nope", "models/nope2"], method="average"))
