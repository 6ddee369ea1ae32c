"""Source references (the one parser hfmerge and the Space share) and the Recipe: parsing and validation."""

from __future__ import annotations

import logging

import pytest
import yaml

from hfmerge.errors import RecipeError, SourceError
from hfmerge.hub.resolve import resolve_source
from hfmerge.recipe import Recipe, SourceSpec
from hfmerge.source_ref import SourceRefError, is_repo_id, parse_source_ref

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so that relative paths mean what the test makes there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(("text", "model", "revision"), [
    ("org/name", "org/name", None),
    ("google/vit-base-patch16-224", "google/vit-base-patch16-224", None),
    ("org/name@v1.2", "org/name", "v1.2"),
    ("org/name@refs/pr/3", "org/name", "refs/pr/3"),
    (f"org/name@{SHA}", "org/name", SHA),
    ("  org/name@main  ", "org/name", "main"),
])
def test_hub_references(in_tmp, text, model, revision):
    ref = parse_source_ref(text)
    assert (ref.model, ref.revision, ref.is_folder, ref.shadows_repo_id) == (model, revision, False, False)
    spec = SourceSpec.parse(text)
    assert (spec.model, spec.revision, spec.is_local) == (model, revision, False)


def test_a_commit_sha_is_shown_short():
    assert parse_source_ref(f"org/name@{SHA}").display_name == "org/name@0123456"
    assert parse_source_ref("org/name@v1").display_name == "org/name@v1"
    assert parse_source_ref("org/name").display_name == "org/name"


@pytest.mark.parametrize("text", ["./runs/a", "../a", "/data/models/a", "~/models/a", "./runs/a@v1", "."])
def test_paths_are_folders_whole_even_when_missing(in_tmp, text):
    ref = parse_source_ref(text)
    assert ref.is_folder and ref.model == text and ref.revision is None and not ref.shadows_repo_id
    assert SourceSpec.parse(text).is_local


def test_home_folder_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "a").mkdir(parents=True)
    assert parse_source_ref("~/models/a").path == tmp_path / "models" / "a"


def test_a_relative_folder_that_exists_is_the_folder_even_if_it_looks_like_a_repo_id(in_tmp):
    (in_tmp / "models" / "vit-a").mkdir(parents=True)
    ref = parse_source_ref("models/vit-a")
    assert ref.is_folder and ref.shadows_repo_id and ref.model == "models/vit-a"
    assert ref.display_name == "vit-a"
    assert SourceSpec.parse("models/vit-a").is_local
    # the Hub repo of that name is still reachable, by naming a revision
    assert not parse_source_ref("models/vit-a@main").is_folder
    assert not SourceSpec.parse({"model": "models/vit-a", "commit": SHA}).is_local
    # a folder whose name is no repo id shadows nothing
    (in_tmp / "merged").mkdir()
    assert parse_source_ref("merged").is_folder and not parse_source_ref("merged").shadows_repo_id


@pytest.mark.parametrize("text", ["a/b/c", "merged", "org/a..b", "org/--x", "my model"])
def test_what_is_no_repo_id_is_a_missing_folder(in_tmp, text):
    assert not is_repo_id(text)
    assert parse_source_ref(text).is_folder


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "names no model"), ("   ", "names no model"), ("org/name@", "both parts"), ("@v1", "both parts"),
])
def test_malformed_references(text, fragment):
    with pytest.raises(SourceRefError, match=fragment):
        parse_source_ref(text)
    with pytest.raises(RecipeError, match=fragment):
        SourceSpec.parse(text)


# --------------------------------------------------------------------------- sources in YAML


