"""Safety of the output and of the push: what --overwrite may replace, write access checked first,
an unreachable Hub in one line, a dry run that downloads no weights, and output folders that follow the umask."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
import yaml
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.io.checkpoint import CheckpointReader
from hfmerge.publish.result import check_output_folder
from hfmerge.testing.tiny import image_processor, tiny_model


@pytest.fixture
def vits(make_source):
    return make_source("vit", seed=1), make_source("vit", seed=2)


def folder_with(path: Path, *names: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text(f"the user's {name}\n")
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir() if p.is_file()}


# -- --overwrite replaces only an empty folder or an earlier output, never cwd, its ancestors, home or root ------


@pytest.mark.parametrize("where", ["cwd", "ancestor", "home"])
def test_overwrite_never_replaces_the_current_folder_its_ancestors_or_home(vits, tmp_path, monkeypatch, capsys,
                                                                          where):
    home = folder_with(tmp_path / "home", "notes.txt", "hfmerge.yaml")  # each even holding hfmerge.yaml
    folder_with(home / "work", "report.txt", "hfmerge.yaml")
    work = folder_with(home / "work" / "sub", "data.csv", "hfmerge.yaml")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    output, protected, words = {"cwd": (".", work, "the current folder"),
                                "ancestor": ("..", work.parent, "an ancestor of the current folder"),
                                "home": ("~", home, "the home folder")}[where]
    if where == "home":
        monkeypatch.chdir(tmp_path)
    before = contents(protected)
    code, _, err = run_cli(["merge", *vits, "-m", "average", "--output", output, "--overwrite", "-q"], capsys)
    assert_one_line_error(code, err, words, "never replaces")
    assert contents(protected) == before
    assert [p.name for p in protected.parent.iterdir() if p.name.startswith(".")] == []


def test_a_filesystem_root_is_never_an_output():
    root = Path(Path.cwd().anchor)
    with pytest.raises(hfmerge.OutputExistsError, match="filesystem root"):
        check_output_folder(root, overwrite=True)


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_folder_of_the_users_is_refused_suggesting_only_what_works(vits, tmp_path, capsys, flag):
    out = folder_with(tmp_path / "photos", "holiday.jpg")
    code, _, err = run_cli(["merge", *vits, "-m", "average", "-o", out, *flag, "-q"], capsys)
    assert_one_line_error(code, err, "no hfmerge.yaml", "will not replace it", "choose another path")
    assert "--overwrite" not in err  # it would be refused too
    assert contents(out) == {"holiday.jpg": "the user's holiday.jpg\n"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_an_empty_folder_and_an_earlier_output(vits, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    assert run_cli(["merge", *vits, "-m", "average", "-o", out, "-q"], capsys)[0] == 0  # empty: no flag needed
    code, _, err = run_cli(["merge", *vits, "-m", "average", "--weights", "1,3", "-o", out, "-q"], capsys)
    assert_one_line_error(code, err, "holds an earlier hfmerge output", "pass --overwrite")
    assert run_cli(["merge", *vits, "-m", "average", "--weights", "1,3", "-o", out, "--overwrite", "-q"],
                   capsys)[0] == 0  # what the message suggested works
    assert yaml.safe_load((out / "hfmerge.yaml").read_text())["weights"] == [1.0, 3.0]


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_overwrite_refuses_an_earlier_output_holding_the_users_files_and_names_them(vits, tmp_path, capsys, flag):
    out = tmp_path / "merged"
    assert run_cli(["merge", *vits, "-m", "average", "-o", out, "-q"], capsys)[0] == 0
    folder_with(out, "notes.txt", "zz-plot.png")
    folder_with(out / "results", "a.json", "b.json")
    (out / "README.md").write_text("# my own card\n")  # hfmerge's file, changed since: the user's now
    users = ["README.md", "notes.txt", "results/a.json", "results/b.json", "zz-plot.png"]
    before = {name: (out / name).read_text() for name in [*users, "hfmerge.yaml"]}
    code, _, err = run_cli(["merge", *vits, "-m", "average", "--weights", "1,3", "-o", out, *flag, "-q"], capsys)
    # sorted, the first three named and the rest counted
    assert_one_line_error(code, err, "did not write there, or that changed since: README.md, notes.txt, "
                                     "results/a.json and 2 more", "move them out", "or choose another path")
    assert ("pass --overwrite" in err) == (not flag)
    assert {name: (out / name).read_text() for name in [*users, "hfmerge.yaml"]} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_what_hfmerge_evaluate_wrote_into_an_earlier_output(vits, tmp_path, capsys):
    from test_every_method import random_images

    labeled = tmp_path / "labeled"
    for label in ("class_0", "class_1"):
        random_images(labeled / label, count=2)
    out = tmp_path / "merged"
    assert run_cli(["merge", *vits, "-m", "average", "-o", out, "-q"], capsys)[0] == 0
    code, _, err = run_cli(["evaluate", out, "--data", labeled, "--update-card", "-q"], capsys)
    assert code == 0, err
    assert (out / "evaluation.svg").is_file() and "## Evaluation" in (out / "README.md").read_text()
    code, _, err = run_cli(["merge", *vits, "-m", "average", "--weights", "1,3", "-o", out, "--overwrite", "-q"],
                           capsys)
    assert code == 0, err
    assert not (out / "evaluation.svg").exists()  # the chart of the model it replaced, hfmerge's to remove
    assert yaml.safe_load((out / "hfmerge.yaml").read_text())["weights"] == [1.0, 3.0]


def test_hfmerge_evaluate_leaves_a_card_the_user_edited_the_users(vits, tmp_path, capsys):
    from test_every_method import random_images

    labeled = tmp_path / "labeled"
    for label in ("class_0", "class_1"):
        random_images(labeled / label, count=2)
    out = tmp_path / "merged"
    assert run_cli(["merge", *vits, "-m", "average", "-o", out, "-q"], capsys)[0] == 0
    (out / "README.md").write_text("# my own card\n")
    assert run_cli(["evaluate", out, "--data", labeled, "--update-card", "-q"], capsys)[0] == 0
    code, _, err = run_cli(["merge", *vits, "-m", "average", "-o", out, "--overwrite", "-q"], capsys)
    assert_one_line_error(code, err, "or that changed since: README.md;")
    assert "# my own card\n" in (out / "README.md").read_text()  # with the evaluation hfmerge added


def test_an_output_without_the_list_of_hfmerge_files_is_refused(vits, tmp_path, capsys):
    out = folder_with(tmp_path / "project", "hfmerge.yaml", "data.csv")  # a recipe kept beside the user's files
    code, _, err = run_cli(["merge", *vits, "-m", "average", "-o", out, "--overwrite", "-q"], capsys)
    assert_one_line_error(code, err, "no .hfmerge-files.json", "choose another path, or empty the folder")
    assert contents(out) == {"hfmerge.yaml": "the user's hfmerge.yaml\n", "data.csv": "the user's data.csv\n"}


def test_space_overwrite_follows_the_same_rule_with_space_config_json(make_source, tmp_path, monkeypatch, capsys):
    model = make_source("vit")
    args = ["space", model, "--no-sources"]
    photos = folder_with(tmp_path / "photos", "holiday.jpg")
    for flag in ([], ["--overwrite"]):
        code, _, err = run_cli([*args, *flag, "--output", photos], capsys)
        assert_one_line_error(code, err, "no space_config.json", "choose another path")
        assert "--overwrite" not in err
    assert contents(photos) == {"holiday.jpg": "the user's holiday.jpg\n"}
    monkeypatch.chdir(folder_with(tmp_path / "work", "space_config.json"))
    code, _, err = run_cli([*args, "--overwrite", "--output", "."], capsys)
    assert_one_line_error(code, err, "the current folder")
    space = tmp_path / "space"
    assert run_cli([*args, "--output", space], capsys)[0] == 0
    code, _, err = run_cli([*args, "--output", space, "--title", "Again"], capsys)
    assert_one_line_error(code, err, "holds an earlier hfmerge output", "pass --overwrite")
    mine = folder_with(space / "examples", "mine.jpg")
    code, _, err = run_cli([*args, "--output", space, "--title", "Again", "--overwrite"], capsys)
    assert_one_line_error(code, err, "or that changed since: examples/mine.jpg;", "move them out")
    assert (mine / "mine.jpg").read_text() == "the user's mine.jpg\n"
    (mine / "mine.jpg").unlink()
    assert run_cli([*args, "--output", space, "--title", "Again", "--overwrite"], capsys)[0] == 0
    assert "Again" in (space / "README.md").read_text()


# -- write access is checked before any tensor is read ------------------------------------------------------


@pytest.fixture
def no_tensor_read(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"tensor {key} was read before the push was checked")

    monkeypatch.setattr(CheckpointReader, "get", refuse)


@pytest.mark.parametrize(
    ("token", "repo", "fragments"),
    [
        (None, "tester/pushed", ["needs a token with write access", "HF_TOKEN"]),
        ("hf_not_a_valid_token", "tester/pushed", ["rejects the token as invalid"]),
        ("hf_local_read_token", "tester/pushed", ["token is read-only"]),
        ("hf_local_test_token", "someone-else/pushed", ["cannot create repos under 'someone-else'"]),
    ],
)
def test_push_without_write_access_fails_before_merging(vits, local_hub, tmp_path, monkeypatch, capsys,
                                                        no_tensor_read, token, repo, fragments):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *vits, "-m", "average", "-o", out, "--push-to-hub", repo, "-q"], capsys)
    assert_one_line_error(code, err, repo, *fragments)
    assert "hf_local" not in err and "hf_not" not in err  # no token in messages
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert local_hub.repo(repo) is None


def test_library_checks_push_access_before_merging(vits, local_hub, tmp_path, no_tensor_read):
    with pytest.raises(hfmerge.PublishError, match="needs a token with write access"):
        hfmerge.merge([str(v) for v in vits], output=tmp_path / "out", push_to_hub="tester/lib-pushed", token=False,
                      progress=False)
    assert not (tmp_path / "out").exists()


def test_run_recipe_honours_output_and_push_to_hub(vits, local_hub, tmp_path):
    recipe = hfmerge.Recipe(sources=[str(v) for v in vits], method="average",
                            output=str(tmp_path / "out"), push_to_hub="tester/recipe-pushed", private=True)
    result = hfmerge.run_recipe(recipe, progress=False)
    assert result.saved_to == tmp_path / "out" and (tmp_path / "out" / "model.safetensors").is_file()
    repo = local_hub.repo("tester/recipe-pushed")
    assert repo is not None and repo.private
    assert result.commit_url.endswith(repo.branches["main"])
    pushed = repo.commits[repo.branches["main"]]["model.safetensors"]
    assert pushed == (tmp_path / "out" / "model.safetensors").read_bytes()


# -- an unreachable Hub: one line naming the endpoint, fast -----------------------------------------------


def _hub_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "average", "sources": ["org/far-a", "org/far-b"]}))
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "org/far-a", "org/far-b", "-m", "average", "-o", "{tmp}/out"],
        ["merge", "org/far-a", "org/far-b", "-m", "average", "--dry-run"],
        ["run", "{recipe}", "-o", "{tmp}/out"],
        ["inspect", "org/far-a"],
        ["space", "org/far-a", "--output", "{tmp}/space"],
        ["merge", "{local}", "{local}", "-m", "average", "--push-to-hub", "tester/far"],
    ],
    ids=["merge", "dry-run", "run", "inspect", "space", "push"],
)
def test_unreachable_hub_is_one_line_and_fails_fast(unreachable_hub, make_source, tmp_path, capsys, command):
    local = make_source("vit")
    values = {"tmp": tmp_path, "recipe": _hub_recipe(tmp_path), "local": local}
    args = [part.format(**values) for part in command]
    start = time.monotonic()
    code, _, err = run_cli(args, capsys)
    elapsed = time.monotonic() - start
    assert_one_line_error(code, err, f"cannot reach the Hub at {unreachable_hub}", "HF_HUB_OFFLINE=1")
    assert elapsed < 5, f"{elapsed:.1f} s to give up"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["recipe.yaml", local.name])  # nothing written


def test_a_hub_that_never_answers_times_out(monkeypatch, capsys):
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        start = time.monotonic()
        code, _, err = run_cli(["inspect", "org/far-a"], capsys)
        elapsed = time.monotonic() - start
    assert_one_line_error(code, err, f"cannot reach the Hub at {endpoint} (timed out)", "HF_HUB_OFFLINE=1")
    assert elapsed < 5


# -- --dry-run reads configs and safetensors headers, never a weight file ---------------------------------


def test_dry_run_of_hub_sources_reads_headers_only(publish, local_hub, tmp_path, capsys):
    publish("org/dry-a", family="segformer", seed=1)
    sharded = tmp_path / "sharded"  # the second in shards: headers of every shard, weight map from the index
    tiny_model("segformer", 5, seed=2).save_pretrained(sharded, max_shard_size="20KB")
    image_processor("segformer").save_pretrained(sharded)
    publish("org/dry-b", sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    seen = len(local_hub.requests)
    out = tmp_path / "out"
    command = ["merge", "org/dry-a", "org/dry-b", "-m", "layerwise", "--anchor", "org/dry-a", "-o", out]
    code, stdout, _ = run_cli([*command, "--dry-run"], capsys)
    assert code == 0
    weights = [(verb, path, span) for verb, path, span in local_hub.requests[seen:] if path.endswith(".safetensors")]
    assert {path.split("/")[2] for verb, path, span in weights if verb == "GET"} == {"dry-a", "dry-b"}
    assert all(span is not None for verb, path, span in weights if verb == "GET"), weights  # no full body
    assert not out.exists()
    cache = Path(os.environ["HF_HOME"]) / "hub"
    assert not list(cache.glob("models--org--dry-*/**/*.safetensors"))
    # the same plan as with the weights at hand
    full = hfmerge.plan_merge(hfmerge.Recipe(sources=["org/dry-a", "org/dry-b"], method="layerwise",
                                             anchor="org/dry-a"))
    assert stdout.strip() == full.describe()
    assert "shared layers Np" in stdout


# -- output folders follow the umask -------------------------------------------------------------------------


def test_output_folders_follow_the_umask(vits, make_source, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        out, space = tmp_path / "merged", tmp_path / "space"
        assert run_cli(["merge", *vits, "-m", "average", "-o", out, "-q"], capsys)[0] == 0
        assert run_cli(["space", vits[0], "--no-sources", "-o", space], capsys)[0] == 0
    finally:
        os.umask(previous)
    for folder in (out, space):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}, folder


def test_local_hub_answers_ranges_as_the_hub_does(publish, local_hub):
    import httpx

    sha = publish("org/ranged", family="vit", seed=3)
    url = f"{local_hub.endpoint}/org/ranged/resolve/{sha}/config.json"
    whole = httpx.get(url).content
    part = httpx.get(url, headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == whole[2:10]
    assert part.headers["Content-Range"] == f"bytes 2-9/{len(whole)}"
    tail = httpx.get(url, headers={"Range": "bytes=-4"})
    assert tail.status_code == 206 and tail.content == whole[-4:]
    assert httpx.get(url, headers={"Range": f"bytes={len(whole)}-"}).status_code == 416
