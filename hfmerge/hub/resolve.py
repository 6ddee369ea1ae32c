"""Turning what the user named into a local folder pinned to a commit.

A source is a Hub repo id (``org/name``, ``org/name@revision``) or a local
folder (a ``save_pretrained`` folder or a Trainer ``checkpoint-N/`` folder).
Repo ids are resolved to a commit sha first, then only the files a merge needs
are downloaded at that sha, so the recorded provenance is exactly what was
merged. The token comes from huggingface_hub's usual sources and is never
printed or stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)

from hfmerge.errors import SourceError
from hfmerge.hub.connection import TRANSPORT_ERRORS, hub_unreachable
from hfmerge.source import SourceSpec

SAFE_PATTERNS = ["*.json", "*.safetensors", "README.md", "merges.txt"]  # merges.txt: a CLIP tokenizer's
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
METADATA_PATTERNS = ["*.json", "README.md", "hfmerge.yaml"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned to files on disk.

    Attributes:
        spec: what the user wrote.
        path: local folder holding config, processor and weights.
        repo_id: the Hub repo, or ``None`` for a local folder.
        revision: the revision asked for (branch, tag or sha), if any.
        commit_sha: the commit the files come from (Hub sources only).
        license: the license in the repo card's metadata, if any.
    """

    spec: SourceSpec
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    license: str | None = None

    @property
    def is_local(self) -> bool:
        return self.repo_id is None

    @property
    def name(self) -> str:
        """Repo id with revision, or the folder path: how messages refer to the source."""
        return self.spec.ref

    @property
    def short_name(self) -> str:
        """The last part of the name, used to prefix clashing labels."""
        base = self.repo_id.split("/")[-1] if self.repo_id else self.path.name
        return f"{base}@{self.revision}" if self.revision else base


def resolve_source(
    spec: SourceSpec | str, *, token: str | bool | None = None, allow_pickle: bool = False,
    metadata_only: bool = False,
) -> ResolvedSource:
    """Resolve one source to a local folder.

    With ``metadata_only``, a Hub source downloads its configs, card and
    ``hfmerge.yaml`` but no weights: enough to describe it, not to merge it.

    Raises:
        SourceError: the folder or repo does not exist, the revision does not
            exist, the repo is private and no token grants access, or the
            source has no config.
    """
    spec = SourceSpec.parse(spec)
    if spec.is_local:
        local = spec.source_ref.path
        if not local.exists():
            raise SourceError(
                f"source {spec.model!r} is neither an existing folder nor a Hub repo id; "
                "give a folder path or org/name[@revision]"
            )
        if spec.source_ref.shadows_repo_id:
            logger.warning("source %r is the local folder ./%s, as from_pretrained reads it; the Hub repo %s "
                           "was not used (write %s@main for it)", spec.model, spec.model, spec.model, spec.model)
        return _resolve_local(spec, local)
    return _resolve_hub(spec, token=token, allow_pickle=allow_pickle, metadata_only=metadata_only)


def _resolve_local(spec: SourceSpec, folder: Path) -> ResolvedSource:
    if not folder.is_dir():
        raise SourceError(f"source {spec.model!r} is a file; give the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"folder {spec.model!r} has no config.json; give a save_pretrained or Trainer checkpoint-N folder"
        )
    return ResolvedSource(spec=spec, path=folder.resolve(), license=_license_from_readme(folder))


