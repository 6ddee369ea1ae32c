"""Opening one split of a dataset: a Hub dataset at a pinned commit, a ``save_to_disk`` folder, or an image folder.

Everything ``datasets`` and ``huggingface_hub`` raise for a dataset that
cannot be opened or read is turned here into one-line hfmerge errors
(:func:`hub_errors`); an unreachable Hub is reported as model resolution
reports it (:mod:`hfmerge.hub.connection`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import constants as hf_constants

from hfmerge.data.spec import DataSpec
from hfmerge.errors import DataError, HfMergeError
from hfmerge.hub.connection import TRANSPORT_ERRORS, hub_unreachable
from hfmerge.source_ref import is_commit_sha, parse_source_ref

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

STREAM_MIN_BYTES = 64 * 2**20  # smaller splits are downloaded whole: datasets ends each stream with a 5 s pause
NAMED_FILES = 5  # the files a message names before "and K more"
IMAGE_FOLDER_HINT = "give a folder of images (.png, .jpg, ...), flat or one subfolder per class"


def named_files(names: list[str], shown: int = NAMED_FILES) -> str:
    """``a, b, c and K more``: the first ``shown`` of ``names``, and how many are left out."""
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed


def no_images_error(spec: DataSpec) -> DataError:
    """The one line for a local folder none of whose files is an image: the files named, and what to give instead.

    Said alike whether ``datasets`` found no file named as an image or the files named so failed to decode, and
    before any question of labels: a folder's labels are its images' subfolders, so without images it has none.
    """
    folder = spec.path
    where = f"folder {folder.resolve().name!r}"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not files:
        return DataError(f"{where} is empty; {IMAGE_FOLDER_HINT}")
    what = "is not an image" if len(files) == 1 else "are not images"
    return DataError(f"{where} has no images: {named_files(files)} {what}; {IMAGE_FOLDER_HINT}")


def saved_to_disk(folder: Path) -> bool:
    """Whether ``folder`` is a ``datasets`` ``save_to_disk`` folder (else it is read as an image folder)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def pick_split(splits: list[str], spec: DataSpec, where: str) -> str:
    """The split ``spec`` names, else ``train``, else the only one; a DataError listing ``splits`` otherwise."""
    listed = ", ".join(splits) or "none"
    if spec.split is not None:
        if spec.split not in splits:
            raise DataError(f"split {spec.split!r} does not exist in {where}; its splits are: {listed} "
                            f"(write {spec.dataset}:{splits[0] if splits else 'SPLIT'})")
        return spec.split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{where} has several splits ({listed}); name one, e.g. {spec.dataset}:{splits[0]}"
                    if splits else f"{where} has no splits; check the dataset")


def split_names(spec: DataSpec, *, token: str | bool | None = None) -> list[str]:
    """The splits of the dataset ``spec`` names (its split aside), sorted: ``validation`` beside ``test``..."""
    if spec.is_local:
        return sorted(_folder_tables(spec)[0])
    builder, _, _, where = _hub_builder(spec, token=token)
    with hub_errors(spec.dataset, spec.commit or spec.revision):
        return sorted(_builder_splits(builder))


def open_folder(spec: DataSpec) -> tuple[Any, str, str, None]:
    """(table, split, name, commit sha = None) of a local ``save_to_disk`` folder or image folder."""
    tables, where = _folder_tables(spec)
    split = pick_split(sorted(tables), spec, where)
    name = spec.path.resolve().name + (f":{split}" if spec.split else "")
    return tables[split], split, name, None


