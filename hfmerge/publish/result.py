"""The result of a merge: staged files, provenance, and the ways out (save, push, card)."""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hfmerge.errors import OutputExistsError
from hfmerge.io.disk import full_disk_is_an_error, owned_temp_folder, remove_orphans
from hfmerge.methods.stages import RunRecord
from hfmerge.publish.manifest import MANIFEST_FILE, describe_files, read_manifest, record_files, users_files

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from hfmerge.eval.report import EvaluationReport
    from hfmerge.recipe import PlannedMerge

logger = logging.getLogger(__name__)

RECIPE_FILE = "hfmerge.yaml"


@dataclass
class MergeResult:
    """A finished merge, staged in a temporary folder until saved or pushed.

    The staged folder holds everything a user gets: safetensors weights,
    ``config.json``, the anchor's image processor, ``hfmerge.yaml`` (the recipe
    pinned to commit shas), ``README.md`` (the model card) and, when the merge
    was evaluated (``evaluation``), ``evaluation.svg`` (its chart). It is removed
    when the result is garbage collected. ``saved_to`` and ``commit_url`` say
    where it went last.
    """

    planned: PlannedMerge
    staging: Path
    config: Any
    warnings: list[str] = field(default_factory=list)
    saved_to: Path | None = None
    commit_url: str | None = None
    evaluation: EvaluationReport | None = None
    """The evaluation of the merged model beside its sources, when evaluation data was given."""
    record: RunRecord = field(default_factory=RunRecord)
    """What the merge's stages learned while it ran (:class:`~hfmerge.methods.stages.RunRecord`)."""

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.staging), True)

    def release_staging(self) -> Path:
        """Hand the staging folder to the caller, who deletes it: it is no longer removed with the result."""
        self._finalizer.detach()
        return self.staging

    # -- facts ------------------------------------------------------------------------
    @property
    def details(self) -> dict[str, Any]:
        """The plan's details with what the stages learned (the gate's accuracy, fine-tuning...): the card's ``details``."""
        return self.record.card_details(self.planned.plan.details)

    @property
    def data_uses(self) -> list[Any]:
        """What each source's statistics were computed on (:class:`~hfmerge.run.stages.DataUse`)."""
        return self.record.data_uses

    @property
    def method(self) -> str:
        return self.planned.method.name

    @property
    def task(self) -> str:
        return self.planned.anchor.task

    @property
    def files(self) -> list[str]:
        return sorted(p.name for p in self.staging.iterdir())

    @property
    def recipe_yaml(self) -> str:
        return (self.staging / RECIPE_FILE).read_text()

    @property
    def card(self) -> ModelCard:
        from huggingface_hub import ModelCard

        return ModelCard((self.staging / "README.md").read_text())

    @property
    def license(self) -> str | None:
        licenses = self._licenses()
        values = set(licenses.values())
        return values.pop() if len(values) == 1 and None not in values else None

    def _licenses(self) -> dict[str, str | None]:
        sources = list(self.planned.sources) + ([self.planned.base] if self.planned.base else [])
        return {s.name: s.license for s in sources}

    def attach_evaluation(self, report: EvaluationReport) -> None:
        """Record ``report`` and restage the card (table, ``model-index``) and the chart with it.

        The staged files are replaced, not rewritten, since a saved copy may share them through a hard link.
        """
        from hfmerge.publish.card import render_card

        self.evaluation = report
        _write_evaluation_chart(self)
        fresh = self.staging / ".README.md.new"
        fresh.write_text(render_card(self))
        os.replace(fresh, self.staging / "README.md")

    # -- ways out ---------------------------------------------------------------------
    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the merged model to ``folder``, atomically.

        The files go to a hidden sibling folder first, which is renamed to
        ``folder`` at the end, so an interrupted save leaves no output folder.
        ``overwrite`` replaces an earlier output holding only the files hfmerge wrote.

        Raises:
            OutputExistsError: ``folder`` may not be replaced (see :func:`check_output_folder`).
        """
        with atomic_folder(folder, overwrite=overwrite) as partial:
            for item in self.staging.iterdir():
                _link_or_copy(item, partial / item.name)
        self.saved_to = Path(folder).expanduser().resolve()
        return self.saved_to

    def push_to_hub(
        self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Create ``repo_id`` if needed and upload the merged model in one commit; return the commit URL."""
        from hfmerge.publish.card import PublicNames, render_card
        from hfmerge.publish.hub import push_folder

        # Replace rather than rewrite: a saved copy may share these files through a hard link. The pushed
        # hfmerge.yaml names local folders as the card does, by folder name: the merging machine's paths
        # stay on that machine (the saved copy keeps them, so it reruns there).
        public_recipe = PublicNames.for_merge(self.planned).scrub(self.recipe_yaml)
        for name, text in (("README.md", render_card(self, repo_id=repo_id)), (RECIPE_FILE, public_recipe)):
            fresh = self.staging / f".{name}.new"
            fresh.write_text(text)
            os.replace(fresh, self.staging / name)
        message = commit_message or f"Merge {len(self.planned.sources)} models with hfmerge ({self.method})"
        self.commit_url = push_folder(self.staging, repo_id, private=private, token=token, commit_message=message)
        return self.commit_url