def _resolve_hub(
    spec: SourceSpec, *, token: str | bool | None, allow_pickle: bool, metadata_only: bool = False
) -> ResolvedSource:
    repo_id = spec.model
    revision = spec.commit or spec.revision
    where = f"{repo_id}@{revision}" if revision else repo_id
    folder_like = None if revision else repo_id  # a mistyped relative folder reads as a repo id; '@' says a repo
    patterns = METADATA_PATTERNS if metadata_only else SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    license_ = None
    try:
        if hf_constants.HF_HUB_OFFLINE:
            folder = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
            )
            sha = folder.name
        else:
            # The first request: not retried by huggingface_hub, and bounded, so an unreachable Hub fails fast.
            info = HfApi().model_info(
                repo_id, revision=revision, token=token, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT
            )
            sha = info.sha
            card = getattr(info, "card_data", None)
            license_ = getattr(card, "license", None) if card is not None else None
            names = [s.rfilename for s in (info.siblings or [])]
            _check_weight_files(where, names, allow_pickle)
            # Download by the name asked for, so the cache records the branch or tag for later
            # offline use; if it moved since model_info, fall back to the sha we pinned.
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))
            if folder.name != sha:
                folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token))
    except GatedRepoError:
        raise SourceError(
            f"{repo_id} is gated: accept its conditions on the Hub, then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} does not exist in {repo_id}; give a branch, tag or commit sha") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{repo_id} is not a folder here and does not exist on the Hub, or it is private and no token grants "
            "access: "
            "check the name, or log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except TRANSPORT_ERRORS as exc:
        raise hub_unreachable(exc, name=folder_like) from None
    except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
        if not hf_constants.HF_HUB_OFFLINE and isinstance(exc, LocalEntryNotFoundError):
            # snapshot_download lost the Hub mid-way
            raise hub_unreachable(exc.__cause__ or exc, name=folder_like) from None
        raise SourceError(
            f"{where} is not a folder here, and as a Hub repo it is not in the local cache (HF_HUB_OFFLINE is set): "
            "check the path, or unset HF_HUB_OFFLINE to download it"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise SourceError(f"the Hub answered HTTP {status} for {where}; try again, or check HF_ENDPOINT") from None
    if not (folder / "config.json").is_file():
        raise SourceError(f"{where} has no config.json; hfmerge merges transformers models saved with save_pretrained")
    return ResolvedSource(
        spec=spec,
        path=folder,
        repo_id=repo_id,
        revision=spec.revision,
        commit_sha=sha,
        license=license_ or _license_from_readme(folder),
    )


def safetensors_header(
    source: ResolvedSource, *, token: str | bool | None = None
) -> dict[str, tuple[str, list[int], str]] | None:
    """File, shape and dtype of every tensor of a Hub source, read from its safetensors headers.

    huggingface_hub reads each header with HTTP range requests at the pinned
    commit, so no tensor data is downloaded: this is how ``--dry-run``
    inspects a Hub source. ``None`` when the repo has no safetensors weights.

    Raises:
        SourceError: a header cannot be parsed, or HF_HUB_OFFLINE is set.
        HubUnreachableError: the Hub cannot be reached.
    """
    if hf_constants.HF_HUB_OFFLINE:
        raise SourceError(
            f"{source.name}: its weights are not in the local cache and HF_HUB_OFFLINE is set: "
            "unset it, or download the model first"
        )
    try:
        metadata = HfApi().get_safetensors_metadata(source.repo_id, revision=source.commit_sha, token=token)
    except NotASafetensorsRepoError:
        return None
    except SafetensorsParsingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SourceError(f"{source.name}: a safetensors header cannot be read ({first})") from None
    except TRANSPORT_ERRORS as exc:
        raise hub_unreachable(exc) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise SourceError(
            f"the Hub answered HTTP {status} for {source.name}; try again, or check HF_ENDPOINT"
        ) from None
    return {
        key: (filename, list(info.shape), info.dtype)
        for filename, file_metadata in metadata.files_metadata.items()
        for key, info in file_metadata.tensors.items()
    }


def _check_weight_files(where: str, names: list[str], allow_pickle: bool) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    if pickles and not allow_pickle:
        raise SourceError(
            f"{where} has only pickle weights ({pickles[0]}); pickle can run code when loaded: "
            "ask for a safetensors version, or pass --allow-pickle to read it with torch.load(weights_only=True)"
        )
    if not pickles:
        raise SourceError(f"{where} has no weight files (no *.safetensors); is it a model repo?")


def _license_from_readme(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a malformed card only loses the license
        return None
    value = meta.get("license")
    return str(value) if value else None
