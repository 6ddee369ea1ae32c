"""Publishing a saved folder to the Hub in one commit."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from hfmerge.errors import PublishError


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    repo_type: str = "model",
    space_sdk: str | None = None,
    commit_message: str = "Upload merged model with hfmerge",
    delete_patterns: list[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; return the commit URL.

    The token comes from the argument or huggingface_hub's usual sources; it is
    passed to the client only and never appears in messages. Files in the repo
    matching ``delete_patterns`` and absent from ``folder`` are deleted in the same commit.
    """
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type=repo_type, space_sdk=space_sdk)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=commit_message, token=token,
            delete_patterns=delete_patterns,
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise PublishError(
                f"cannot write to {repo_id}: the token is missing or has no write access; "
                "log in with `hf auth login` using a write token, or set HF_TOKEN"
            ) from None
        raise PublishError(f"the Hub refused the upload to {repo_id} (HTTP {status}); nothing was published") from None
    return info.commit_url