def test_a_source_mapping():
    spec = SourceSpec.parse({"model": "org/a", "revision": "v1", "commit": SHA, "weight": 2})
    assert spec == SourceSpec(model="org/a", revision="v1", commit=SHA, weight=2.0)
    assert SourceSpec.parse({"model": "org/a@v2"}).revision == "v2"
    assert SourceSpec.parse(spec) is spec


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"model": "org/a", "branch": "dev"}, "unknown field(s) ['branch']"),
    ({"revision": "v1"}, "has no 'model'"),
    ({"model": "org/a", "weight": "heavy"}, "weight must be a number"),
    ({"model": "org/a", "weight": float("nan")}, "weight must be finite"),
    ({"model": "./runs/a", "revision": "v1"}, "a folder has no revision"),
])
def test_bad_source_mappings(entry, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SourceSpec.parse(entry)


# --------------------------------------------------------------------------- resolving a relative folder


def test_a_relative_folder_resolves_to_the_folder_and_says_the_hub_repo_was_not_used(in_tmp, caplog):
    from hfmerge.testing.tiny import save_tiny

    save_tiny(in_tmp / "models" / "vit-a", "vit")
    with caplog.at_level(logging.WARNING, logger="hfmerge"):
        source = resolve_source("models/vit-a")
    assert source.is_local and source.path == in_tmp / "models" / "vit-a"
    assert any("the Hub repo models/vit-a was not used" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfmerge"):
        assert resolve_source("./models/vit-a").path == source.path
    assert not caplog.records  # written as a path: nothing to say


def test_hfmerge_merge_takes_relative_folders(in_tmp, capsys):
    from helpers import run_cli

    from hfmerge.testing.tiny import save_tiny

    for seed, name in ((1, "vit-a"), (2, "vit-b")):
        save_tiny(in_tmp / "models" / name, "vit", seed=seed)
    code, stdout, err = run_cli(["merge", "models/vit-a", "models/vit-b", "-m", "average", "-o", "out", "-q"],
                                capsys)
    assert code == 0, err
    assert stdout.strip() == f"saved: {in_tmp / 'out'}"
    assert [line for line in err.splitlines() if "Hub repo" in line] == [
        f"hfmerge: warning: source {name!r} is the local folder ./{name}, as from_pretrained reads it; the Hub "
        f"repo {name} was not used (write {name}@main for it)" for name in ("models/vit-a", "models/vit-b")]


def test_a_missing_folder_is_refused_in_one_line(in_tmp):
    for text in ("./missing", "a/b/c", "merged"):
        with pytest.raises(SourceError, match="neither an existing folder nor a Hub repo id"):
            resolve_source(text)


# --------------------------------------------------------------------------- the Recipe


def recipe(**fields):
    return Recipe.from_dict({"method": "average", "sources": ["org/a", "org/b"], **fields})


def test_unknown_and_missing_recipe_fields():
    with pytest.raises(RecipeError, match=r"unknown recipe field\(s\) \['mthod'\]"):
        Recipe.from_dict({"mthod": "average", "method": "average", "sources": ["org/a", "org/b"]})
    with pytest.raises(RecipeError, match="has no 'sources' field"):
        Recipe.from_dict({"method": "average"})
    with pytest.raises(RecipeError, match="has no 'method' field"):
        Recipe.from_dict({"sources": ["org/a"]})
    with pytest.raises(RecipeError, match="'sources' must be a list"):
        Recipe.from_dict({"method": "average", "sources": "org/a"})
    with pytest.raises(RecipeError, match="must be a mapping"):
        Recipe.from_dict(["org/a"])
    with pytest.raises(RecipeError, match="unknown method 'avg'"):
        recipe(method="avg")
    with pytest.raises(RecipeError, match="unknown parameter"):
        recipe(parameters={"lambda": 1})


def test_weights_per_source_or_as_a_list():
    per_source = recipe(sources=[{"model": "org/a", "weight": 3}, {"model": "org/b", "weight": 1}])
    assert per_source.weights == [3.0, 1.0]
    assert recipe(weights=[1, 2]).weights == [1.0, 2.0]
    # both, agreeing, is accepted; disagreeing is not
    agreeing = [{"model": "org/a", "weight": 1}, {"model": "org/b", "weight": 2}]
    assert recipe(sources=agreeing, weights=[1.0, 2.0]).weights == [1.0, 2.0]
    with pytest.raises(RecipeError, match="either per source or as 'weights'"):
        recipe(sources=agreeing, weights=[2.0, 1.0])
    with pytest.raises(RecipeError, match="some sources have a weight"):
        recipe(sources=[{"model": "org/a", "weight": 1}, "org/b"])
    with pytest.raises(RecipeError, match="3 weights for 2 sources"):
        recipe(weights=[1, 1, 1])
    with pytest.raises(RecipeError, match="non-negative"):
        recipe(weights=[1, -1])
    with pytest.raises(RecipeError, match="sum to zero"):
        recipe(weights=[0, 0])
    with pytest.raises(RecipeError, match="takes no weights"):
        recipe(method="layerwise", weights=[1, 1])


def test_the_anchor_is_matched_by_repo_id_revision_or_folder(in_tmp):
    sources = ["org/a", "org/b@v1", "org/b@v2", str(in_tmp / "runs" / "c")]
    (in_tmp / "runs" / "c").mkdir(parents=True)
    assert Recipe(sources=sources, method="layerwise", anchor="org/a").anchor_index() == 0
    assert Recipe(sources=sources, method="layerwise", anchor="org/b@v2").anchor_index() == 2
    # the same folder, written another way
    assert Recipe(sources=sources, method="layerwise", anchor="./runs/c").anchor_index() == 3
    assert Recipe(sources=sources, method="layerwise", anchor="runs/c").anchor_index() == 3
    assert Recipe(sources=sources, method="layerwise").anchor_index() == 0
    with pytest.raises(RecipeError, match="matches several sources"):
        Recipe(sources=sources, method="layerwise", anchor="org/b")
    with pytest.raises(RecipeError, match="is not one of the sources"):
        Recipe(sources=sources, method="layerwise", anchor="org/z")
    with pytest.raises(RecipeError, match="takes no anchor"):
        Recipe(sources=sources, method="average", anchor="org/a")


def test_yaml_recipes_round_trip_and_bad_files(tmp_path):
    original = recipe(sources=[{"model": "org/a", "revision": "v1", "commit": SHA}, "./runs/b"],
                      weights=[1, 3], dtype="float16")
    path = tmp_path / "recipe.yaml"
    path.write_text(original.to_yaml())
    again = Recipe.from_yaml(path)
    assert again.to_dict() == original.to_dict()
    assert again.sources[0] == SourceSpec(model="org/a", revision="v1", commit=SHA)
    assert yaml.safe_load(path.read_text())["sources"][1] == {"model": "./runs/b"}

    path.write_text("method: average\nsources: [org/a\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        Recipe.from_yaml(path)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="unknown dtype"):
        recipe(dtype="float8")
    with pytest.raises(RecipeError, match="max_shard_size"):
        recipe(max_shard_size="lots")
