"""The local test Hub through the real huggingface_hub client: revisions as on the Hub, reproducible commit shas."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from hfmerge.testing.local_hub import LocalHub


def upload(api: HfApi, repo_id: str, path: str, content: bytes, revision: str | None = None) -> str:
    info = api.upload_file(path_or_fileobj=content, path_in_repo=path, repo_id=repo_id, revision=revision,
                           commit_message=f"add {path}")
    return info.oid


def refs(api: HfApi, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
    listed = api.list_repo_refs(repo_id)
    return ({b.name: b.target_commit for b in listed.branches}, {t.name: t.target_commit for t in listed.tags})


def test_a_commit_to_a_tag_or_a_sha_is_refused_and_moves_nothing(hub_api, local_hub):
    hub_api.create_repo("org/hub-revs")
    first = upload(hub_api, "org/hub-revs", "a.txt", b"one")
    hub_api.create_tag("org/hub-revs", tag="v1", revision=first)
    head = upload(hub_api, "org/hub-revs", "a.txt", b"two")
    before = refs(hub_api, "org/hub-revs")
    assert before == ({"main": head}, {"v1": first})

    for revision in ("v1", first):
        with pytest.raises(HfHubHTTPError, match="not a branch"):
            upload(hub_api, "org/hub-revs", "b.txt", b"three", revision=revision)
        assert refs(hub_api, "org/hub-revs") == before
    assert set(local_hub.repo("org/hub-revs").commits[head]) == {".gitattributes", "a.txt"}
    with pytest.raises(HfHubHTTPError):
        upload(hub_api, "org/hub-revs", "b.txt", b"three", revision="no-such-branch")


def test_a_commit_to_a_branch_moves_that_branch_only(hub_api):
    hub_api.create_repo("org/hub-branch")
    main = upload(hub_api, "org/hub-branch", "a.txt", b"one")
    hub_api.create_branch("org/hub-branch", branch="dev")
    dev = upload(hub_api, "org/hub-branch", "b.txt", b"dev only", revision="dev")
    assert dev != main
    assert refs(hub_api, "org/hub-branch")[0] == {"main": main, "dev": dev}
    assert open(hf_hub_download("org/hub-branch", "b.txt", revision="dev"), "rb").read() == b"dev only"
    assert "b.txt" not in hub_api.list_repo_files("org/hub-branch")


def pushes(endpoint: str, token: str) -> list[str]:
    """The same repo built by the same three commits; the shas they got."""
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo("org/hub-same")
    shas = [api.model_info("org/hub-same").sha]
    shas.append(upload(api, "org/hub-same", "a.txt", b"one"))
    shas.append(upload(api, "org/hub-same", "b.txt", b"two"))
    return shas


def test_commit_shas_depend_only_on_parent_message_and_content(local_hub):
    with LocalHub(token=local_hub.token) as first, LocalHub(token=local_hub.token) as second:
        shas = pushes(first.endpoint, first.token)
        assert pushes(second.endpoint, second.token) == shas  # another server, another time: the same shas
        assert len(set(shas)) == 3

        api = HfApi(endpoint=first.endpoint, token=first.token)
        # the same content and message on another parent is another commit
        api.create_branch("org/hub-same", branch="side", revision=shas[0])
        on_side = upload(api, "org/hub-same", "b.txt", b"two", revision="side")
        assert on_side not in shas
        # and one file's content changes the sha
        api.create_branch("org/hub-same", branch="other", revision=shas[1])
        assert upload(api, "org/hub-same", "b.txt", b"TWO", revision="other") != shas[2]
        # the same change on the same parent is the same commit
        api.create_branch("org/hub-same", branch="again", revision=shas[1])
        assert upload(api, "org/hub-same", "b.txt", b"two", revision="again") == shas[2]


def test_paths_info_and_an_expanded_tree_give_each_paths_last_commit(hub_api):
    hub_api.create_repo("org/hub-paths", repo_type="dataset")
    first = hub_api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="org/hub-paths",
                                repo_type="dataset", commit_message="add a").oid
    second = hub_api.upload_file(path_or_fileobj=b"two", path_in_repo="data/b.txt", repo_id="org/hub-paths",
                                 repo_type="dataset", commit_message="add b").oid
    found = hub_api.get_paths_info("org/hub-paths", ["a.txt", "data", "missing.txt"], expand=True,
                                   repo_type="dataset")
    assert [(p.path, type(p).__name__, p.last_commit.oid, p.last_commit.title) for p in found] == [
        ("a.txt", "RepoFile", first, "add a"), ("data", "RepoFolder", second, "add b")]
    assert found[0].size == 3
    tree = {p.path: p for p in hub_api.list_repo_tree("org/hub-paths", recursive=True, expand=True,
                                                       repo_type="dataset")}
    assert set(tree) == {".gitattributes", "a.txt", "data", "data/b.txt"}
    assert tree["data/b.txt"].last_commit.oid == second and tree["a.txt"].last_commit.oid == first
    old = hub_api.get_paths_info("org/hub-paths", ["a.txt", "data"], revision=first, repo_type="dataset")
    assert [p.path for p in old] == ["a.txt"]  # at the first commit there was no data/
    with pytest.raises(HfHubHTTPError):
        list(hub_api.list_repo_tree("org/hub-paths", path_in_repo="nowhere", repo_type="dataset"))


# What datasets 5.x asks a Hub for, as measured against this server: the dataset's info, the README, tree
# listings of the repo and data/, resolve (HEAD, GET, and GET with Range when streaming) of the data files,
# and three probes that a parquet dataset answers with 404 (a loading script, .huggingface.yaml, dataset_infos.json).
DATASETS_PROBES = ("/org/hub-data/resolve/{sha}/hub-data.py", "/org/hub-data/resolve/{sha}/.huggingface.yaml",
                   "/org/hub-data/resolve/{sha}/dataset_infos.json")


@pytest.mark.parametrize("streaming", [False, True], ids=["downloaded", "streamed"])
def test_datasets_load_dataset_reads_a_revision_from_the_local_hub(hub_api, local_hub, tmp_path, monkeypatch,
                                                                   streaming):
    import datasets
    from PIL import Image

    from hfmerge.testing.tasks import write_parquet_repo

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)  # datasets' 5 s pause after a stream
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def version(rows: int) -> str:
        images = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(rows)]
        table = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(rows)]}, features=features)
        folder = write_parquet_repo(tmp_path / str(rows), "hub-data", datasets.DatasetDict({"train": table}))
        return hub_api.upload_folder(folder_path=str(folder), repo_id="org/hub-data", repo_type="dataset",
                                     commit_message=f"{rows} rows").oid

    hub_api.create_repo("org/hub-data", repo_type="dataset", exist_ok=True)
    v1 = version(4)
    hub_api.create_tag("org/hub-data", tag=f"v1-{streaming}", revision=v1, repo_type="dataset")
    version(7)
    start = len(local_hub.responses)
    for revision, rows in ((f"v1-{streaming}", 4), (v1, 4), ("main", 7)):
        loaded = datasets.load_dataset("org/hub-data", revision=revision, split="train", streaming=streaming)
        reds = [row["image"].getpixel((0, 0))[0] for row in loaded]
        assert reds == list(range(rows)), revision
    answered = local_hub.responses[start:]
    missing = {path for status, _, path in answered if status == 404}
    assert missing <= {"/datasets" + p.format(sha=sha) for p in DATASETS_PROBES
                       for sha in {s for _, _, path in answered for s in path.split("/") if len(s) == 40}}
    assert all(status in (200, 206, 404) for status, _, _ in answered)
    if streaming:
        assert any(status == 206 for status, _, _ in answered)  # parquet read by ranges
