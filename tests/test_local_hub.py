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
