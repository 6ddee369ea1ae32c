"""Publishing a saved folder to the Hub in one commit, and checking beforehand that it can be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import get_token, validate_repo_id

from hfmerge.errors import PublishError
from hfmerge.hub.connection import TRANSPORT_ERRORS, hub_unreachable
from hfmerge.publish.manifest import MANIFEST_FILE

_LOGIN_HINT = "log in with `hf auth login` using a write token, or set HF_TOKEN"


def check_push_access(repo_id: str, *, token: str | bool | None = None, repo_type: str = "model") -> str:
    """Check, before any work, that ``repo_id`` can be created or written with this token; return the user name.

    The token must exist and be valid (``whoami``), have write access (a
    ``write`` token, or a fine-grained one with ``repo.write`` on the repo or
    its namespace), and the namespace must be the user's own or one of its
    organisations where it is more than a reader. Nothing is created: a failed
    merge leaves no empty repo behind.

    Raises:
        PublishError: what is missing, and how to get it.
        HubUnreachableError: the Hub cannot be reached.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PublishError(f"--push-to-hub {repo_id!r} is not a valid repo id; write it as owner/name") from None
    if hf_constants.HF_HUB_OFFLINE:
        raise PublishError(
            f"pushing to {repo_id} needs the Hub, but HF_HUB_OFFLINE is set: unset it, or use --output only"
        )
    if token is False or (token is None and get_token() is None):
        raise PublishError(f"pushing to {repo_id} needs a token with write access: {_LOGIN_HINT}")
    try:
        me = HfApi().whoami(token=None if token is True else token)
    except TRANSPORT_ERRORS as exc:
        raise hub_unreachable(exc) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise PublishError(
                f"cannot push to {repo_id}: the Hub rejects the token as invalid; {_LOGIN_HINT}"
            ) from None
        raise PublishError(f"the Hub answered HTTP {status} when checking the token for {repo_id}; try again") from None
    user = str(me.get("name", ""))
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    orgs = {str(o.get("name")): o for o in me.get("orgs") or []}
    if namespace != user and (namespace not in orgs or orgs[namespace].get("roleInOrg") == "read"):
        raise PublishError(
            f"cannot push to {repo_id}: the token belongs to {user!r}, who cannot create repos under {namespace!r}; "
            f"push to {user}/{repo_id.split('/')[-1]} or to an organisation you can write to"
        )
    if not _token_may_write(me.get("auth") or {}, namespace, repo_id):
        raise PublishError(f"cannot push to {repo_id}: the token is read-only; {_LOGIN_HINT}")
    return user


def _token_may_write(auth: dict[str, Any], namespace: str, repo_id: str) -> bool:
    access = auth.get("accessToken") or {}
    role = access.get("role")
    if role == "write":
        return True
    if role != "fineGrained":
        return False
    grants = access.get("fineGrained") or {}
    return any(
        "repo.write" in (scope.get("permissions") or [])
        and (scope.get("entity") or {}).get("name") in (namespace, repo_id)
        for scope in grants.get("scoped") or []
    )


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
    matching ``delete_patterns`` and absent from ``folder`` are deleted in the same commit. The folder's
    list of the files hfmerge wrote (:mod:`hfmerge.publish.manifest`) stays on this machine.
    """
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type=repo_type, space_sdk=space_sdk)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=commit_message, token=token,
            delete_patterns=delete_patterns, ignore_patterns=[MANIFEST_FILE],
        )
    except TRANSPORT_ERRORS as exc:
        raise hub_unreachable(exc) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise PublishError(
                f"cannot write to {repo_id}: the token is missing or has no write access; "
                "log in with `hf auth login` using a write token, or set HF_TOKEN"
            ) from None
        raise PublishError(f"the Hub refused the upload to {repo_id} (HTTP {status}); nothing was published") from None
    return info.commit_url