def _folder_tables(spec: DataSpec) -> tuple[dict[str, Any], str]:
    """Every split of a local folder by name, and how messages name the folder."""
    import datasets

    folder = spec.path
    spec.check_folder()
    if not folder.is_dir():
        raise DataError(f"data {spec.dataset!r} is a file; give the folder that holds the images")
    where = f"folder {folder.resolve().name!r}"
    if parse_source_ref(spec.dataset).shadows_repo_id:
        logger.warning("data %r is the local folder ./%s; the Hub dataset %s was not used (write %s@main for it)",
                       spec.dataset, spec.dataset, spec.dataset, spec.dataset)
    if saved_to_disk(folder):
        try:
            loaded = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError, OSError, IndexError) as exc:  # IndexError: a split of no rows
            raise DataError(f"{where} looks like a save_to_disk folder but cannot be read ({first_line(exc)}); "
                            "save it again with save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            tables = dict(loaded)
        else:
            tables = {str(loaded.split) if loaded.split else "train": loaded}
    else:
        try:
            tables = dict(datasets.load_dataset("imagefolder", data_dir=str(folder)))
        except (FileNotFoundError, ValueError, datasets.exceptions.DataFilesNotFoundError) as exc:
            logger.debug("imagefolder could not read %s: %s", folder, exc)
            raise no_images_error(spec) from None
    return tables, where


def open_hub(spec: DataSpec, *, token: str | bool | None,
              streaming: bool | None) -> tuple[Any, str, str, str | None, bool]:
    """(table, split, name, commit sha, streamed) of a Hub dataset, read at the commit its revision resolves to.

    ``streaming=None`` streams a split larger than ``STREAM_MIN_BYTES`` or of unknown size. Offline
    (``HF_HUB_OFFLINE``), the copy ``datasets`` cached is read, and a pinned sha it does not hold is an error.
    """
    repo_id = spec.dataset
    revision = spec.commit or spec.revision
    if hf_constants.HF_HUB_OFFLINE and streaming:
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise DataError(f"{where}: streaming needs the Hub and HF_HUB_OFFLINE is set; unset it, "
                        "or read the dataset from the cache without streaming")
    builder, sha, sizes, where = _hub_builder(spec, token=token)
    with hub_errors(repo_id, revision):
        data_files = builder.config.data_files or {}
        split = pick_split(_builder_splits(builder), spec, where)
        known = (builder.info.splits or {}).get(split)
        if known is not None and known.num_examples == 0:
            raise DataError(f"{spec.dataset}:{split} has no samples; give a split that has some")
        if streaming is None:
            size = _split_bytes(data_files.get(split, []), sizes)
            streaming = size is None or size > STREAM_MIN_BYTES
        table = None
        if streaming:
            try:
                table = builder.as_streaming_dataset(split=split)
            except NotImplementedError:  # a builder that cannot stream: download it instead
                logger.info("%s cannot be streamed; downloading it", where)
                streaming = False
        if table is None:
            builder.download_and_prepare()
            table = builder.as_dataset(split=split)
    name = f"{spec.dataset}@{spec.revision}:{split}" if spec.revision else f"{spec.dataset}:{split}"
    return table, split, name, sha, streaming


def _hub_builder(spec: DataSpec, *, token: str | bool | None) -> tuple[Any, str | None, dict[str, int], str]:
    """(builder, commit sha, file sizes, how messages name it) of a Hub dataset at the commit its revision names.

    Offline (``HF_HUB_OFFLINE``), the copy ``datasets`` cached, whose file sizes are unknown.
    """
    import datasets
    from huggingface_hub import HfApi

    repo_id = spec.dataset
    revision = spec.commit or spec.revision
    where = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(repo_id, revision):
        if hf_constants.HF_HUB_OFFLINE:
            builder = datasets.load_dataset_builder(repo_id, revision=revision, token=token)
            return builder, _cached_sha(builder, where, revision), {}, where
        # The first request: not retried by huggingface_hub, and bounded, so an unreachable Hub fails fast.
        info = HfApi().dataset_info(repo_id, revision=revision, token=token, files_metadata=True,
                                    timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
        sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
        return datasets.load_dataset_builder(repo_id, revision=info.sha, token=token), info.sha, sizes, where


def _builder_splits(builder: Any) -> list[str]:
    data_files = builder.config.data_files or {}
    return [str(s) for s in data_files] or [str(s) for s in (builder.info.splits or {})]


@contextmanager
def hub_errors(repo_id: str, revision: str | None, *, opening: bool = True) -> Iterator[None]:
    """Turn what ``datasets`` and ``huggingface_hub`` raise for a Hub dataset into one-line hfmerge errors.

    Used around opening a dataset and around reading a stream (which talks to the Hub as it goes;
    ``opening=False``: the dataset was found, so an unreachable Hub is not told as a folder that may be mistyped).
    """
    import datasets
    from datasets.data_files import EmptyDatasetError
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    folder_like = repo_id if opening and not revision else None  # a mistyped relative folder reads as a dataset id
    offline = hf_constants.HF_HUB_OFFLINE
    not_cached = DataError(f"dataset {where} is not in the local cache and HF_HUB_OFFLINE is set: unset it to "
                           "download it, or check the name")
    try:
        yield
    except GatedRepoError:
        raise DataError(f"dataset {repo_id} is gated: accept its conditions on the Hub, then log in with "
                        "`hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise DataError(f"revision {revision!r} does not exist in dataset {repo_id}; "
                        "give a branch, tag or commit sha") from None
    except (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        if offline:
            raise not_cached from None
        logger.debug("dataset %s not found: %s", where, exc)
        raise DataError(f"{repo_id} is not a folder here and not a dataset on the Hub, or it is private and no "
                        "token grants access: check the name, or log in with `hf auth login` or set HF_TOKEN") from None
    except datasets.exceptions.DatasetGenerationError as exc:
        raise DataError(f"datasets cannot read dataset {where} ({first_line(exc.__cause__ or exc)}); "
                        "check its data files") from None
    except (datasets.exceptions.DataFilesNotFoundError, EmptyDatasetError) as exc:
        raise DataError(f"dataset {where} has no data files that datasets can read ({first_line(exc)}); "
                        "give a dataset with parquet, csv/json or image files") from None
    except TRANSPORT_ERRORS as exc:
        raise hub_unreachable(exc, name=folder_like) from None
    except LocalEntryNotFoundError as exc:
        if offline:
            raise not_cached from None
        raise hub_unreachable(exc.__cause__ or exc, name=folder_like) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise DataError(f"the Hub answered HTTP {status} for dataset {where}; try again, or check HF_ENDPOINT") from None
    except ConnectionError as exc:  # datasets' own, e.g. "Couldn't reach ... (OfflineModeIsEnabled)"
        if isinstance(exc, HfMergeError):
            raise
        if offline:
            raise not_cached from None
        raise hub_unreachable(exc, name=folder_like) from None


def _split_bytes(urls: list[str], sizes: dict[str, int]) -> int | None:
    """Total size of a split's files (``hf://datasets/org/ds@sha/path`` URLs), ``None`` if one is unknown."""
    total = 0
    for url in urls:
        path = str(url).split("@", 1)[-1].partition("/")[2]
        if path not in sizes:
            return None
        total += sizes[path]
    return total


def _cached_sha(builder: datasets.DatasetBuilder, where: str, revision: str | None) -> str | None:
    """The commit sha of the cached copy ``datasets`` found offline (its cache folder is named by it).

    A pinned sha that is not the cached one is an error: reading another commit would not reproduce.
    """
    cached = Path(builder.cache_dir).name
    sha = cached if is_commit_sha(cached) else None
    if revision is not None and is_commit_sha(revision) and sha != revision:
        raise DataError(f"dataset {where} is not in the local cache and HF_HUB_OFFLINE is set (the cache holds "
                        f"{'commit ' + sha if sha else 'another version'}): unset it to download it")
    if revision is not None and not is_commit_sha(revision):
        logger.info("HF_HUB_OFFLINE is set: %s read from the latest cached copy (commit %s)", where, sha)
    return sha


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
