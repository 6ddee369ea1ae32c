"""``hfmerge evaluate``: score a merged model (and what it is compared with) on labeled datasets."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import yaml

from hfmerge.errors import RecipeError

logger = logging.getLogger(__name__)


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate ``args.model``; print the table; write JSON and/or update the card as asked.

    ``--update-card`` rewrites a folder's ``README.md`` in place (atomically),
    or with ``--push`` commits the new card and chart to the model's Hub repo.
    """
    from hfmerge.data.processor import check_image_processor
    from hfmerge.data.spec import DataSpec
    from hfmerge.eval.compare import Candidate, evaluate_candidates, load_candidate, load_tasks
    from hfmerge.eval.zero_shot import prompt_problem
    from hfmerge.hub.resolve import resolve_source

    if args.push and not args.update_card:
        raise RecipeError("--push pushes the updated card: add --update-card")
    model_source = resolve_source(args.model)
    if args.update_card and not model_source.is_local and not args.push:
        raise RecipeError(f"{args.model} is a Hub model: --update-card needs --push to commit the card to it")
    if args.push and model_source.is_local:
        raise RecipeError(f"{args.model} is a folder; --update-card updates its README.md in place: drop --push")
    if args.json and Path(args.json).is_dir():
        raise RecipeError(f"--json {args.json!r} is a folder; give a file name, e.g. results.json")
    if args.json and not Path(args.json).expanduser().resolve().parent.is_dir():
        raise RecipeError(f"--json {args.json!r}: its folder does not exist; create it or give another path")
    metrics = []
    if args.metric:
        from hfmerge.eval.evaluate import load_metric

        metrics.append(load_metric(args.metric))  # before any model runs: a bad metric fails fast
    problem = prompt_problem(args.prompt or ())
    if problem:
        raise RecipeError(f"--{problem}")
    specs = [DataSpec.parse(d) for d in args.data]
    compare = list(args.compare or [])
    if args.ensemble and not compare:
        compare = _sources_of(model_source)
        if len(compare) < 2:
            raise RecipeError(
                f"--ensemble needs the models to ensemble: {args.model} has no hfmerge.yaml naming its sources; "
                "add --compare SOURCE SOURCE ..."
            )
    # every model is resolved and checked for its image processor before any data is read
    name = model_source.repo_id or model_source.path.name
    check_image_processor(model_source.path, args.model, reason="hfmerge evaluate feeds it images through one")
    compared = [resolve_source(ref) for ref in compare]
    for ref, source in zip(compare, compared):
        check_image_processor(source.path, ref, reason="hfmerge evaluate feeds it images through one (--compare)",
                              otherwise="drop it from --compare")
    for spec in specs:
        spec.check_folder("--data")
    tasks = load_tasks(specs, samples=args.samples, seed=args.seed, image_column=args.data_column,
                       label_column=args.label_column)
    base = resolve_source(args.base) if args.base else None
    text = base.path if base is not None else None
    text_name = (base.repo_id or base.path.name) if base is not None else None
    merged = load_candidate(model_source.path, name, "merged", text_tower=text, text_tower_name=text_name,
                            prompts=args.prompt)
    if args.ensemble and merged.zero_shot is not None:
        raise RecipeError(f"--ensemble averages classifiers' probabilities over one label set; {name} is scored "
                          "zero-shot per task, which hfmerge does not ensemble: drop --ensemble")
    others: list[Candidate] = []
    for source in compared:
        others.append(load_candidate(source.path, source.repo_id or source.path.name, "source", text_tower=text,
                                     text_tower_name=text_name, prompts=args.prompt))
    report = evaluate_candidates(merged, others, tasks, ensemble=args.ensemble, batch_size=args.batch_size,
                                 progress=not args.quiet, metrics=metrics)
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(report.to_json())
        print(f"written: {Path(args.json).resolve()}")
    if args.update_card:
        _update_card(model_source, report, name, push=args.push)
    return 0


def _sources_of(source: object) -> list[str]:
    """The sources a merged model's ``hfmerge.yaml`` names, pinned to their commits (a Hub model's is downloaded)."""
    recipe = source.path / "hfmerge.yaml"  # type: ignore[attr-defined]
    if not recipe.is_file() and source.repo_id:  # type: ignore[attr-defined]
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            recipe = Path(hf_hub_download(source.repo_id, "hfmerge.yaml",  # type: ignore[attr-defined]
                                          revision=source.commit_sha))  # type: ignore[attr-defined]
        except EntryNotFoundError:
            return []
    if not recipe.is_file():
        return []
    data = yaml.safe_load(recipe.read_text()) or {}
    refs = []
    for entry in data.get("sources") or []:
        if isinstance(entry, dict) and entry.get("model"):
            pin = entry.get("commit") or entry.get("revision")
            refs.append(f"{entry['model']}@{pin}" if pin and "/" in entry["model"] and not Path(entry["model"]).exists()
                        else entry["model"])
    return refs


def _update_card(source: object, report: object, name: str, *, push: bool) -> None:
    from hfmerge.publish.card import EVALUATION_SVG, update_card
    from hfmerge.publish.manifest import replace_files

    folder: Path = source.path  # type: ignore[attr-defined]
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    new_text = update_card(text, report, name)  # type: ignore[arg-type]
    chart = report.bar_chart_svg()  # type: ignore[attr-defined]
    if push:
        from hfmerge.publish.hub import check_push_access, push_folder

        repo_id = source.repo_id  # type: ignore[attr-defined]
        check_push_access(repo_id)
        with tempfile.TemporaryDirectory(prefix=".hfmerge-card-") as staging:
            (Path(staging) / "README.md").write_text(new_text)
            (Path(staging) / EVALUATION_SVG).write_text(chart)
            url = push_folder(staging, repo_id, commit_message="Evaluation results (hfmerge evaluate)")
        print(f"pushed: {url}")
        return
    replace_files(folder, {EVALUATION_SVG: chart, "README.md": new_text})  # hfmerge's files of an output stay its
    print(f"updated: {readme}")