def check_output_folder(target: str | Path, *, overwrite: bool, marker: str = RECIPE_FILE) -> None:
    """Refuse an output folder whose replacement could lose the user's files.

    An existing folder is replaced only when it is empty, or with ``overwrite``
    when it is an earlier output (``marker`` present: ``hfmerge.yaml`` for a
    merged model, ``space_config.json`` for a Space) holding only the files
    hfmerge wrote there, as they were written (its manifest,
    :mod:`hfmerge.publish.manifest`). The current folder and its ancestors, the
    home folder and a filesystem root are never replaced, whatever they hold.
    A refusal suggests only what will work.

    Raises:
        OutputExistsError: the folder may not be replaced; nothing was touched.
    """
    target = Path(target).expanduser().resolve()
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"output {str(target)!r} is a file; choose a folder path")
    protected = _protected_folder(target)
    if protected:
        raise OutputExistsError(
            f"output {str(target)!r} is {protected}, which hfmerge never replaces; give a new folder, e.g. ./merged"
        )
    if not any(target.iterdir()):
        return
    where = f"output folder {str(target)!r}"
    if not (target / marker).is_file():
        raise OutputExistsError(
            f"{where} has files and no {marker}, which an earlier output written there would hold, so hfmerge "
            "will not replace it; choose another path"
        )
    manifest = read_manifest(target)
    if manifest is None:
        raise OutputExistsError(
            f"{where} has {marker} but no {MANIFEST_FILE}, the list of the files hfmerge wrote there, so its files "
            "cannot be told from yours; choose another path, or empty the folder"
        )
    if users := users_files(target, manifest):
        move = "move them out" if overwrite else "move them out and pass --overwrite"
        raise OutputExistsError(
            f"{where} holds files that hfmerge did not write there, or that changed since: {describe_files(users)}; "
            f"{move}, or choose another path"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{where} holds an earlier hfmerge output; pass --overwrite to replace it, or choose another path"
        )


def _protected_folder(target: Path) -> str | None:
    """What makes ``target`` a folder that must never be replaced, or ``None``."""
    if target.parent == target:
        return "a filesystem root"
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        cwd = None
    if cwd is not None and (cwd == target or target in cwd.parents):
        return "the current folder" if cwd == target else "an ancestor of the current folder"
    if target == Path.home().expanduser().resolve():
        return "the home folder"
    return None


@contextmanager
def atomic_folder(folder: str | Path, *, overwrite: bool = False, marker: str = RECIPE_FILE) -> Iterator[Path]:
    """Yield a hidden sibling of ``folder`` to fill; list its files and rename it to ``folder`` when the block ends.

    An exception inside the block removes the partial folder and leaves
    ``folder`` as it was, so a failure never leaves a half-written output.
    The folder gets the permissions the user's umask gives a new folder.
    The hidden folders are named by their process: what a killed run left
    beside ``folder`` is removed first (:func:`~hfmerge.io.disk.remove_orphans`).

    Raises:
        OutputExistsError: ``folder`` may not be replaced (see :func:`check_output_folder`).
        DiskSpaceError: the disk filled while the block wrote (the partial folder is removed).
    """
    target = Path(folder).expanduser().resolve()
    check_output_folder(target, overwrite=overwrite, marker=marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent)
    partial = owned_temp_folder(target.parent, f".{target.name}.partial-")
    try:
        partial.chmod(0o777 & ~_umask())  # mkdtemp makes 0700, private unlike any folder the user makes
        with full_disk_is_an_error(target.parent, str(target), "make room there, or choose another output folder"):
            yield partial
            record_files(partial)  # what --overwrite may later replace: these files, as they are now
        if target.exists():
            trash = owned_temp_folder(target.parent, f".{target.name}.old-")
            os.replace(target, trash / target.name)
            os.replace(partial, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_metadata(result: MergeResult) -> None:
    """Write ``hfmerge.yaml``, the model card and, for an evaluated merge, its chart into the staging folder."""
    from hfmerge.eval.search import SEARCH_RESULT
    from hfmerge.publish.card import render_card

    pinned = result.planned.pinned_recipe(result.record.data_pins)
    search = result.record.results.get(SEARCH_RESULT)  # values chosen on validation data: say so, and from what
    note = search.yaml_note() if search is not None else ""
    (result.staging / RECIPE_FILE).write_text(note + yaml.safe_dump(pinned.to_dict(), sort_keys=False))
    licenses = result._licenses()
    if result.license is None:
        listed = ", ".join(f"{k}: {v or 'unknown'}" for k, v in licenses.items())
        message = f"the sources' licenses differ or are unknown ({listed}); the card sets no license"
        result.warnings.append(message)
        logger.warning(message)
    _write_evaluation_chart(result)
    (result.staging / "README.md").write_text(render_card(result))


def _write_evaluation_chart(result: MergeResult) -> None:
    """Stage the evaluation's bar chart beside the card, local folders named as the card names them."""
    from hfmerge.publish.card import EVALUATION_SVG, PublicNames

    if result.evaluation is None:
        return
    svg = PublicNames.for_merge(result.planned).scrub(result.evaluation.bar_chart_svg())
    fresh = result.staging / f".{EVALUATION_SVG}.new"
    fresh.write_text(svg)
    os.replace(fresh, result.staging / EVALUATION_SVG)
